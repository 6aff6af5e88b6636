"""`python -m experiments.relation --model=uniter|lxmert`: VALUE §3.4, Table 4 and Fig. 5.

Runs on Visual Genome (`--vg_root`, `--vg_features`) or the built-in demo data; a second pass
pairs each image with an unrelated caption (the mismatched-caption baseline). Writes to
<out_dir>/relation/<model>/ and <out_dir>/relation_mismatched/<model>/.
"""
from absl import app, flags

from experiments import common, suite

flags.adopt_module_key_flags(common)   # --help lists the shared flags
flags.adopt_module_key_flags(suite)    # and the probers' (--bilinear_rank, ...)

flags.DEFINE_boolean("mismatched", True, "Also run the mismatched-caption baseline.")


def main(argv):
    del argv
    demo = common.demo_data() if common.needs_demo("vg_root", "vocab") else None
    model, params = common.load_model(demo)
    suite.run_relations(model, params, demo, "relation", flags.FLAGS.mismatched)


if __name__ == "__main__":
    app.run(main)
