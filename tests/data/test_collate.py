"""Bucketing and padding: smallest fitting bucket, only declared shapes, masked padding rows,
overflow errors / counted truncation, item splitting, one compilation per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from value_jax.data import batch_plan as BP
from value_jax.data import collate as C
from value_jax.data.errors import DataReport

F = 5


def _coref_example(rng, ex_id, text_len, n_regions, n_items, width=3, with_regions=False):
    ids = rng.integers(200, 300, text_len).astype(np.int32)
    ids[0], ids[-1] = 101, 102
    words = max(text_len - 2, 1)
    tokens = np.zeros((n_items, width), np.int32)
    mask = np.zeros((n_items, width), bool)
    for p in range(n_items):
        n = int(rng.integers(1, min(width, words) + 1))
        start = int(rng.integers(1, text_len - n))
        tokens[p, :n], mask[p, :n] = np.arange(start, start + n), True
    targets = {
        "coref.region": rng.integers(0, n_regions, n_items),
        "coref.tokens": tokens,
        "coref.token_mask": mask,
        "coref.type": rng.integers(0, 8, n_items),
        "coref.linked": rng.random(n_items) < 0.5,
        "coref.mask": np.ones(n_items, bool),
        "coref.rand_region": rng.integers(0, n_regions, n_items),
        "coref.rand_tokens": tokens[::-1].copy(),
        "coref.rand_token_mask": mask[::-1].copy(),
    }
    extra = {}
    if with_regions:
        extra = dict(
            region_feats=rng.random((n_regions, F)).astype(np.float32),
            region_boxes=rng.random((n_regions, 4)).astype(np.float32),
        )
    return C.Example(ex_id, ids, targets, image_id=f"img{ex_id}", num_regions=n_regions, **extra)


def _fetch(image_id):
    seed = sum(map(ord, image_id))
    rng = np.random.default_rng(seed)
    return rng.random((120, F)).astype(np.float32), rng.random((120, 4)).astype(np.float32)


def _smallest(sizes, n):  # the obviously-correct twin of Buckets.smallest
    return min(s for s in sizes if s >= n)


def test_buckets_validate_and_pick_smallest():
    b = C.Buckets()
    assert (b.text, b.regions, b.items) == ((16, 24, 32, 48, 64), (36, 50, 100), (8, 16, 32, 64))
    assert C.Buckets.smallest(b.text, 16) == 16 and C.Buckets.smallest(b.text, 17) == 24
    assert C.Buckets.smallest(b.text, 65) is None
    with pytest.raises(ValueError, match="ascending"):
        C.Buckets(text=(32, 16))
    with pytest.raises(ValueError, match="positive"):
        C.Buckets(items=(0, 8))


def test_plan_uses_smallest_bucket_and_only_declared_shapes():
    rng = np.random.default_rng(0)
    buckets = C.DEFAULT_BUCKETS
    examples = [
        _coref_example(
            rng,
            str(i),
            int(rng.integers(3, 65)),
            int(rng.integers(1, 101)),
            int(rng.integers(1, 65)),
            width=int(rng.integers(1, 7)),
        )
        for i in range(60)
    ]
    plans = BP.plan_batches(examples, 4, buckets)
    width = _smallest(buckets.tokens, max(ex.num_tokens for ex in examples))
    seen = []
    for plan in plans:
        assert 1 <= len(plan.examples) <= 4
        assert plan.shape.tokens == width
        for ex, index in zip(plan.examples, plan.indices):
            assert ex is examples[index]
            assert plan.shape.text == _smallest(buckets.text, len(ex.input_ids))
            assert plan.shape.regions == _smallest(buckets.regions, ex.num_regions)
            assert plan.shape.items == _smallest(buckets.items, ex.num_items)
            seen.append(index)
        batch, targets = C.collate(
            plan.examples, plan.shape, 4, regions=_fetch, indices=plan.indices
        )
        assert (
            batch.input_ids.shape[1] in buckets.text
            and batch.region_feats.shape[1] in buckets.regions
        )
        assert batch.batch_size == 4
        assert targets["coref.tokens"].shape == (4, plan.shape.items, width)
        assert targets["coref.tokens"].shape[1] in buckets.items
    assert sorted(seen) == list(range(60))  # every example exactly once
    # inside a bucket, input order is kept
    for plan in plans:
        assert plan.indices == sorted(plan.indices)


def test_collate_places_values_and_masks_padding_rows():
    rng = np.random.default_rng(1)
    exs = [
        _coref_example(rng, "a", 10, 7, 3, width=2),
        _coref_example(rng, "b", 14, 36, 5, width=3),
        _coref_example(rng, "c", 5, 2, 1, width=1, with_regions=True),
    ]
    shape = C.BatchShape(16, 36, 8, 4)
    batch, t = C.collate(exs, shape, 5, regions=_fetch, indices=[7, 8, 9])
    assert batch.input_ids.shape == (5, 16) and batch.region_feats.shape == (5, 36, F)
    np.testing.assert_array_equal(t["example_index"], [7, 8, 9, -1, -1])
    for i, ex in enumerate(exs):
        n = len(ex.input_ids)
        np.testing.assert_array_equal(batch.input_ids[i, :n], ex.input_ids)
        assert batch.text_mask[i].sum() == n and batch.text_mask[i, :n].all()
        assert batch.region_mask[i].sum() == ex.num_regions
        inline = ex.region_feats is not None
        feats, boxes = (ex.region_feats, ex.region_boxes) if inline else _fetch(ex.image_id)
        np.testing.assert_array_equal(
            batch.region_feats[i, : ex.num_regions], feats[: ex.num_regions]
        )
        np.testing.assert_array_equal(
            batch.region_boxes[i, : ex.num_regions], boxes[: ex.num_regions]
        )
        assert not batch.region_feats[i, ex.num_regions :].any()
        p, m = ex.num_items, ex.num_tokens
        for name, arr in ex.targets.items():
            got = t[name][i]
            if C.TARGETS[name].axes == "P":
                np.testing.assert_array_equal(got[:p], arr)
                assert (got[p:] == C.TARGETS[name].pad).all()
            else:
                np.testing.assert_array_equal(got[:p, :m], arr)
                assert (got[:, m:] == C.TARGETS[name].pad).all() and (
                    got[p:] == C.TARGETS[name].pad
                ).all()
    for i in (3, 4):  # padding rows: nothing real anywhere
        assert not batch.text_mask[i].any() and not batch.region_mask[i].any()
        for name in ("coref.mask", "coref.token_mask", "coref.rand_token_mask", "coref.linked"):
            assert not t[name][i].any()
    assert t["coref.mask"].dtype == bool and t["coref.region"].dtype == np.int32


def test_pad_helpers():
    ids, mask = C.pad_text([101, 5, 102], 6)
    np.testing.assert_array_equal(ids, [101, 5, 102, 0, 0, 0])
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0])
    f, b, m = C.pad_regions(np.ones((2, 3)), np.full((2, 4), 0.5), 4)
    assert f.shape == (4, 3) and b.shape == (4, 4) and list(m) == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="do not fit"):
        C.pad_text(np.arange(7), 6)
    with pytest.raises(ValueError, match="do not fit"):
        C.pad_regions(np.ones((5, 3)), np.ones((5, 4)), 4)
    padded = C.pad_targets({"rel.pred": np.array([3, 1]), "rel.mask": np.array([True, True])}, 4, 0)
    np.testing.assert_array_equal(padded["rel.pred"], [3, 1, -1, -1])
    np.testing.assert_array_equal(padded["rel.mask"], [True, True, False, False])


def test_overflow_error_names_the_example_and_truncation_is_counted():
    rng = np.random.default_rng(2)
    big = _coref_example(rng, "long-one", 70, 120, 4, width=2)
    big.targets["coref.tokens"][0, :2] = [66, 67]  # past the 64-token cut
    big.targets["coref.region"][1] = 110  # past the 100-region cut
    big.targets["coref.tokens"][1:, 0] = 1  # the others stay inside
    big.targets["coref.rand_tokens"][:] = 1
    big.targets["coref.rand_region"][:] = 0
    big.targets["coref.region"][[0, 2, 3]] = 5
    with pytest.raises(ValueError, match="'long-one'.*70 text ids > 64.*120 regions > 100"):
        BP.plan_batches([big], 2)
    report = DataReport()
    plans = BP.plan_batches([big], 2, overflow="truncate", report=report)
    (plan,) = plans
    assert plan.shape[:2] == (64, 100)
    ex = plan.examples[0]
    assert len(ex.input_ids) == 64 and ex.input_ids[-1] == 102 and ex.num_regions == 100
    assert ex.num_items == 2
    assert report["examples_truncated_text"] == 1 and report["examples_truncated_regions"] == 1
    assert report["items_dropped_by_truncation"] == 2
    # nothing left at all: the example is dropped, counted
    report = DataReport()
    gone = _coref_example(rng, "gone", 80, 10, 1, width=1)
    gone.targets["coref.tokens"][0, 0] = 70
    assert BP.plan_batches([gone], 2, overflow="truncate", report=report) == []
    assert report["examples_dropped_by_truncation"] == 1
    with pytest.raises(ValueError, match="overflow"):
        BP.plan_batches([gone], 2, overflow="ignore")


def test_examples_with_too_many_items_are_split_without_loss():
    rng = np.random.default_rng(3)
    ex = _coref_example(rng, "many", 20, 36, 150, width=2)
    report = DataReport()
    plans = BP.plan_batches([ex], 8, report=report)
    parts = sorted((p for plan in plans for p in plan.examples), key=lambda p: p.id)
    assert [p.id for p in parts] == ["many#0", "many#1", "many#2"]
    assert [p.num_items for p in parts] == [64, 64, 22]
    assert {plan.shape.items for plan in plans} == {64, 32}
    assert report["examples_split_over_items"] == 2
    for name, arr in ex.targets.items():
        np.testing.assert_array_equal(np.concatenate([p.targets[name] for p in parts]), arr)
    assert all(idx == 0 for plan in plans for idx in plan.indices)


def test_text_only_examples_get_one_masked_dummy_region():
    exs = [
        C.Example(
            f"t:{i}",
            [101] + [7] * i + [102],
            {"senteval.label": i % 2, "senteval.split": i % 3, "senteval.mask": True},
        )
        for i in range(5)
    ]
    plans = BP.plan_batches(exs, 4)
    assert {p.shape for p in plans} == {C.BatchShape(16, 1, 0, 0)}
    batch, t = C.collate(plans[0].examples, plans[0].shape, 4, feat_dim=F, indices=plans[0].indices)
    assert batch.region_feats.shape == (4, 1, F) and not batch.region_mask.any()
    np.testing.assert_array_equal(t["senteval.label"], [0, 1, 0, 1])
    np.testing.assert_array_equal(t["senteval.split"], [0, 1, 2, 0])
    batch, t = C.collate(plans[1].examples, plans[1].shape, 4, feat_dim=F, indices=plans[1].indices)
    np.testing.assert_array_equal(t["senteval.mask"], [True, False, False, False])
    with pytest.raises(ValueError, match="feat_dim"):
        C.collate(exs[:1], plans[0].shape, 4)


def test_example_checks_name_the_example():
    with pytest.raises(ValueError, match="'bad'.*coref.type has 2 items"):
        C.Example(
            "bad", [101, 102], {"coref.region": [0, 1, 2], "coref.type": [0, 1]}, num_regions=3
        )
    with pytest.raises(ValueError, match="unknown targets"):
        C.Example("x", [101, 102], {"coref.regoin": [0]})
    with pytest.raises(ValueError, match="several analyses"):
        C.Example("x", [101, 102], {"coref.region": [0], "rel.subj": [0]})
    with pytest.raises(ValueError, match=r"\[T >= 2\]"):
        C.Example("x", [101], {})


def test_example_rng_depends_on_seed_and_keys_only():
    a = C.example_rng(0, "coref", "123", 4).integers(1 << 30, size=4)
    np.testing.assert_array_equal(a, C.example_rng(0, "coref", "123", 4).integers(1 << 30, size=4))
    assert not np.array_equal(a, C.example_rng(1, "coref", "123", 4).integers(1 << 30, size=4))
    assert not np.array_equal(a, C.example_rng(0, "coref", "123", 5).integers(1 << 30, size=4))


def test_jitted_step_compiles_once_per_shape():
    rng = np.random.default_rng(4)
    examples = [
        _coref_example(
            rng,
            str(i),
            int(rng.integers(3, 40)),
            int(rng.integers(1, 60)),
            int(rng.integers(1, 20)),
        )
        for i in range(40)
    ]
    plans = BP.plan_batches(examples, 4)
    traces = []

    @jax.jit
    def step(batch, targets):
        traces.append(1)  # runs only while tracing
        feats = jnp.where(batch.region_mask[..., None] > 0, batch.region_feats, 0)
        return feats.sum() + jnp.sum(targets["coref.mask"])

    for plan in plans:
        batch, targets = C.collate(
            plan.examples, plan.shape, 4, regions=_fetch, indices=plan.indices
        )
        step(batch, targets)
    assert len(plans) > len({p.shape for p in plans})
    assert len(traces) == len({p.shape for p in plans})
