"""`python -m experiments.head_summary --model=uniter|lxmert`.

VL-InterpreT's per-head statistics: mean attention per query→key block (t2t, t2v, v2t,
v2v) for every head of every layer.
On Flickr30k Entities (`--flickr30k_root`, `--flickr30k_features`, `--vocab`), else the
built-in demo data.
"""

from absl import app, flags

from experiments import config, suite

flags.adopt_module_key_flags(config)  # --help lists the shared flags
main = suite.flickr_main("head_summary")

if __name__ == "__main__":
    app.run(main)
