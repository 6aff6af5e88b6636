"""`python -m experiments.all --model=uniter|lxmert`: every VALUE analysis, sharing passes.

One pass over Flickr30k Entities runs fusion, modality, image-to-text, coreference and the head
summary together (each sample through the model once); then Visual Genome relations (+ the
mismatched-caption baseline) and the SentEval probes. Without data flags: the built-in demo.
"""
from absl import app, flags

from experiments import common, suite

flags.adopt_module_key_flags(common)   # --help lists the shared flags
flags.adopt_module_key_flags(suite)    # and the probers' (--bilinear_rank, ...)

FLICKR = ("fusion", "modality", "coref", "head_summary")


def main(argv):
    del argv
    demo = common.demo_data() if common.needs_demo("flickr30k_root", "vg_root", "senteval_dir",
                                                   "vocab") else None
    model, params = common.load_model(demo)
    suite.run_flickr(model, params, demo, set(FLICKR), "all.flickr30k")
    suite.run_relations(model, params, demo, "all.visual_genome")
    suite.run_linguistic(model, params, demo, "all.senteval")
    common.say(f"all analyses written under {common.FLAGS.out_dir}")


if __name__ == "__main__":
    app.run(main)
