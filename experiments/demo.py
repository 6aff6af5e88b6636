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

import dataclasses

import numpy as np
from absl import app, flags

from experiments import ablation, common, config, inputs, suite
from experiments.config import RunConfig

flags.adopt_module_key_flags(config)  # --help lists the shared flags
flags.adopt_module_key_flags(ablation)  # and the ablation's

MODELS = ("uniter", "lxmert")
flags.DEFINE_list("models", list(MODELS), "Models to run the demo on.")
flags.DEFINE_boolean("analyses", True, "Run every VALUE analysis after the attention summary.")
flags.DEFINE_boolean("ablation", True, "Also run the cross-modal input ablation.")


def attention_summary(model, params, loader) -> str:
    """Per attention block (query→key) and layer: the mean attention mass a real query puts on
    the real keys of that block (words t1..tm or regions), over the first batch."""
    import value_jax
    from value_jax import kernels

    batch, _ = next(iter(loader))
    trace = value_jax.run(model, params, batch)
    lines = [
        f"{model.config.model_type}: {len(trace.attention)} attention maps captured "
        f"(batch {batch.batch_size}, text slot {batch.text_len}, {batch.num_regions} regions); "
        "mean mass per query on the block's keys:",
        f"  {'block':<6}{'layer':<20}{'[B, H, Q, K]':<22}{'mass':>8}",
    ]
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
    run(RunConfig.from_flags())


def run(cfg: RunConfig):
    for name in cfg.script.get("models", MODELS):
        run_cfg = dataclasses.replace(cfg, model=name)
        demo = common.demo_data(run_cfg)
        model, params = common.load_model(run_cfg, demo)
        print(attention_summary(model, params, inputs.coref_loader(run_cfg, demo)))
        if cfg.script.get("analyses", True):
            suite.run_flickr(
                run_cfg,
                model,
                params,
                demo,
                {"fusion", "modality", "coref", "head_summary"},
                "demo.flickr30k",
            )
            suite.run_relations(run_cfg, model, params, demo, "demo.visual_genome")
            suite.run_linguistic(run_cfg, model, params, demo, "demo.senteval")
        if cfg.script.get("ablation", True):
            ablation.run(run_cfg, model, params, demo)
    common.say(f"demo results written under {cfg.out_dir}/<analysis>/<model>/")


if __name__ == "__main__":
    app.run(main)
