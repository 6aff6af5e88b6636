"""The one place that calls `model.apply`: `run(model, params, batch) -> Trace`.

Keeping the single apply call here means a later port of the models (e.g. to flax.nnx) touches
one function.
"""
from __future__ import annotations

import functools

import jax

from value_jax.batch import Batch
from value_jax.trace import Trace


def forward(model, params, batch: Batch, heads=()) -> Trace:
    """Un-jitted forward returning the Trace; call it inside your own jitted step."""
    outputs, state = model.apply({"params": params}, batch, heads=tuple(heads),
                                 mutable=["intermediates"])
    return Trace.from_intermediates(model.config.model_type, state["intermediates"], batch, outputs)


@functools.lru_cache(maxsize=None)
def _jitted(model, heads):
    return jax.jit(lambda params, batch: forward(model, params, batch, heads))


def run(model, params, batch: Batch, heads=()) -> Trace:
    """Jitted forward returning the full Trace (every attention map and hidden state).

    Compiled once per (model, heads, batch shapes). The Trace stays on device; use
    `trace.attention_numpy()` to copy every map to host.
    """
    return _jitted(model, tuple(heads))(params, batch)
