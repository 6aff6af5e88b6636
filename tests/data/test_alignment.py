"""Box overlaps against slow twins, gold -> region alignment, mismatched-caption pairs."""

import warnings

import numpy as np
import pytest

from value_jax.data.alignment import (
    align_gold_to_regions,
    box_areas,
    derangement,
    intersection,
    iot,
    iou,
    match_gold_boxes,
    mismatched_caption_pairs,
    phrase_overlap,
    phrase_regions,
)
from value_jax.data.errors import DataReport
from value_jax.data.fixtures.annotations import write_flickr30k


def _slow_overlap(a, b, kind, plus_one):
    one = 1.0 if plus_one else 0.0
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]) + one)
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]) + one)
            inter = iw * ih
            area_p = max(0.0, p[2] - p[0] + one) * max(0.0, p[3] - p[1] + one)
            area_q = max(0.0, q[2] - q[0] + one) * max(0.0, q[3] - q[1] + one)
            den = area_p + area_q - inter if kind == "iou" else area_q
            out[i, j] = inter / den if den > 0 else 0.0
    return out


def _random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(-5, size / 2, (n, 2))  # a few degenerate boxes on purpose
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("plus_one", [False, True])
def test_iou_iot_match_slow_twins(plus_one):
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 23), _random_boxes(rng, 17)
    b[3] = a[5]
    b[4] = [10, 10, 10, 30]  # zero width
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(
            iou(a, b, plus_one), _slow_overlap(a, b, "iou", plus_one), atol=1e-12
        )
        np.testing.assert_allclose(
            iot(a, b, plus_one), _slow_overlap(a, b, "iot", plus_one), atol=1e-12
        )
    assert iou(a, b).shape == (23, 17)


def test_known_values():
    a, b = np.array([[0, 0, 10, 10]]), np.array([[5, 5, 15, 15]])
    assert iou(a, b)[0, 0] == pytest.approx(25 / 175)
    assert iot(a, b)[0, 0] == pytest.approx(25 / 100)
    assert iot([[0, 0, 100, 100]], [[10, 10, 20, 20]])[0, 0] == 1.0  # region covers the gold box
    assert iou([[0, 0, 100, 100]], [[10, 10, 20, 20]])[0, 0] == pytest.approx(0.01)
    assert iou(a, b, pixel_inclusive=True)[0, 0] == pytest.approx(
        36 / (121 + 121 - 36)
    )  # VOLTA's +1
    np.testing.assert_array_equal(box_areas([[0, 0, 10, 5], [3, 3, 1, 1]]), [50, 0])
    assert intersection(np.zeros((0, 4)), b).shape == (0, 1)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        iou([[0, 0, 1]], b)


def test_align_gold_to_regions():
    gold = np.array([[0, 0, 10, 10], [50, 50, 60, 60]])
    regions = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 20, 20], [200, 200, 210, 210]])
    al = align_gold_to_regions(gold, regions, iou_threshold=0.5)
    assert al.regions(0).tolist() == [0, 1] and al.regions(1).tolist() == []
    assert al.best.tolist() == [0, 0] and al.best_overlap[0] == 1.0 and al.best_overlap[1] == 0.0
    none = align_gold_to_regions(gold, np.zeros((0, 4)))
    assert none.best.tolist() == [-1, -1] and none.linked.shape == (2, 0)


def test_phrase_overlap_max_over_chain_boxes():
    rng = np.random.default_rng(1)
    regions = _random_boxes(rng, 12)
    chains = [_random_boxes(rng, k) for k in (1, 3, 2)]
    for measure in ("iou", "iot"):
        got = phrase_overlap(chains, regions, measure)
        slow = np.stack([_slow_overlap(regions, c, measure, False).max(1) for c in chains])
        np.testing.assert_allclose(got, slow, atol=1e-12)
    assert phrase_overlap([], regions).shape == (0, 12)
    assert phrase_overlap(chains, np.zeros((0, 4))).shape == (3, 0)
    with pytest.raises(ValueError, match="no box"):
        phrase_overlap([np.zeros((0, 4))], regions)
    with pytest.raises(ValueError, match="measure"):
        phrase_overlap(chains, regions, "dice")


