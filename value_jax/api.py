"""The one place that calls `model.apply`: `run(model, params, batch) -> Trace`.

Keeping the single apply call here means a later port of the models (e.g. to flax.nnx) touches
one function.
"""

from __future__ import annotations

import functools

import jax

from value_jax.batch import Batch
from value_jax.trace import Trace


def forward(model, params, batch: Batch, outputs=()) -> Trace:
    """Un-jitted forward returning the Trace; call it inside your own jitted step. `outputs`
    names the pre-training output heads to compute (`model.config.outputs`)."""
    out, state = model.apply(
        {"params": params}, batch, outputs=tuple(outputs), mutable=["intermediates"]
    )
    return Trace.from_intermediates(model.config.model_type, state["intermediates"], batch, out)


@functools.lru_cache(maxsize=None)
def _jitted(model, outputs):
    return jax.jit(lambda params, batch: forward(model, params, batch, outputs))


def run(model, params, batch: Batch, outputs=()) -> Trace:
    """Jitted forward returning the full Trace (every attention map and hidden state).

    Compiled once per (model, outputs, batch shapes). The Trace stays on device; use
    `trace.attention_numpy()` to copy every map to host.
    """
    return _jitted(model, tuple(outputs))(params, batch)
