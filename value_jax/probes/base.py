"""`Probe`: the interface every analysis implements, run by `value_jax.runner.run_probes`.

A probe's life: `bind(layout)` once, before any batch (layer names from the model's config);
`step(trace, targets)` inside the jitted pass, once per batch, returning arrays whose keys say how
the runner combines them over batches (summed, or collected row by row for `collect_keys`);
`finalize(stats, info)` once, on host, turning the combined statistics into a `Result`; `info`
holds the run's `batches`, `devices` and `processes`, and `log`, a function that prints a
progress line (on the lead process only) for a finalize that takes long, as prober fits do.

This module imports nothing heavier than jax.numpy: probes never load the runner, models or data
through their base class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from value_jax.trace import Layout


class Probe:
    """Base class: `step` is jittable and returns small statistics; `finalize` makes the Result.

    Subclasses set `name`, `outputs` (the model's output heads the step needs, e.g. `("mrc",)`),
    `collect_keys`.
    Metadata a probe reports (layer names, ...) is set in `bind`, from the model's `Layout`,
    which the runner calls before the first batch; `step` never records anything on `self`.
    """

    name: str = "probe"
    outputs: tuple = ()
    collect_keys: tuple = ()

    def bind(self, layout: Layout) -> None:
        """Learns what the model sows (layer names) before anything runs."""

    def fingerprint(self) -> dict[str, Any]:
        """Everything on the probe that can change its numbers (part of the state fingerprint):
        its public attributes, bound metadata included."""
        return {
            "class": type(self).__name__,
            **{k: v for k, v in sorted(vars(self).items()) if not k.startswith("_")},
        }

    def step(self, trace, targets: dict) -> dict[str, jnp.ndarray]:
        raise NotImplementedError

    def finalize(self, stats: dict[str, np.ndarray], info: dict):
        raise NotImplementedError
