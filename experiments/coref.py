"""`python -m experiments.coref --model=uniter|lxmert`.

VALUE §3.3.2–3.3.3: visual coreference heads per entity type (Table 2), with random
pairs as baseline, and the VCD/VCC attention and embedding probers (Table 3).
On Flickr30k Entities (`--flickr30k_root`, `--flickr30k_features`, `--vocab`), else the
built-in demo data.
"""

from absl import app, flags

from experiments import config, suite

flags.adopt_module_key_flags(config)  # --help lists the shared flags
main = suite.flickr_main("coref")

if __name__ == "__main__":
    app.run(main)
