"""What every region-feature reader shares: the record, the reader interface and its base class
(random access, the checks every record passes before it leaves a reader), the format constants.
The formats themselves are in the sibling modules; `value_jax.data.features` documents them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, runtime_checkable

import numpy as np

from value_jax.data.errors import DataFormatError, DataReport, PathLike

FORMATS = ("lxmert_tsv", "uniter_npz", "uniter_lmdb", "volta_lmdb")
TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
VOLTA_TSV_FIELDS = TSV_FIELDS + ("cls_prob", "attrs", "classes")
NUM_OBJECT_CLASSES = 1600  # VG objects, background excluded
FEATURE_DIM = 2048
INDEX_SUFFIX = ".idx.json"
FeatureReport = DataReport  # counts: images_without_features, boxes_dropped_by_conf_th

_INDEX_VERSION = 1
# Names the VOLTA H5->LMDB converter (and BUTD variants) use for the TSV fields.
_ALIASES = {
    "img_id": ("img_id", "image_id"),
    "img_h": ("img_h", "image_h"),
    "img_w": ("img_w", "image_w"),
    "num_boxes": ("num_boxes", "num_objects"),
    "objects_id": ("objects_id", "obj_id"),
    "objects_conf": ("objects_conf", "obj_conf"),
    "attrs_id": ("attrs_id", "attr_id"),
    "attrs_conf": ("attrs_conf", "attr_conf"),
    "boxes": ("boxes",),
    "features": ("features",),
    "cls_prob": ("cls_prob",),
}


@dataclasses.dataclass
class RegionRecord:
    """Detected regions of one image.

    Attributes:
      image_id: the id the reader was asked for.
      image_w, image_h: image size in pixels; both 1 when ``box_units == "normalized"``.
      boxes: [N, 4] float32 x1, y1, x2, y2, in pixels (or [0, 1] units, see ``box_units``).
      features: [N, D] float32 (D = 2048 for BUTD); float16 inputs are upcast.
      object_ids: [N] int64, 0-based over the 1600 VG classes (no background), or None.
      object_conf: [N] float32, or None.
      attr_ids, attr_conf: [N] int64 (0-based over the 400 VG attributes) / float32, or None.
      cls_prob: [N, 1601] float32 detector class distribution, background at column 0, or None.
      box_units: "pixels", or "normalized" when the source held no image size.
      extras: format-specific arrays outside the common view (UNITER: ``conf``, the detector's
        NMS max confidence that UNITER thresholds to choose the box count).
    """

    image_id: str
    image_w: int
    image_h: int
    boxes: np.ndarray
    features: np.ndarray
    object_ids: Optional[np.ndarray] = None
    object_conf: Optional[np.ndarray] = None
    attr_ids: Optional[np.ndarray] = None
    attr_conf: Optional[np.ndarray] = None
    cls_prob: Optional[np.ndarray] = None
    box_units: str = "pixels"
    extras: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.features)
        if self.features.ndim != 2 or self.boxes.shape != (n, 4):
            raise ValueError(
                f"image {self.image_id!r}: features {self.features.shape} and boxes "
                f"{self.boxes.shape} (expected [N, D] and [N, 4])"
            )
        for name in ("object_ids", "object_conf", "attr_ids", "attr_conf", "cls_prob"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(
                    f"image {self.image_id!r}: {name} has {len(arr)} rows, features {n}"
                )
        if self.box_units not in ("pixels", "normalized"):
            raise ValueError(f"box_units {self.box_units!r} (expected 'pixels' or 'normalized')")

    @property
    def num_boxes(self) -> int:
        return len(self.features)

    def normalized_boxes(self) -> np.ndarray:
        """[N, 4] float32 ``x1/W, y1/H, x2/W, y2/H``: the first four box inputs of both models."""
        if self.box_units == "normalized" or self.num_boxes == 0:
            return self.boxes.astype(np.float32, copy=True)
        if not (self.image_w > 0 and self.image_h > 0):
            raise ValueError(
                f"image {self.image_id!r}: size {self.image_w}x{self.image_h} "
                "unknown, cannot normalise its boxes"
            )
        scale = np.array([self.image_w, self.image_h, self.image_w, self.image_h], np.float64)
        return (self.boxes / scale).astype(np.float32)


@runtime_checkable
class RegionFeatureReader(Protocol):
    """Random access to the regions of each image; a context manager that closes its files."""

    format: str
    path: str
    report: DataReport

    def image_ids(self) -> list[str]: ...
    def __getitem__(self, image_id: str) -> RegionRecord: ...
    def get(self, image_id: str, report: Optional[DataReport] = None) -> Optional[RegionRecord]: ...
    def __contains__(self, image_id: object) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "RegionFeatureReader": ...
    def __exit__(self, *exc) -> None: ...


class ImageNotFoundError(KeyError):
    """A requested image has no features; ``str()`` is the plain message (KeyError quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def uniter_name_to_image_id(name: str) -> str:
    """``flickr30k_1000092795.npz`` -> ``1000092795``: drops ``.npz`` and the prefix up to the
    last underscore (COCO: ``coco_val2014_000000391895.npz`` -> ``000000391895``)."""
    stem = name[:-4] if name.endswith(".npz") else name
    return stem.rsplit("_", 1)[-1]


# --------------------------------------------------------------------------- base reader


class _Reader:
    format = ""

    def __init__(
        self,
        path: PathLike,
        keys: Iterable[Any],
        key_to_image_id: Optional[Callable[[str], str]],
        feature_dim: Optional[int] = None,
    ):
        self.path = os.fspath(path)
        self._id_to_key: dict[str, Any] = {}
        for key in keys:
            name = key.decode("utf-8") if isinstance(key, bytes) else str(key)
            image_id = key_to_image_id(name) if key_to_image_id else name
            if image_id in self._id_to_key:
                raise DataFormatError(
                    self.path,
                    f"keys {self._id_to_key[image_id]!r} and {key!r} "
                    f"both give image id {image_id!r}",
                    "one key per image id (check key_to_image_id)",
                )
            self._id_to_key[image_id] = key
        self.report = DataReport()
        # The width every image must have: `feature_dim`, else the first non-empty image's.
        self._width, self._width_from = feature_dim, f"feature_dim = {feature_dim}"

    def image_ids(self) -> list[str]:
        return list(self._id_to_key)

    def __len__(self) -> int:
        return len(self._id_to_key)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._id_to_key))

    def __contains__(self, image_id: object) -> bool:
        return _as_id(image_id) in self._id_to_key

    def __getitem__(self, image_id) -> RegionRecord:
        image_id = _as_id(image_id)
        key = self._id_to_key.get(image_id)
        if key is None:
            raise ImageNotFoundError(self._missing_message(image_id))
        rec, nonfinite = self._checked(image_id, key, self.report)
        if nonfinite:
            raise DataFormatError(
                found=f"image {image_id!r}: {nonfinite}",
                expected="finite boxes and features (reader.get() counts and skips such images)",
                **self._where(key),
            )
        return rec

    def get(self, image_id, report: Optional[DataReport] = None) -> Optional[RegionRecord]:
        """The record, or None if the id is absent (counted as ``images_without_features``) or
        the record holds a non-finite value (counted as ``images_with_nonfinite_features``).

        Counts (also boxes_dropped_by_conf_th, images_without_size) go to ``report``, or to the
        reader's own ``self.report`` when none is given.
        """
        report = self.report if report is None else report
        image_id = _as_id(image_id)
        if image_id not in self._id_to_key:
            report.count("images_without_features", example=image_id)
            return None
        key = self._id_to_key[image_id]
        rec, nonfinite = self._checked(image_id, key, report)
        if nonfinite:
            report.count(
                "images_with_nonfinite_features",
                example=f"{_place(self._where(key))} image {image_id!r}: {nonfinite}",
            )
            return None
        return rec

    def _checked(self, image_id: str, key: Any, report: DataReport) -> tuple[RegionRecord, str]:
        """The record and a description of its first non-finite value ("" if none); raises on a
        feature width that differs from the reader's (see the module docstring)."""
        rec = self._load(image_id, key, report)
        if not rec.num_boxes:
            if self._width is not None:  # keep [0, D] shapes consistent within the reader
                rec.features = np.zeros((0, self._width), np.float32)
        else:
            width = rec.features.shape[1]
            if self._width is None:
                self._width = width
                self._width_from = f"image {image_id!r} at {_place(self._where(key))}"
            elif width != self._width:
                raise DataFormatError(
                    found=f"image {image_id!r} has {width} feature values per box",
                    expected=f"{self._width}, as {self._width_from}",
                    **self._where(key),
                )
        return rec, _nonfinite(rec)

    def _where(self, key: Any) -> dict:
        """``DataFormatError`` place arguments (path and line or key) of one stored image."""
        raise NotImplementedError

    def _missing_message(self, image_id: str) -> str:
        examples = ", ".join(repr(i) for i in list(self._id_to_key)[:3])
        msg = (
            f"image id {image_id!r} not in {self.format} features {self.path} "
            f"({len(self)} images, e.g. {examples})"
        )
        if any(
            str(i).endswith(f"_{image_id}.npz") or str(i) == f"{image_id}.npz"
            for i in self._id_to_key
        ):
            msg += (
                "; the ids are UNITER npz names: open with "
                "key_to_image_id=uniter_name_to_image_id to use bare ids"
            )
        return msg

    def _load(self, image_id: str, key: Any, report: DataReport) -> RegionRecord:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path!r}: {len(self)} images>"


