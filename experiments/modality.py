"""`python -m experiments.modality --model=uniter|lxmert`.

VALUE §3.2–3.3.1: modality importance of the [CLS] attention per head, per layer and
overall (Fig. 3, 4a), and the image-to-text heads (Fig. 4b).
On Flickr30k Entities (`--flickr30k_root`, `--flickr30k_features`, `--vocab`), else the
built-in demo data.
"""

from absl import app, flags

from experiments import config, suite

flags.adopt_module_key_flags(config)  # --help lists the shared flags
main = suite.flickr_main("modality")

if __name__ == "__main__":
    app.run(main)
