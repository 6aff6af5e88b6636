"""Which rows of a batch are samples of the per-sample analyses (fusion, modality, image-to-text,
head summary).

`batch_plan.plan_batches` splits an example with more items than the largest items bucket into
several rows that share its text and regions; the per-sample analyses must count such an example
once. `row.first` (from `collate.collate`) marks the first row of each example; a loader that
yields no such target (a hand-made list of batches) has one row per sample.
"""

from __future__ import annotations

import jax.numpy as jnp

from value_jax.data.collate import ROW_FIRST


def first_rows(targets: dict, batch_size: int):
    """`[B]` bool: the rows that count as samples (every row when there is no `row.first`)."""
    if ROW_FIRST in targets:
        return targets[ROW_FIRST].astype(bool)
    return jnp.ones((batch_size,), bool)