def _place(where: dict) -> str:
    """``path:line`` or ``path [key]``, as a ``DataFormatError`` prints the place."""
    text = where["path"]
    if where.get("line") is not None:
        text += f":{where['line']}"
    if where.get("key") is not None:
        text += f" [{where['key']}]"
    return text


_CHECKED_FIELDS = ("boxes", "features", "cls_prob", "object_conf", "attr_conf")


def _nonfinite(rec: RegionRecord) -> str:
    """``"features: 3 non-finite values, first nan at box 7"``, or "" when all are finite."""
    for name in _CHECKED_FIELDS:
        arr = getattr(rec, name)
        if arr is None or arr.size == 0:
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            first = np.argwhere(bad)[0]
            return (
                f"{name}: {int(bad.sum())} non-finite value(s), first "
                f"{arr[tuple(first)]} at box {int(first[0])}"
            )
    return ""


def _as_id(image_id: object) -> str:
    # VOLTA and Flickr30k code pass ints; TSV / LMDB keys are text.
    if isinstance(image_id, bytes):
        return image_id.decode("utf-8")
    if isinstance(image_id, (int, np.integer)):
        return str(int(image_id))
    return str(image_id)


class _LmdbReader(_Reader):
    def _open_env(self, path: str):
        import lmdb

        # As VOLTA opens them: shared read-only files, no lock file, no OS read-ahead.
        self._env = lmdb.open(
            path,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            subdir=os.path.isdir(path),
            max_readers=512,
        )

    def _get(self, key: bytes) -> bytes:
        with self._env.begin(write=False) as txn:
            return txn.get(key)

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None
