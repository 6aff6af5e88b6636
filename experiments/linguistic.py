"""`python -m experiments.linguistic --model=uniter|lxmert`: VALUE §3.5, Table 5.

SentEval probing tasks per layer on text-only input (`--senteval_dir`, `--senteval_tasks`, or the
built-in demo). For the BERT-base baseline, convert BERT with `--format=bert` and pass it as
`--checkpoint` with `--model=uniter`. Writes to <out_dir>/linguistic/<task>/<model>/.
"""
from absl import app, flags

from experiments import common, suite

flags.adopt_module_key_flags(common)   # --help lists the shared flags
flags.adopt_module_key_flags(suite)    # and the probers' (--bilinear_rank, ...)


def main(argv):
    del argv
    demo = common.demo_data() if common.needs_demo("senteval_dir", "vocab") else None
    model, params = common.load_model(demo)
    suite.run_linguistic(model, params, demo, "linguistic")


if __name__ == "__main__":
    app.run(main)
