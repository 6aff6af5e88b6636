"""`python -m experiments.all --model=uniter|lxmert`: every VALUE analysis, sharing passes.

One pass over Flickr30k Entities runs fusion, modality, image-to-text, coreference and the head
summary together (each sample through the model once); then Visual Genome relations (+ the
mismatched-caption baseline) and the SentEval probes. Without data flags: the built-in demo.
"""

from absl import app, flags

from experiments import common, config, inputs, suite
from experiments.config import RunConfig

flags.adopt_module_key_flags(config)  # --help lists the shared flags

FLICKR = ("fusion", "modality", "coref", "head_summary")


def main(argv):
    del argv
    run(RunConfig.from_flags())


def run(cfg: RunConfig):
    needs = inputs.needs_demo(cfg, "flickr30k_root", "vg_root", "senteval_dir", "vocab")
    demo = common.demo_data(cfg) if needs else None
    model, params = common.load_model(cfg, demo)
    suite.run_flickr(cfg, model, params, demo, set(FLICKR), "all.flickr30k")
    suite.run_relations(cfg, model, params, demo, "all.visual_genome")
    suite.run_linguistic(cfg, model, params, demo, "all.senteval")
    common.say(f"all analyses written under {cfg.out_dir}")


if __name__ == "__main__":
    app.run(main)
