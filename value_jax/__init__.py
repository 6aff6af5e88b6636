"""value_jax: open up pre-trained vision-and-language transformers and measure what is inside.

    model, params = value_jax.load(DIR)          # a directory written by checkpoints_convert
    batch = value_jax.Batch.create(input_ids, text_mask, region_feats, region_boxes, region_mask)
    trace = value_jax.run(model, params, batch)  # jitted; every attention map + hidden state
    v2t, names = trace.blocks("v2t")             # [L, B, H, R, T], layer names
"""
from value_jax.api import forward, run
from value_jax.batch import Batch
from value_jax.checkpoint import load
from value_jax.trace import Trace

__all__ = ["Batch", "Trace", "load", "run", "forward"]