def test_phrase_regions_threshold_inclusive_vs_strict():
    regions = np.array([[0, 0, 10, 10], [0, 0, 5, 10], [0, 0, 20, 20], [90, 90, 99, 99]])
    chains = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [90, 90, 99, 99]])]
    assert [r.tolist() for r in phrase_regions(chains, regions, 0.5)] == [[0, 1], [0, 1, 3]]
    assert [r.tolist() for r in phrase_regions(chains, regions, 0.5, inclusive=False)] == [
        [0],
        [0, 3],
    ]
    assert [
        r.tolist() for r in phrase_regions(chains, regions, 0.5, measure="iot", inclusive=False)
    ] == [[0, 2], [0, 2, 3]]


def test_fixture_gold_boxes_in_features_and_near_them(tmp_path):
    m = write_flickr30k(tmp_path, 3, seed=0)
    rng = np.random.default_rng(0)
    ann = m.annotations[m.image_ids[0]]
    gold = np.array([b for chain in sorted(ann.boxes) for b in ann.boxes[chain]], float)
    detections = _random_boxes(rng, 36, size=300)
    regions = np.concatenate([detections, gold + rng.uniform(-0.2, 0.2, gold.shape)])
    report = DataReport()
    idx = match_gold_boxes(gold, regions, atol=0.5, report=report)
    # The shared box appears under two chains: its two copies take two different regions.
    assert sorted(idx.tolist()) == list(range(36, 36 + len(gold))) and len(report) == 0
    idx = match_gold_boxes(np.concatenate([gold, [[1, 1, 2, 2]]]), regions, report=report)
    assert idx[-1] == -1 and report["gold_boxes_not_in_regions"] == 1
    assert report.examples("gold_boxes_not_in_regions") == ["[1.0, 1.0, 2.0, 2.0]"]
    dup = match_gold_boxes([[0, 0, 5, 5], [0, 0, 5, 5]], [[0, 0, 5, 5]])
    assert dup.tolist() == [0, 0]
    # Detections jittered around the gold boxes link back to their phrase's chain.
    chains = [np.array(ann.boxes[c], float) for c in sorted(ann.boxes)]
    near = np.concatenate([c[:1] + rng.uniform(-2, 2, (1, 4)) for c in chains])
    linked = phrase_regions(chains, near, 0.5)
    assert all(k in r for k, r in enumerate(linked))


def test_mismatched_caption_pairs():
    ids = list(range(10, 30))
    caps = {i: [f"caption {i}.{k}" for k in range(1 + i % 3)] for i in ids}
    pairs = mismatched_caption_pairs(ids, caps, seed=0)
    assert [p.image_id for p in pairs] == ids
    assert all(p.caption_image_id != p.image_id for p in pairs)
    assert all(caps[p.caption_image_id][p.caption_index] == p.caption for p in pairs)
    assert (
        sorted(p.caption_image_id for p in pairs) == ids
    )  # a permutation: every caption image used once
    assert mismatched_caption_pairs(ids, caps, seed=0) == pairs
    assert mismatched_caption_pairs(ids, caps, seed=1) != pairs
    two = mismatched_caption_pairs(["a", "b"], {"a": ["x"], "b": ["y"]}, seed=3)
    assert [(p.image_id, p.caption) for p in two] == [("a", "y"), ("b", "x")]
    with pytest.raises(ValueError, match="duplicates"):
        mismatched_caption_pairs([1, 1, 2], caps, 0)
    with pytest.raises(ValueError, match="no caption"):
        mismatched_caption_pairs([10, 11, 99], caps, 0)
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_caption_pairs([10], caps, 0)


def test_derangement_has_no_fixed_points_and_covers_all():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        p = derangement(4, rng)
        assert sorted(p.tolist()) == [0, 1, 2, 3] and not np.any(p == np.arange(4))
        seen.add(tuple(p.tolist()))
    assert len(seen) == 9  # all derangements of 4 items occur
