"""`python -m experiments.fusion --model=uniter|lxmert`: see value_jax/probes/ for the definition.

Runs on Flickr30k Entities (`--flickr30k_root`, `--flickr30k_features`) or, without them, on
the built-in demo data. Writes results.json, table.md, figures and flags.json to
<out_dir>/<analysis>/<model>/.
"""
from absl import app

from experiments import common, suite


def main(argv):
    del argv
    demo = common.demo_data() if common.needs_demo("flickr30k_root", "vocab") else None
    model, params = common.load_model(demo)
    suite.run_flickr(model, params, demo, {"fusion"}, "fusion")


if __name__ == "__main__":
    app.run(main)
