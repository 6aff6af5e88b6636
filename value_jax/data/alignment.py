"""Box overlaps and phrase/gold-box -> detected-region alignment (VALUE §3.3, Frank et al. §3).

Boxes are `[..., 4]` arrays `x1, y1, x2, y2` in pixels. Areas are continuous by default:
`(x2 - x1) * (y2 - y1)`, which is right for detector boxes (real-valued corners). Pass
`pixel_inclusive=True` for the `+1` convention of VOLTA's `iou` / `iot`
(`flickr30ke_ablation_dataset.py`), which treats corners as inclusive integer pixels; use it to
reproduce Frank et al. exactly. Degenerate boxes (x2 < x1) have area 0; an overlap whose
denominator is 0 is 0.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from value_jax.data.errors import DataReport, report_or_new


def _as_boxes(b, name: str) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    if b.ndim == 1 and b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must be [N, 4] x1, y1, x2, y2 boxes, got shape {b.shape}")
    return b


def box_areas(boxes, pixel_inclusive: bool = False) -> np.ndarray:
    """`[N]` areas of `[N, 4]` boxes (0 for degenerate boxes)."""
    b = _as_boxes(boxes, "boxes")
    one = 1.0 if pixel_inclusive else 0.0
    return np.maximum(b[:, 2] - b[:, 0] + one, 0) * np.maximum(b[:, 3] - b[:, 1] + one, 0)


def intersection(a, b, pixel_inclusive: bool = False) -> np.ndarray:
    """`[N, M]` intersection areas of `a [N, 4]` and `b [M, 4]`."""
    a, b = _as_boxes(a, "a"), _as_boxes(b, "b")
    one = 1.0 if pixel_inclusive else 0.0
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + one
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + one
    return np.maximum(w, 0) * np.maximum(h, 0)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=np.broadcast_to(den > 0, out.shape))
    return out


def iou(a, b, pixel_inclusive: bool = False) -> np.ndarray:
    """`[N, M]` intersection over union."""
    inter = intersection(a, b, pixel_inclusive)
    union = box_areas(a, pixel_inclusive)[:, None] + box_areas(b, pixel_inclusive)[None, :] - inter
    return _safe_div(inter, union)


def iot(regions, gold, pixel_inclusive: bool = False) -> np.ndarray:
    """`[N, M]` intersection over *target* (gold-box) area, Frank et al.'s ablation criterion:
    1 when region n covers gold box m entirely, however large the region."""
    inter = intersection(regions, gold, pixel_inclusive)
    return _safe_div(inter, box_areas(gold, pixel_inclusive)[None, :])


_MEASURES = {
    "iou": lambda regions, gold, inc: iou(regions, gold, inc),
    "iot": lambda regions, gold, inc: iot(regions, gold, inc),
}


@dataclasses.dataclass
class GoldAlignment:
    """Alignment of G gold boxes to R regions.

    overlap: `[G, R]` IoU; linked: `[G, R]` overlap >= threshold; best: `[G]` region of highest
    IoU (-1 when there are no regions); best_overlap: `[G]` its IoU.
    """

    overlap: np.ndarray
    linked: np.ndarray
    best: np.ndarray
    best_overlap: np.ndarray

    def regions(self, g: int) -> np.ndarray:
        return np.flatnonzero(self.linked[g])


def align_gold_to_regions(
    gold_boxes, region_boxes, iou_threshold: float = 0.5, pixel_inclusive: bool = False
) -> GoldAlignment:
    """Per gold box, the regions with IoU >= `iou_threshold` and the best-IoU region."""
    ov = iou(gold_boxes, region_boxes, pixel_inclusive)
    if ov.shape[1] == 0:
        g = ov.shape[0]
        return GoldAlignment(ov, ov >= iou_threshold, np.full(g, -1), np.zeros(g))
    best = ov.argmax(1)
    return GoldAlignment(ov, ov >= iou_threshold, best, ov[np.arange(ov.shape[0]), best])


def phrase_overlap(
    phrase_boxes: Sequence, region_boxes, measure: str = "iou", pixel_inclusive: bool = False
) -> np.ndarray:
    """`[P, R]`: per phrase, the max over its chain's gold boxes of `measure(region, gold)`.

    `phrase_boxes[p]` is `[k_p, 4]` (k_p >= 1): a Flickr30k chain can have several boxes, and
    Frank et al. take the max overlap over them.
    """
    if measure not in _MEASURES:
        raise ValueError(f"measure must be one of {sorted(_MEASURES)}, got {measure!r}")
    regions = _as_boxes(region_boxes, "region_boxes")
    groups = [_as_boxes(b, f"phrase_boxes[{p}]") for p, b in enumerate(phrase_boxes)]
    for p, g in enumerate(groups):
        if len(g) == 0:
            raise ValueError(f"phrase_boxes[{p}] has no box; keep only phrases with >= 1 gold box")
    if not groups or len(regions) == 0:
        return np.zeros((len(groups), len(regions)))
    ov = _MEASURES[measure](regions, np.concatenate(groups), pixel_inclusive)  # [R, sum k]
    starts = np.cumsum([0] + [len(g) for g in groups[:-1]])
    return np.maximum.reduceat(ov, starts, axis=1).T


def phrase_regions(
    phrase_boxes: Sequence,
    region_boxes,
    threshold: float = 0.5,
    measure: str = "iou",
    inclusive: bool = True,
    pixel_inclusive: bool = False,
) -> list[np.ndarray]:
    """Per phrase, the sorted indices of regions linked to it: overlap >= threshold (VALUE,
    `inclusive=True`) or > threshold (Frank et al.'s IoT ablation, `inclusive=False`)."""
    ov = phrase_overlap(phrase_boxes, region_boxes, measure, pixel_inclusive)
    hit = ov >= threshold if inclusive else ov > threshold
    return [np.flatnonzero(row) for row in hit]


def match_gold_boxes(
    gold_boxes, region_boxes, atol: float = 0.5, report: Optional[DataReport] = None
) -> np.ndarray:
    """For features files that already contain the gold boxes (VALUE adds them to the 36
    detections): `[G]` index of the region whose 4 corners equal the gold box within `atol`,
    -1 when none does (counted as `gold_boxes_not_in_regions`). When a box appears several times
    (one box serving two chains), each copy takes a different matching region if there is one.
    Both arrays must use the same corner convention (Flickr30k boxes here are file coords - 1).
    """
    report = report_or_new(report)
    gold, regions = _as_boxes(gold_boxes, "gold_boxes"), _as_boxes(region_boxes, "region_boxes")
    close = np.all(np.abs(gold[:, None, :] - regions[None, :, :]) <= atol, axis=-1)  # [G, R]
    out = np.full(len(gold), -1, np.int64)
    used = np.zeros(len(regions), bool)
    for g in range(len(gold)):
        cands = np.flatnonzero(close[g])
        if len(cands) == 0:
            report.count("gold_boxes_not_in_regions", example=gold[g].tolist())
            continue
        free = cands[~used[cands]]
        out[g] = free[0] if len(free) else cands[0]
        used[out[g]] = True
    return out


class CaptionPair(NamedTuple):
    image_id: object
    caption_image_id: object
    caption_index: int
    caption: str


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling:
    about e draws on average)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def mismatched_caption_pairs(
    image_ids: Sequence, captions_by_image: Mapping[object, Sequence[str]], seed: int
) -> list[CaptionPair]:
    """VALUE's mismatched-caption baseline: every image paired with a caption of a different
    image (seeded derangement of the images, then a seeded caption of the donor)."""
    ids = list(image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("image_ids contains duplicates; an image could receive its own caption")
    missing = [i for i in ids if not captions_by_image.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} images have no caption to lend, e.g. {missing[:3]}")
    rng = np.random.default_rng(seed)
    perm = derangement(len(ids), rng)
    pairs = []
    for k, image_id in enumerate(ids):
        donor = ids[perm[k]]
        caps = captions_by_image[donor]
        c = int(rng.integers(len(caps)))
        pairs.append(CaptionPair(image_id, donor, c, caps[c]))
    return pairs
