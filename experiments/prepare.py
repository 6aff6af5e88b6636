"""`python -m experiments.prepare --model=uniter|lxmert --tfds_data_dir=DIR`: prepare once,
probe many times.

Reads Flickr30k Entities (`--split`) and Visual Genome (dense and mismatched captions) from the
raw files, aligns, tokenizes and samples them exactly as the experiments do, and writes each as
a TFDS dataset (array_record; no TensorFlow needed) with the region features inside the records.
Later runs given the same `--tfds_data_dir` and settings read these records instead of the raw
files, each process only the records of its own batches:

    python -m experiments.prepare --model=uniter --vocab=... --flickr30k_root=... \\
        --flickr30k_features=... --vg_root=... --vg_features=... --tfds_data_dir=prepared
    python -m experiments.all --model=uniter --checkpoint=ckpt/uniter --vocab=... \\
        --senteval_dir=probing --tfds_data_dir=prepared

A dataset's name holds a hash of every setting that shapes it (split, seed, IoU threshold,
region source, --max_images, casing) and of the vocabulary, so other settings make another
dataset. Without data flags: the built-in demo data.
"""

from absl import app, flags

from experiments import common, config, inputs
from experiments.config import RunConfig

flags.adopt_module_key_flags(config)  # --help lists the shared flags


def main(argv):
    del argv
    cfg = RunConfig.from_flags()
    if not cfg.tfds_data_dir:
        raise app.UsageError("--tfds_data_dir: where to write the prepared datasets")
    run(cfg)


def run(cfg: RunConfig):
    demo = common.demo_data(cfg) if inputs.needs_demo(cfg, "vocab") else None
    for kind, captions in (("coref", "region"), ("relation", "region"), ("relation", "mismatched")):
        builder = inputs.tfds_builder(cfg, kind, demo, captions, with_sources=True)
        if builder.is_prepared():
            common.say(f"[prepare] {builder.data_dir} is already prepared")
            continue
        common.say(f"[prepare] writing {kind} ({captions} captions) to {builder.data_dir}")
        with inputs.quiet_tfds():
            builder.download_and_prepare()
        sizes = {s: v.num_examples for s, v in builder.info.splits.items()}
        common.say(f"[prepare] {builder.data_dir}: {sizes}")
    common.say(
        f"prepared under {cfg.tfds_data_dir}: pass --tfds_data_dir="
        f"{cfg.tfds_data_dir} with the same settings to any experiment"
    )


if __name__ == "__main__":
    app.run(main)
