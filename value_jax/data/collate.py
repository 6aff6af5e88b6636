"""Prepared examples -> `(Batch, targets)` in a few static shapes, so jitted code compiles once
per shape instead of once per batch.

An `Example` is one caption (coreference), one image (relations) or one sentence (SentEval):
its `[CLS] ... [SEP]` ids, where its regions come from, and its target arrays with one row per
item (a region–phrase or region–region pair). `plan_batches` puts every example in the smallest
bucket that fits each of its four sizes (text length, regions, items, tokens per item), groups
examples of one bucket into batches of exactly `batch_size` rows (padding rows fully masked), and
`collate` pads each batch into numpy arrays:

  Batch          input_ids / text_mask [B, T], region_feats [B, R, F], region_boxes [B, R, 4]
                 (normalised x1, y1, x2, y2), region_mask [B, R]
  coreference    coref.region, coref.type, coref.linked, coref.mask, coref.rand_region [B, P];
                 coref.tokens, coref.token_mask, coref.rand_tokens, coref.rand_token_mask [B, P, M]
  relations      rel.subj, rel.obj, rel.pred, rel.related, rel.mask [B, P]
  SentEval       senteval.label, senteval.split, senteval.mask [B]
  every analysis example_index [B]: the row's position in the loader's example list, -1 on
                 padding rows (host-side bookkeeping; no probe reads it);
                 row.first [B] bool: the first row of its example (False on the later rows of a
                 split example and on padding rows): the validity weight of the per-sample
                 analyses (fusion, modality, image-to-text, head summary), so an example split
                 over several rows counts once;
                 row.image [B] int32: a stable id of the example's image (crc32 of its image id,
                 31 bits), so items of one image can be kept in one prober split;
                 row.item_offset [B] int32: the position of the row's first item in its example

Token positions index the TEXT SLOT (`[CLS]` is 0), region indices the region slot. Text-only
examples (SentEval) get one dummy region with region_mask 0. An example larger than the largest
bucket is an error naming it (`overflow="error"`), or is truncated with every dropped item
counted (`overflow="truncate"`); an example with more items than the largest items bucket is
split into several rows sharing its text and regions (counted, nothing lost).

This module holds the examples, shapes, padding and `collate`; the planning (`plan_batches`,
`bucket_of`, `BatchPlan`, overflow and splitting) is in `value_jax.data.batch_plan`.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from value_jax.batch import Batch

EXAMPLE_INDEX = "example_index"
ROW_FIRST, ROW_IMAGE, ROW_ITEM_OFFSET = "row.first", "row.image", "row.item_offset"
OVERFLOW_POLICIES = ("error", "truncate")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How one target is laid out: `axes` "" (one value per example), "P" (per item) or "PM"
    (per item and token slot); `pad` fills padded items, token slots and rows."""

    axes: str
    dtype: type
    pad: object


