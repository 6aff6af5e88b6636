"""`python -m experiments.relation --model=uniter|lxmert`: VALUE §3.4, Table 4 and Fig. 5.

Runs on Visual Genome (`--vg_root`, `--vg_features`) or the built-in demo data; a second pass
pairs each image with an unrelated caption (the mismatched-caption baseline). Writes to
<out_dir>/relation/<model>/ and <out_dir>/relation_mismatched/<model>/.
"""

from absl import app, flags

from experiments import common, config, inputs, suite
from experiments.config import RunConfig

flags.adopt_module_key_flags(config)  # --help lists the shared flags

flags.DEFINE_boolean("mismatched", True, "Also run the mismatched-caption baseline.")


def main(argv):
    del argv
    cfg = RunConfig.from_flags()
    run(cfg, mismatched=cfg.script["mismatched"])


def run(cfg: RunConfig, mismatched: bool = True):
    demo = common.demo_data(cfg) if inputs.needs_demo(cfg, "vg_root", "vocab") else None
    model, params = common.load_model(cfg, demo)
    return suite.run_relations(cfg, model, params, demo, "relation", mismatched)


if __name__ == "__main__":
    app.run(main)
