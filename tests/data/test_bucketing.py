"""Fitted buckets: the exact least-padding sizes, nothing truncated, fewer padded tokens."""

import itertools

import numpy as np
import pytest

from value_jax.data import batch_plan as BP
from value_jax.data import collate as C
from value_jax.data.bucketing import fit_buckets, fit_sizes, padding_efficiency


def _padding(values, sizes):
    return sum(min(s for s in sizes if s >= v) - v for v in values)


@pytest.mark.parametrize("seed", range(6))
def test_fit_sizes_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(1, 30, rng.integers(1, 25)).tolist()
    distinct = sorted(set(values))
    for k in (1, 2, 3, 4):
        sizes = fit_sizes(values, k)
        assert len(sizes) <= k and sizes[-1] == max(values)
        best = min(
            _padding(values, (*c, max(values)))
            for r in range(0, min(k, len(distinct)))
            for c in itertools.combinations(distinct[:-1], r)
        )
        assert _padding(values, sizes) == best


def _examples(n, regions, rng):
    return [
        C.Example(
            f"{i}",
            np.arange(rng.integers(8, 41)),
            {},
            image_id=str(i),
            num_regions=int(regions(rng)),
        )
        for i in range(n)
    ]


def test_fitted_buckets_pad_less_than_the_fixed_grid_and_keep_every_example():
    rng = np.random.default_rng(0)
    examples = _examples(20000, lambda r: r.integers(10, 101), rng)  # UNITER's adaptive regions
    buckets = fit_buckets(examples, 32)
    plans = BP.plan_batches(examples, 32, buckets)
    assert sorted(e.id for p in plans for e in p.examples) == sorted(e.id for e in examples)
    assert len({p.shape for p in plans}) <= 4 * 7
    fitted = padding_efficiency(plans, 32)
    fixed = padding_efficiency(BP.plan_batches(examples, 32), 32)
    assert fitted >= 0.85 > fixed


def test_small_data_gets_few_shapes():
    rng = np.random.default_rng(1)
    examples = _examples(40, lambda r: r.integers(10, 101), rng)
    buckets = fit_buckets(examples, 8)
    assert len(buckets.text) == len(buckets.regions) == 1  # 5 batches: one shape