TARGETS: dict[str, TargetSpec] = {
    "coref.region": TargetSpec("P", np.int32, 0),
    "coref.tokens": TargetSpec("PM", np.int32, 0),
    "coref.token_mask": TargetSpec("PM", np.bool_, False),
    "coref.type": TargetSpec("P", np.int32, 0),
    "coref.linked": TargetSpec("P", np.bool_, False),
    "coref.mask": TargetSpec("P", np.bool_, False),
    "coref.rand_region": TargetSpec("P", np.int32, 0),
    "coref.rand_tokens": TargetSpec("PM", np.int32, 0),
    "coref.rand_token_mask": TargetSpec("PM", np.bool_, False),
    "rel.subj": TargetSpec("P", np.int32, 0),
    "rel.obj": TargetSpec("P", np.int32, 0),
    # -1 = no predicate: negative pairs and padding (one_hot(-1) is all zeros).
    "rel.pred": TargetSpec("P", np.int32, -1),
    "rel.related": TargetSpec("P", np.bool_, False),
    "rel.mask": TargetSpec("P", np.bool_, False),
    "senteval.label": TargetSpec("", np.int32, 0),
    "senteval.split": TargetSpec("", np.int32, 0),
    "senteval.mask": TargetSpec("", np.bool_, False),
}
REGION_INDEX_TARGETS = ("coref.region", "coref.rand_region", "rel.subj", "rel.obj")
TOKEN_TARGETS = {"coref.tokens": "coref.token_mask", "coref.rand_tokens": "coref.rand_token_mask"}


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Allowed static sizes, ascending. `tokens` (the M of `[B, P, M]` token sets) reaches the
    largest text size by default, so a phrase never outgrows it when its text fits."""

    text: tuple[int, ...] = (16, 24, 32, 48, 64)
    regions: tuple[int, ...] = (36, 50, 100)
    items: tuple[int, ...] = (8, 16, 32, 64)
    tokens: tuple[int, ...] = (4, 8, 16, 32, 64)

    def __post_init__(self):
        for name in ("text", "regions", "items", "tokens"):
            sizes = tuple(int(s) for s in getattr(self, name))
            if not sizes or any(s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise ValueError(
                    f"Buckets.{name} must be positive and strictly ascending, got {sizes}"
                )
            object.__setattr__(self, name, sizes)
        if self.text[-1] < 2:
            raise ValueError("the largest text bucket must hold [CLS] and [SEP]")

    @staticmethod
    def smallest(sizes: Sequence[int], n: int) -> Optional[int]:
        """The smallest size >= n, or None when n exceeds them all."""
        for s in sizes:
            if s >= n:
                return s
        return None


DEFAULT_BUCKETS = Buckets()


class BatchShape(NamedTuple):
    """Static sizes of one batch: T, R (1 for text-only), P and M (0 without per-item targets)."""

    text: int
    regions: int
    items: int
    tokens: int


@dataclasses.dataclass
class Example:
    """One prepared example, before batching.

    Attributes:
      id: unique and stable (`<image id>:<caption index>`, `<image id>`, `<task>:<line>`).
      input_ids: `[T]` int32 `[CLS] ... [SEP]`, no padding.
      targets: target name (see `TARGETS`) -> array: per-example targets are 0-d, per-item
        targets `[P]`, token sets `[P, M]` (positions in the text slot).
      image_id: where the regions come from; "" for text-only examples.
      num_regions: real regions of the image (0 for text-only).
      region_feats, region_boxes: `[R, F]` float32 features and `[R, 4]` normalised boxes when
        the example carries them (TFDS records); None when a loader fetches them by `image_id`.
      item_offset: position of the first item in the example this one was split from
        (`plan_batches`); 0 for an example that was not split.
    """

    id: str
    input_ids: np.ndarray
    targets: dict[str, np.ndarray]
    image_id: str = ""
    num_regions: int = 0
    region_feats: Optional[np.ndarray] = None
    region_boxes: Optional[np.ndarray] = None
    item_offset: int = 0

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, np.int32)
        self.targets = {
            k: np.asarray(v, TARGETS[k].dtype) if k in TARGETS else v
            for k, v in self.targets.items()
        }
        if self.region_feats is not None:
            self.region_feats = np.asarray(self.region_feats, np.float32)
            self.region_boxes = np.asarray(self.region_boxes, np.float32)
            self.num_regions = len(self.region_feats)
        check_example(self)

    @property
    def num_items(self) -> int:
        for name, arr in self.targets.items():
            if TARGETS[name].axes:
                return len(arr)
        return 0

    @property
    def num_tokens(self) -> int:
        """M: the width of the token sets (0 without any)."""
        for name, arr in self.targets.items():
            if TARGETS[name].axes == "PM":
                return arr.shape[1]
        return 0

    def needed(self) -> BatchShape:
        """The sizes this example needs (regions 1 for text-only: the dummy region)."""
        return BatchShape(
            len(self.input_ids), max(self.num_regions, 1), self.num_items, self.num_tokens
        )

    def with_targets(self, targets: dict[str, np.ndarray]) -> "Example":
        return dataclasses.replace(self, targets=targets)


def check_example(ex: Example) -> None:
    """Raises ValueError naming the example when its arrays disagree in shape or name."""
    where = f"example {ex.id!r}"
    if ex.input_ids.ndim != 1 or len(ex.input_ids) < 2:
        raise ValueError(
            f"{where}: input_ids must be [T >= 2] ([CLS] ... [SEP]), got {ex.input_ids.shape}"
        )
    unknown = sorted(set(ex.targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"{where}: unknown targets {unknown} (known: {sorted(TARGETS)})")
    analyses = {name.split(".")[0] for name in ex.targets}
    if len(analyses) > 1:
        raise ValueError(f"{where}: targets of several analyses {sorted(analyses)}")
    p = m = None
    for name, arr in ex.targets.items():
        axes = TARGETS[name].axes
        if arr.ndim != len(axes):
            raise ValueError(
                f"{where}: {name} must have axes [{', '.join(axes)}], got shape {arr.shape}"
            )
        if axes:
            p = len(arr) if p is None else p
            if len(arr) != p:
                raise ValueError(f"{where}: {name} has {len(arr)} items, other targets {p}")
        if axes == "PM":
            m = arr.shape[1] if m is None else m
            if arr.shape[1] != m:
                raise ValueError(
                    f"{where}: {name} has {arr.shape[1]} token slots, other targets {m}"
                )
    feats, boxes = ex.region_feats, ex.region_boxes
    if feats is not None and (feats.ndim != 2 or boxes.shape != (len(feats), 4)):
        raise ValueError(
            f"{where}: region_feats {ex.region_feats.shape} / region_boxes "
            f"{ex.region_boxes.shape} (expected [R, F] and [R, 4])"
        )


def image_key(image_id: str) -> int:
    """A stable non-negative int32 id of an image id string (crc32, 31 bits): `row.image`."""
    return zlib.crc32(str(image_id).encode("utf-8")) & 0x7FFFFFFF


def example_rng(seed: int, *keys) -> np.random.Generator:
    """A generator that depends only on the seed and the example's keys (its image id, caption
    index, ...), so dropping one image does not change the draws of any other."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(k).encode("utf-8")) for k in keys])


