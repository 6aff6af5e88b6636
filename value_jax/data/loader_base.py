"""The loader machinery every dataset loader builds on: the reader for a features path, pixel boxes,
the per-image region cache, `ExampleLoader` (plan once, collate per batch) and `_FeatureLoader`
(an `ExampleLoader` that owns a features reader), with the checks shared by the `prepare_*`
functions. Moved out of `value_jax.data.loaders`, which re-exports every name here; what that
module says of loaders (deterministic preparation, `loader.report`, `NoExamplesError`) holds for
all of them.
"""

from __future__ import annotations

import collections
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from value_jax.data import batch_plan as BP
from value_jax.data import collate as C
from value_jax.data.errors import DataReport, NoExamplesError, PathLike, report_or_new
from value_jax.data.features import (
    RegionFeatureReader,
    RegionRecord,
    detect_format,
    open_region_features,
    uniter_name_to_image_id,
)

# ---------------------------------------------------------------------------------------------
# Region features.


def open_features(
    features: Union[PathLike, RegionFeatureReader], options: Optional[dict] = None
) -> RegionFeatureReader:
    """A reader for a path (or the reader itself). UNITER databases name images by npz file
    (`flickr30k_1000092795.npz`), so they default to `key_to_image_id=uniter_name_to_image_id`."""
    if isinstance(features, RegionFeatureReader):
        return features
    options = dict(options or {})
    fmt = options.pop("format", None) or detect_format(features)
    if fmt.startswith("uniter") and "key_to_image_id" not in options:
        options["key_to_image_id"] = uniter_name_to_image_id
    return open_region_features(features, fmt, **options)


def pixel_boxes(rec: RegionRecord, width: int, height: int, report: DataReport) -> np.ndarray:
    """`[R, 4]` float64 absolute boxes. Records without an image size (UNITER npz) are scaled by
    the annotation's size; a record whose size differs from the annotation's is counted
    (`image_size_mismatch`) and keeps its own pixels."""
    if rec.box_units == "normalized":
        return rec.boxes.astype(np.float64) * np.array([width, height, width, height], np.float64)
    if (rec.image_w, rec.image_h) != (width, height):
        report.count(
            "image_size_mismatch",
            example=f"{rec.image_id}: features {rec.image_w}x{rec.image_h}, "
            f"annotation {width}x{height}",
        )
    return rec.boxes.astype(np.float64)


class _RegionCache:
    """`image_id -> (features, normalised boxes)` with a small LRU (captions of one image share
    one read)."""

    def __init__(self, reader: RegionFeatureReader, size: int = 64):
        self.reader, self.size = reader, size
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        rec = self.reader[image_id]
        value = (rec.features, rec.normalized_boxes())
        self._cache[image_id] = value
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return value


# ---------------------------------------------------------------------------------------------
# The generic loader.


class ExampleLoader:
    """Batches of prepared examples: an iterable of `(Batch, targets)` with `__len__`.

    Args:
      examples: prepared examples (their order is kept inside each bucket).
      batch_size: rows per batch; the last batch of a bucket is padded with masked rows.
      buckets: static sizes (`collate.Buckets`), or "fit": sizes fitted to these examples
        (`bucketing.fit_buckets`: the least padding for a small grid of shapes).
      regions: `image_id -> (features, normalised boxes)` for examples that do not carry them.
      feat_dim: region feature width, needed for text-only examples.
      overflow: "error" or "truncate" for examples larger than the largest bucket.
      report: counts go here (also `loader.report`).
    """

    def __init__(
        self,
        examples: Sequence[C.Example],
        batch_size: int,
        *,
        buckets: Union[C.Buckets, str] = C.DEFAULT_BUCKETS,
        regions: Optional[C.RegionFetch] = None,
        feat_dim: Optional[int] = None,
        overflow: str = "error",
        report: Optional[DataReport] = None,
    ):
        self.report = report_or_new(report)
        self.examples = list(examples)
        self.batch_size = batch_size
        if isinstance(buckets, str):
            if buckets != "fit":
                raise ValueError(f"buckets must be a collate.Buckets or 'fit', got {buckets!r}")
            from value_jax.data.bucketing import fit_buckets

            buckets = fit_buckets(self.examples, batch_size)
        self.buckets = buckets
        self.feat_dim = feat_dim
        self._regions = regions
        self.plans = BP.plan_batches(self.examples, batch_size, buckets, overflow, self.report)

    def __len__(self) -> int:
        return len(self.plans)

    def __iter__(self) -> Iterator[tuple]:
        for i in range(len(self.plans)):
            yield self.collate_plan(i)

    def collate_plan(self, i: int) -> tuple:
        """Batch `i` of the plan alone (a process of a multi-process run collates only its own)."""
        plan = self.plans[i]
        return C.collate(
            plan.examples,
            plan.shape,
            self.batch_size,
            regions=self._regions,
            feat_dim=self.feat_dim,
            indices=plan.indices,
        )

    @property
    def shapes(self) -> list[C.BatchShape]:
        """The distinct static shapes of this loader's batches (one compilation each)."""
        return sorted({p.shape for p in self.plans})

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _FeatureLoader(ExampleLoader):
    def _open(self, features, features_options):
        self._owns_reader = not isinstance(features, RegionFeatureReader)
        self.features = open_features(features, features_options)
        return self.features

    def close(self) -> None:
        if getattr(self, "_owns_reader", False):
            self.features.close()

    def _require_examples(self, examples, what: str, report: DataReport, max_images) -> None:
        try:
            _require_examples(
                examples, f"{what} with features {self.features.path}", report, max_images
            )
        except NoExamplesError:
            self.close()
            raise


def _require_examples(
    examples: Sequence, what: str, report: DataReport, max_images: Optional[int] = None
) -> None:
    """Raises `NoExamplesError` (with the report) when filtering left nothing: an empty loader
    would otherwise fail far away, in the probes' accumulators."""
    if not examples:
        hint = (
            f"max_images={max_images} keeps no image"
            if max_images is not None and max_images <= 0
            else ""
        )
        raise NoExamplesError(what, report, hint)


def _check_text_len(max_text_len: int, buckets) -> None:
    if isinstance(buckets, str):  # fitted to the examples: any length they have fits
        buckets = C.DEFAULT_BUCKETS
    if not 2 <= max_text_len <= buckets.text[-1]:
        raise ValueError(
            f"max_text_len={max_text_len} must lie in [2, {buckets.text[-1]}] (the "
            "largest text bucket); widen Buckets.text for longer inputs"
        )
