"""Static shapes fitted to the data: the fewest padded tokens for a bounded number of shapes.

A fixed grid of sizes (`collate.DEFAULT_BUCKETS`) wastes a quarter of the computed tokens on
UNITER's adaptive 10–100 regions. `fit_buckets` chooses, per axis (text length, region count,
items), the sizes that minimise the padding of the examples at hand: an exact dynamic programme
over the distinct values (`fit_sizes`), the largest size being the largest value, so nothing is
truncated that the fixed grid would keep. The grid stays small (at most 4 × 7): every distinct
shape is one XLA compilation, so the number of sizes is chosen for the whole-batch padding of the
data at hand: small data gets few shapes.

The fit is a pure function of the examples, so every process of a multi-process run, and every
rerun, computes the same buckets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from value_jax.data import batch_plan as BP
from value_jax.data import collate as C


def fit_sizes(values: Sequence[int], k: int) -> tuple[int, ...]:
    """At most `k` ascending sizes, the largest = max(values), minimising Σ (size(v) − v) where
    size(v) is the smallest size ≥ v. Exact (O(k·n²) over the n distinct values)."""
    u, count = np.unique(np.asarray(values, np.int64), return_counts=True)
    if not len(u):
        raise ValueError("fit_sizes needs at least one value")
    k = max(1, min(k, len(u)))
    n_below = np.concatenate([[0], np.cumsum(count)])
    sum_below = np.concatenate([[0], np.cumsum(count * u)])

    def cost(i, j):  # values u[i..j] padded to u[j]
        return u[j] * (n_below[j + 1] - n_below[i]) - (sum_below[j + 1] - sum_below[i])

    n = len(u)
    best = np.full((k + 1, n), np.inf)
    start = np.zeros((k + 1, n), np.int64)
    best[1] = [cost(0, j) for j in range(n)]
    for m in range(2, k + 1):
        for j in range(m - 1, n):
            options = [best[m - 1, i - 1] + cost(i, j) for i in range(m - 1, j + 1)]
            i = int(np.argmin(options))
            best[m, j], start[m, j] = options[i], i + m - 1
    m = int(np.argmin(best[1:, n - 1])) + 1  # fewer sizes when more do not help
    sizes, j = [], n - 1
    while m >= 1 and j >= 0:
        sizes.append(int(u[j]))
        j = int(start[m, j]) - 1 if m > 1 else -1
        m -= 1
    return tuple(sorted(sizes))


def fit_buckets(
    examples: Sequence[C.Example],
    batch_size: int,
    *,
    base: C.Buckets = C.DEFAULT_BUCKETS,
    max_text_sizes: int = 4,
    max_region_sizes: int = 7,
    tolerance: float = 0.01,
    min_batches_per_shape: int = 4,
) -> C.Buckets:
    """Buckets for `examples`: text and region sizes fitted to them. Every count of sizes up to
    4 text × 7 region sizes is tried, scoring the padding of whole batches (a shape's last batch
    is filled with masked rows, which small data pays for); the fewest shapes within
    `tolerance` of the best efficiency win, among grids with at least `min_batches_per_shape`
    batches per shape on average (a compilation costs more than a little padding). Items get one size, the largest item count up to
    `base.items[-1]` (longer examples are split over rows as before); token widths as `base`.
    Text-only examples keep `base.regions`."""
    if not examples:
        return base
    text = np.array([len(e.input_ids) for e in examples])
    regions = np.array([e.num_regions for e in examples])
    has_regions = regions > 0
    options = []
    for kt in range(1, max_text_sizes + 1):
        t_sizes = fit_sizes(text, kt)
        for kr in range(1, (max_region_sizes if has_regions.any() else 1) + 1):
            r_sizes = fit_sizes(regions[has_regions], kr) if has_regions.any() else (0,)
            t_of = np.asarray(t_sizes)[np.searchsorted(t_sizes, text)]
            r_of = np.where(
                has_regions,
                np.asarray(r_sizes)[
                    np.minimum(np.searchsorted(r_sizes, regions), len(r_sizes) - 1)
                ],
                0,
            )
            cells, counts = np.unique(np.stack([t_of, r_of]), axis=1, return_counts=True)
            computed = (np.ceil(counts / batch_size) * batch_size * cells.sum(0)).sum()
            efficiency = (text.sum() + regions.sum()) / computed
            options.append((efficiency, cells.shape[1], t_sizes, r_sizes))
    most_shapes = max(1, len(examples) // (min_batches_per_shape * batch_size))
    options = [o for o in options if o[1] <= most_shapes] or [min(options, key=lambda o: o[1])]
    best = max(o[0] for o in options)
    _, _, t_sizes, r_sizes = min(
        (o for o in options if o[0] >= best - tolerance), key=lambda o: (o[1], -o[0])
    )
    if t_sizes[-1] < 2:
        t_sizes = (2,)
    cap = base.items[-1]
    items = [min(e.num_items, cap) for e in examples if e.num_items]
    tokens = tuple(s for s in base.tokens if s < t_sizes[-1]) + (max(t_sizes[-1], base.tokens[0]),)
    return C.Buckets(
        text=t_sizes,
        regions=r_sizes if has_regions.any() else base.regions,
        items=(max(items),) if items else base.items,
        tokens=tuple(sorted(set(tokens))),
    )


def padding_efficiency(plans: Sequence[BP.BatchPlan], batch_size: int) -> float:
    """Real text tokens + regions over computed ones (every row of every batch, padded)."""
    useful = sum(len(e.input_ids) + e.num_regions for p in plans for e in p.examples)
    computed = sum(
        batch_size * (p.shape.text + (p.shape.regions if p.shape.regions > 1 else 0)) for p in plans
    )
    return useful / max(computed, 1)
