"""`python -m experiments.fusion --model=uniter|lxmert`.

VALUE §3.1, Table 1: multimodal fusion degree, the NMI between 2-means clusters of each
layer's token states and their modality.
On Flickr30k Entities (`--flickr30k_root`, `--flickr30k_features`, `--vocab`), else the
built-in demo data.
"""

from absl import app, flags

from experiments import config, suite

flags.adopt_module_key_flags(config)  # --help lists the shared flags
main = suite.flickr_main("fusion")

if __name__ == "__main__":
    app.run(main)
