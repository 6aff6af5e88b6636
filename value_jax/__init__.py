"""value_jax: open up pre-trained vision-and-language transformers and measure what is inside.

    model, params = value_jax.load(DIR)          # a directory written by checkpoints_convert
    batch = value_jax.Batch.create(input_ids, text_mask, region_feats, region_boxes, region_mask)
    trace = value_jax.run(model, params, batch)  # jitted; every attention map + hidden state
    v2t, names = trace.blocks("v2t")             # [L, B, H, R, T], layer names

The names above load their modules on first use, so `import value_jax.kernels` (or any other
part) loads that part and what it imports, not the models, orbax and flax.linen.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Batch": "value_jax.batch",
    "Trace": "value_jax.trace",
    "load": "value_jax.checkpoint",
    "run": "value_jax.api",
    "forward": "value_jax.api",
}

__all__ = ["Batch", "Trace", "load", "run", "forward"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'value_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