# ---------------------------------------------------------------------------------------------
# Padding one example.


def pad_text(ids: np.ndarray, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] ... [SEP]` ids -> (`[length]` int32 ids, `[length]` int32 mask)."""
    ids = np.asarray(ids, np.int32)
    if len(ids) > length:
        raise ValueError(f"{len(ids)} ids do not fit a text slot of {length}")
    out = np.full(length, pad_id, np.int32)
    out[: len(ids)] = ids
    mask = np.zeros(length, np.int32)
    mask[: len(ids)] = 1
    return out, mask


def pad_regions(
    feats: np.ndarray, boxes: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[R, F]` features and `[R, 4]` normalised boxes -> `[length, F]`, `[length, 4]` (zeros on
    padding) and the `[length]` int32 region mask."""
    feats, boxes = np.asarray(feats, np.float32), np.asarray(boxes, np.float32)
    r = len(feats)
    if r > length:
        raise ValueError(f"{r} regions do not fit a region slot of {length}")
    out_f = np.zeros((length, feats.shape[1]), np.float32)
    out_b = np.zeros((length, 4), np.float32)
    out_f[:r], out_b[:r] = feats, boxes
    mask = np.zeros(length, np.int32)
    mask[:r] = 1
    return out_f, out_b, mask


def pad_targets(targets: dict[str, np.ndarray], items: int, tokens: int) -> dict[str, np.ndarray]:
    """Pads per-item targets to `[items]` and token sets to `[items, tokens]` with each target's
    pad value (masks False)."""
    out = {}
    for name, arr in targets.items():
        spec = TARGETS[name]
        if not spec.axes:
            out[name] = np.asarray(arr, spec.dtype)
            continue
        shape = (items,) if spec.axes == "P" else (items, tokens)
        if any(a > b for a, b in zip(arr.shape, shape)):
            raise ValueError(f"{name} {arr.shape} does not fit {shape}")
        padded = np.full(shape, spec.pad, spec.dtype)
        padded[tuple(slice(0, n) for n in arr.shape)] = arr
        out[name] = padded
    return out


def empty_targets(names: Sequence[str], items: int, tokens: int) -> dict[str, np.ndarray]:
    """The targets of a padding row: every value its pad, every mask False."""
    out = {}
    for name in names:
        spec = TARGETS[name]
        shape = {"": (), "P": (items,), "PM": (items, tokens)}[spec.axes]
        out[name] = np.full(shape, spec.pad, spec.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Collation.

RegionFetch = Callable[[str], tuple[np.ndarray, np.ndarray]]


def collate(
    examples: Sequence[Example],
    shape: BatchShape,
    batch_size: int,
    *,
    regions: Optional[RegionFetch] = None,
    feat_dim: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
    pad_id: int = 0,
) -> tuple[Batch, dict[str, np.ndarray]]:
    """Pads `examples` (all fitting `shape`) into a Batch of exactly `batch_size` rows plus the
    targets dict; rows past the examples are padding: text, regions and every target masked.

    Region features come from the example itself or from `regions(image_id)` -> `([R, F] feats,
    [R, 4] normalised boxes)`. `feat_dim` is needed only when no row has regions (text-only).
    """
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples for a batch of {batch_size}")
    names = sorted({k for ex in examples for k in ex.targets})
    if any(set(ex.targets) != set(names) for ex in examples):
        raise ValueError(
            "examples of one batch must carry the same targets: "
            f"{sorted({tuple(sorted(ex.targets)) for ex in examples})}"
        )
    fetched = []
    for ex in examples:
        if ex.num_regions == 0:
            fetched.append(None)
        elif ex.region_feats is not None:
            fetched.append((ex.region_feats[: ex.num_regions], ex.region_boxes[: ex.num_regions]))
        elif regions is None:
            raise ValueError(
                f"example {ex.id!r} has no region features and no region source was given"
            )
        else:
            feats, boxes = regions(ex.image_id)
            fetched.append((feats[: ex.num_regions], boxes[: ex.num_regions]))
    dims = {f[0].shape[1] for f in fetched if f is not None}
    if len(dims) > 1:
        raise ValueError(f"region features of one batch have different widths {sorted(dims)}")
    f_dim = dims.pop() if dims else feat_dim
    if f_dim is None:
        raise ValueError("text-only batch: pass feat_dim (the model's region feature width)")
    b, t, r = batch_size, shape.text, shape.regions
    ids = np.full((b, t), pad_id, np.int32)
    text_mask = np.zeros((b, t), np.int32)
    feats = np.zeros((b, r, f_dim), np.float32)
    boxes = np.zeros((b, r, 4), np.float32)
    region_mask = np.zeros((b, r), np.int32)
    rows = []
    for i, (ex, reg) in enumerate(zip(examples, fetched)):
        ids[i], text_mask[i] = pad_text(ex.input_ids, t, pad_id)
        if reg is not None:
            feats[i], boxes[i], region_mask[i] = pad_regions(reg[0], reg[1], r)
        rows.append(pad_targets(ex.targets, shape.items, shape.tokens))
    rows += [empty_targets(names, shape.items, shape.tokens)] * (b - len(examples))
    targets = {name: np.stack([row[name] for row in rows]) for name in names}
    index = np.full(b, -1, np.int32)
    index[: len(examples)] = list(indices) if indices is not None else range(len(examples))
    targets[EXAMPLE_INDEX] = index
    first = np.zeros(b, bool)
    image = np.zeros(b, np.int32)
    offset = np.zeros(b, np.int32)
    for i, ex in enumerate(examples):
        first[i], image[i], offset[i] = ex.item_offset == 0, image_key(ex.image_id), ex.item_offset
    targets[ROW_FIRST], targets[ROW_IMAGE], targets[ROW_ITEM_OFFSET] = first, image, offset
    return Batch.create(ids, text_mask, feats, boxes, region_mask), targets
