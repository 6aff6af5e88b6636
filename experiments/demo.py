"""`python -m experiments.demo`: the whole toolkit on the built-in demo, both models.

1. Writes a small deterministic checkpoint of each model in its ORIGINAL PyTorch layout
   (`uniter-demo.pt`, `Epoch20_LXRT-demo.pth`) and converts it with the real converter.
2. Generates a small dataset in the real file formats (Flickr30k Entities, LXMERT TSV and UNITER
   npz region features, Visual Genome, SentEval, vocab files).
3. Runs both models on it and prints a per-layer summary of every attention map captured.
4. Runs every VALUE analysis (`experiments.all`) and, with --ablation, the cross-modal input
   ablation for each model, writing tables and figures under --out_dir.
The weights are random, so the numbers show the machinery, not findings.
"""
from __future__ import annotations

import numpy as np
from absl import app, flags

from experiments import common, suite
from experiments.common import FLAGS

flags.adopt_module_key_flags(common)   # --help lists the shared flags
flags.adopt_module_key_flags(suite)    # and the probers' (--bilinear_rank, ...)

flags.DEFINE_list("models", ["uniter", "lxmert"], "Models to run the demo on.")
flags.DEFINE_boolean("analyses", True, "Run every VALUE analysis after the attention summary.")
flags.DEFINE_boolean("ablation", True, "Also run the cross-modal input ablation.")


def attention_summary(model, params, loader) -> str:
    """Per attention block (query→key) and layer: the mean attention mass a real query puts on
    the real keys of that block (words t1..tm or regions), over the first batch."""
    import value_jax
    from value_jax import kernels
    batch, _ = next(iter(loader))
    trace = value_jax.run(model, params, batch)
    lines = [f"{model.config.model_type}: {len(trace.attention)} attention maps captured "
             f"(batch {batch.batch_size}, text slot {batch.text_len}, {batch.num_regions} regions); "
             "mean mass per query on the block's keys:",
             f"  {'block':<6}{'layer':<20}{'[B, H, Q, K]':<22}{'mass':>8}"]
    masks = {"t": trace.word_mask, "v": trace.region_mask > 0}
    for direction in ("t2t", "t2v", "v2t", "v2v"):
        blocks, names = trace.blocks(direction)
        q, k = masks[direction[0]], masks[direction[2]]
        keys = float(np.asarray(k).sum(1).mean())
        for name, block in zip(names, blocks):
            mass = float(np.asarray(kernels.block_mean(block, q, k)).mean()) * keys
            lines.append(f"  {direction:<6}{name:<20}{str(list(block.shape)):<22}{mass:>8.3f}")
    return "\n".join(lines)


def main(argv):
    del argv
    for name in FLAGS.models:
        FLAGS.model = name
        demo = common.demo_data()
        model, params = common.load_model(demo)
        print(attention_summary(model, params, common.coref_loader(demo)))
        if FLAGS.analyses:
            suite.run_flickr(model, params, demo, {"fusion", "modality", "coref", "head_summary"},
                             "demo.flickr30k")
            suite.run_relations(model, params, demo, "demo.visual_genome")
            suite.run_linguistic(model, params, demo, "demo.senteval")
        if FLAGS.ablation:
            from experiments import ablation
            ablation.run(model, params, demo)
    common.say(f"demo results written under {FLAGS.out_dir}/<analysis>/<model>/")


if __name__ == "__main__":
    app.run(main)
