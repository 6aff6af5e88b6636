"""`python -m experiments.linguistic --model=uniter|lxmert`: VALUE §3.5, Table 5.

SentEval probing tasks per layer on text-only input (`--senteval_dir`, `--senteval_tasks`, or the
built-in demo). For the BERT-base baseline, convert BERT with `--format=bert` and pass it as
`--checkpoint` with `--model=uniter`. Writes to <out_dir>/linguistic/<task>/<model>/.
"""

from absl import app, flags

from experiments import common, config, inputs, suite
from experiments.config import RunConfig

flags.adopt_module_key_flags(config)  # --help lists the shared flags


def main(argv):
    del argv
    run(RunConfig.from_flags())


def run(cfg: RunConfig):
    demo = common.demo_data(cfg) if inputs.needs_demo(cfg, "senteval_dir", "vocab") else None
    model, params = common.load_model(cfg, demo)
    return suite.run_linguistic(cfg, model, params, demo, "linguistic")


if __name__ == "__main__":
    app.run(main)
