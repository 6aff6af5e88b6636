"""Region features from the bottom-up-attention (BUTD) detector, behind one random-access reader.

    with open_region_features("flickr30k_obj36.tsv") as feats:   # format detected from the path
        rec = feats["1000092795"]                                # RegionRecord, read on demand
        rec.boxes                  # [N, 4] float32, absolute pixels x1, y1, x2, y2
        rec.normalized_boxes()     # [N, 4] x1/W, y1/H, x2/W, y2/H (UNITER and LXMERT inputs)

Nothing is loaded up front: a TSV is indexed by byte offset once, an LMDB is read key by key, an
npz directory file by file. Formats (REFERENCE.md §5.3, §4.3, §7):

``lxmert_tsv``  airsplay/lxmert ``load_obj_tsv``. One image per line, 10 tab-separated fields
    ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes,
    features`` (height BEFORE width), CRLF line ends, arrays as base64 of little-endian int64 /
    float32 buffers. VOLTA's extractor appends ``cls_prob, attrs, classes`` (13 fields); those
    files are read too, ``cls_prob`` included. The offset index is one streaming pass, kept next to
    the file as ``<file>.idx.json`` (or in memory when that place is not writable) and rebuilt when
    the file's size or mtime changes.
``uniter_npz``  a directory of ``<prefix><image_id>.npz`` as the BUTD docker writes them: keys
    ``features`` [N, 2048], ``norm_bb`` [N, 6] = ``x1/W, y1/H, x2/W, y2/H, w/W, h/H``, ``conf``
    [N] and ``soft_labels`` [N, 1601], all float16. The image size is not stored, so
    ``image_sizes={image_id: (width, height)}`` restores pixel boxes; without it a record keeps
    ``image_w = image_h = 1``, ``box_units = "normalized"`` and boxes in [0, 1] units. IoU and
    IoT are scale-free, so they hold only if the gold boxes are normalised the same way
    (divide them by the same W, H); ``normalized_boxes()`` is the same in both cases.
``uniter_lmdb`` UNITER ``DetectFeatLmdb``: an LMDB directory, ``__keys__`` a JSON list of npz
    names, each value ``msgpack`` of the npz dict with numpy arrays as msgpack-numpy maps
    (``nd, type, kind, shape, data``) or, in the ``*_compressed`` databases, ``np.savez_compressed``
    bytes (an extra ``allow_pickle`` member written by old numpy is ignored). UNITER's converter
    already kept only the first ``nbb = clip(#(conf > conf_th), min_bb, max_bb)`` boxes; pass
    ``conf_th`` to apply that cut again (to an ``all`` database or an npz directory).
``volta_lmdb``  e-bug/volta ``ImageFeaturesH5Reader``: key ``keys`` a pickled list of id bytes,
    each value a pickled dict. From the TSV converter: the TSV fields as strings (base64 arrays)
    plus ``cls_prob`` [N, 1601]; from the H5 converter: raw arrays under ``obj_id, obj_conf,
    attr_id, attr_conf, boxes, features, img_h, img_w``. Both are accepted. These values are
    unpickled: open only feature files you trust, as VOLTA itself does.

UNITER names an image by its npz file name (``flickr30k_1000092795.npz``); pass
``key_to_image_id=uniter_name_to_image_id`` to look records up by the bare id.

Class conventions: ``object_ids`` are 0-based over the 1600 VG classes (argmax over
``cls_prob[:, 1:]``, as the BUTD extractor writes them); ``cls_prob`` keeps the background at
column 0, so the probability of ``object_ids[i]`` is ``cls_prob[i, object_ids[i] + 1]``. VOLTA's
``xent_1601`` indexes the 1601 logits with ``object_ids`` directly, one class off (REFERENCE §3.1).
For UNITER, ``object_ids`` / ``object_conf`` are derived from ``soft_labels`` that way (float16,
so near-ties may resolve differently from the detector's float32).

Missing images: ``reader[image_id]`` raises ``KeyError`` saying where it looked;
``reader.get(image_id, report)`` returns None and counts ``images_without_features`` in a
``DataReport``. Malformed data raises ``DataFormatError`` naming file, line or key, and field.

Every record is checked before it leaves a reader (``_Reader._checked``), because one NaN in a
feature row turns every downstream mean into NaN without an error:

- a non-finite value (NaN, +-Inf; float16 overflow gives Inf) in ``boxes``, ``features``,
  ``cls_prob``, ``object_conf`` or ``attr_conf``: ``get`` drops the whole image and counts it as
  ``images_with_nonfinite_features`` (examples name file:line or [key], image id, field and box);
  ``reader[image_id]`` raises ``DataFormatError``. Such an image never reaches a batch.
- an image size that is not positive (``img_w``/``img_h`` of 0 in a TSV line or VOLTA value, or
  in the ``image_sizes`` given for UNITER files) raises ``DataFormatError`` naming the file and
  image id: boxes are normalised by the size, so no number computed from them could be right,
  and a file whose extractor wrote a 0x0 size is suspect as a whole.
- the feature width (values per box) must be the same for every image of a reader: the
  ``feature_dim`` option when given, else the width of the first image read. A mismatch raises
  ``DataFormatError`` naming file, image id, the expected width (and where it came from) and the
  width found. Images with no boxes carry no width and are not compared.
"""
from __future__ import annotations

import base64
import binascii
import collections
import csv
import dataclasses
import io
import json
import os
import pickle
import threading
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, runtime_checkable

import numpy as np

from value_jax.data.errors import DataFormatError, DataReport, PathLike

FORMATS = ("lxmert_tsv", "uniter_npz", "uniter_lmdb", "volta_lmdb")
TSV_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
              "num_boxes", "boxes", "features")
VOLTA_TSV_FIELDS = TSV_FIELDS + ("cls_prob", "attrs", "classes")
NUM_OBJECT_CLASSES = 1600   # VG objects, background excluded
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
            raise ValueError(f"image {self.image_id!r}: features {self.features.shape} and boxes "
                             f"{self.boxes.shape} (expected [N, D] and [N, 4])")
        for name in ("object_ids", "object_conf", "attr_ids", "attr_conf", "cls_prob"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"image {self.image_id!r}: {name} has {len(arr)} rows, "
                                 f"features {n}")
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
            raise ValueError(f"image {self.image_id!r}: size {self.image_w}x{self.image_h} "
                             "unknown, cannot normalise its boxes")
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

    def __init__(self, path: PathLike, keys: Iterable[Any],
                 key_to_image_id: Optional[Callable[[str], str]], feature_dim: Optional[int] = None):
        self.path = os.fspath(path)
        self._id_to_key: dict[str, Any] = {}
        for key in keys:
            name = key.decode("utf-8") if isinstance(key, bytes) else str(key)
            image_id = key_to_image_id(name) if key_to_image_id else name
            if image_id in self._id_to_key:
                raise DataFormatError(self.path, f"keys {self._id_to_key[image_id]!r} and {key!r} "
                                      f"both give image id {image_id!r}",
                                      "one key per image id (check key_to_image_id)")
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
            raise DataFormatError(found=f"image {image_id!r}: {nonfinite}",
                                  expected="finite boxes and features (reader.get() counts "
                                           "and skips such images)", **self._where(key))
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
            report.count("images_with_nonfinite_features",
                         example=f"{_place(self._where(key))} image {image_id!r}: {nonfinite}")
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
                    expected=f"{self._width}, as {self._width_from}", **self._where(key))
        return rec, _nonfinite(rec)

    def _where(self, key: Any) -> dict:
        """``DataFormatError`` place arguments (path and line or key) of one stored image."""
        raise NotImplementedError

    def _missing_message(self, image_id: str) -> str:
        examples = ", ".join(repr(i) for i in list(self._id_to_key)[:3])
        msg = (f"image id {image_id!r} not in {self.format} features {self.path} "
               f"({len(self)} images, e.g. {examples})")
        if any(str(i).endswith(f"_{image_id}.npz") or str(i) == f"{image_id}.npz"
               for i in self._id_to_key):
            msg += ("; the ids are UNITER npz names: open with "
                    "key_to_image_id=uniter_name_to_image_id to use bare ids")
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
            return (f"{name}: {int(bad.sum())} non-finite value(s), first "
                    f"{arr[tuple(first)]} at box {int(first[0])}")
    return ""


def _as_id(image_id: object) -> str:
    # VOLTA and Flickr30k code pass ints; TSV / LMDB keys are text.
    if isinstance(image_id, bytes):
        return image_id.decode("utf-8")
    if isinstance(image_id, (int, np.integer)):
        return str(int(image_id))
    return str(image_id)


# --------------------------------------------------------------------------- field decoding


def _pick(item: Mapping, name: str) -> tuple[Optional[str], Any]:
    for alias in _ALIASES[name]:
        if alias in item:
            return alias, item[alias]
    return None, None


def _int_field(value: Any, name: str, where: dict) -> int:
    try:
        if isinstance(value, bytes):
            value = value.decode("ascii")
        if isinstance(value, str):
            return int(value.strip())
        arr = np.asarray(value)
        if arr.size == 1 and float(arr.reshape(())) == int(arr.reshape(())):
            return int(arr.reshape(()))
    except (ValueError, UnicodeDecodeError, TypeError):
        pass
    raise DataFormatError(found=f"field {name!r} = {_short(value)}", expected="an integer", **where)


def _array_field(value: Any, name: str, dtype, where: dict, num_boxes: int,
                 width: Optional[int]) -> np.ndarray:
    """[num_boxes] (width None) or [num_boxes, width] (width -1: inferred) array of ``dtype``.

    ``value`` is base64 text/bytes of a little-endian buffer (TSV, VOLTA-from-TSV) or an array
    (VOLTA-from-H5). The result owns its memory and is writable.
    """
    dtype = np.dtype(dtype)
    if isinstance(value, (str, bytes)):
        if value[:2] in ("b'", 'b"', b"b'", b'b"'):
            raise DataFormatError(
                found=f"field {name!r} holds a Python bytes literal {_short(value)}",
                expected="bare base64 text (the writer passed bytes to csv under Python 3; "
                         "decode the base64 to str before writing)", **where)
        try:
            buf = _b64decode_strict(value)
        except (binascii.Error, ValueError) as e:
            raise DataFormatError(
                found=f"field {name!r} is not valid base64 ({e}; {len(value)} characters, "
                      f"ends {_short(value[-12:])})",
                expected="base64 of a little-endian buffer; a truncated line looks like this",
                **where) from None
        if len(buf) % dtype.itemsize:
            raise DataFormatError(found=f"field {name!r} decodes to {len(buf)} bytes",
                                  expected=f"a multiple of {dtype.itemsize} ({dtype.name})",
                                  **where)
        flat = np.frombuffer(buf, dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        flat = np.array(value).reshape(-1)
        if flat.dtype.kind not in "biuf":
            raise DataFormatError(found=f"field {name!r} of dtype {flat.dtype}",
                                  expected=f"numbers ({dtype.name})", **where)
        flat = flat.astype(dtype)
    if width is None:
        need = num_boxes
    elif width == -1:
        if num_boxes == 0:
            if flat.size:
                raise DataFormatError(found=f"field {name!r} holds {flat.size} values",
                                      expected="none, since num_boxes = 0", **where)
            return flat.reshape(0, 0)
        if flat.size % num_boxes:
            raise DataFormatError(found=f"field {name!r} holds {flat.size} {dtype.name} values",
                                  expected=f"a multiple of num_boxes = {num_boxes}", **where)
        return flat.reshape(num_boxes, flat.size // num_boxes)
    else:
        need = num_boxes * width
    if flat.size != need:
        per = f" ({flat.size / (width or 1):g} boxes)" if width else ""
        raise DataFormatError(
            found=f"field {name!r} holds {flat.size} {dtype.name} values{per}",
            expected=f"{need} for num_boxes = {num_boxes}" + (f" x {width}" if width else ""),
            **where)
    return flat if width is None else flat.reshape(num_boxes, width)


def _b64decode_strict(value) -> bytes:
    try:  # Python >= 3.11: strict and ~25% faster than b64decode(validate=True)
        return binascii.a2b_base64(value, strict_mode=True)
    except TypeError:
        return base64.b64decode(value, validate=True)


def _count_values(value: Any, dtype) -> int:
    if isinstance(value, (str, bytes)):
        # base64: 4 characters per 3 bytes, minus padding
        text = value if isinstance(value, bytes) else value.encode("ascii", "replace")
        text = text.strip()
        return (len(text) * 3 // 4 - text[-2:].count(b"=")) // np.dtype(dtype).itemsize
    return int(np.asarray(value).size)


def _short(value: Any, n: int = 24) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _record_from_item(item: Mapping, image_id: str, where: dict) -> RegionRecord:
    """A RegionRecord from LXMERT-TSV-named fields (TSV line, or VOLTA's pickled dict)."""
    def required(name):
        alias, value = _pick(item, name)
        if alias is None:
            raise DataFormatError(found=f"no field {name!r} (has {sorted(map(str, item))})",
                                  expected=" or ".join(map(repr, _ALIASES[name])), **where)
        return alias, value

    image_h = _int_field(required("img_h")[1], "img_h", where)
    image_w = _int_field(required("img_w")[1], "img_w", where)
    if image_w <= 0 or image_h <= 0:
        raise DataFormatError(found=f"image {image_id!r}: img_w x img_h = {image_w}x{image_h}",
                              expected="a positive image size (boxes are normalised by it)",
                              **where)
    alias, value = _pick(item, "num_boxes")
    if alias is not None:
        num_boxes = _int_field(value, alias, where)
    else:  # H5 variant: the count is the number of boxes
        num_boxes = _count_values(required("boxes")[1], np.float32) // 4
    if num_boxes < 0:
        raise DataFormatError(found=f"num_boxes = {num_boxes}", expected=">= 0", **where)

    def optional(name, dtype, width):
        alias, value = _pick(item, name)
        if alias is None:
            return None
        return _array_field(value, alias, dtype, where, num_boxes, width)

    boxes = _array_field(required("boxes")[1], "boxes", np.float32, where, num_boxes, 4)
    features = _array_field(required("features")[1], "features", np.float32, where, num_boxes, -1)
    if num_boxes == 0:
        features = np.zeros((0, FEATURE_DIM), np.float32)
    cls_prob = optional("cls_prob", np.float32, -1)
    if cls_prob is not None and num_boxes == 0:
        cls_prob = cls_prob.reshape(0, NUM_OBJECT_CLASSES + 1)
    object_ids = optional("objects_id", np.int64, None)
    object_conf = optional("objects_conf", np.float32, None)
    if object_ids is None and cls_prob is not None and cls_prob.shape[1] > 1:
        object_ids, object_conf = _argmax_foreground(cls_prob)
    return RegionRecord(image_id=image_id, image_w=image_w, image_h=image_h, boxes=boxes,
                        features=features, object_ids=object_ids, object_conf=object_conf,
                        attr_ids=optional("attrs_id", np.int64, None),
                        attr_conf=optional("attrs_conf", np.float32, None), cls_prob=cls_prob)


def _argmax_foreground(cls_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based VG class and its probability, background (column 0) excluded, as BUTD does."""
    fg = cls_prob[:, 1:]
    ids = fg.argmax(axis=1).astype(np.int64)
    return ids, fg[np.arange(len(fg)), ids].astype(np.float32)


# --------------------------------------------------------------------------- LXMERT TSV


def _raise_csv_field_limit() -> None:
    # The features field is ~400 kB of base64; csv's default limit is 128 kB.
    if csv.field_size_limit() < 2**31 - 1:
        csv.field_size_limit(2**31 - 1)


class LxmertTsvReader(_Reader):
    """LXMERT / VOLTA TSV with random access through a byte-offset index.

    Args:
      path: the ``.tsv`` file.
      index_path: where to keep the index; default ``<path>.idx.json``. ``cache_index=False`` keeps
        it in memory only. An index whose recorded size or mtime differs from the file is rebuilt.
      feature_dim: if given, every line must have this many feature values per box.

    Attributes:
      index_status: "loaded" (from the index file) or "built" (one pass over the file).
      index_file: the index file used or written, or None when the index lives in memory only.
    """

    format = "lxmert_tsv"

    def __init__(self, path: PathLike, *, index_path: Optional[PathLike] = None,
                 cache_index: bool = True, feature_dim: Optional[int] = None):
        _raise_csv_field_limit()
        path = os.fspath(path)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            stat = os.fstat(self._fd)
            self.index_file = (os.fspath(index_path) if index_path is not None
                               else path + INDEX_SUFFIX) if cache_index else None
            index = self._load_index(stat) if self.index_file else None
            self.index_status = "loaded" if index else "built"
            if index is None:
                index = _build_tsv_index(path, stat)
                if self.index_file and not _write_json_atomic(self.index_file, index):
                    self.index_file = None
        except BaseException:
            os.close(self._fd)
            raise
        self._offsets = np.asarray(index["offsets"], np.int64)
        self._lengths = np.asarray(index["lengths"], np.int64)
        self._lines = np.asarray(index["lines"], np.int64)
        self._lock = threading.Lock()
        super().__init__(path, [], None, feature_dim)
        self._id_to_key = dict(zip(index["ids"], range(len(index["ids"]))))

    def _load_index(self, stat) -> Optional[dict]:
        try:
            with open(self.index_file, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError):
            return None
        if (not isinstance(index, dict) or index.get("version") != _INDEX_VERSION
                or index.get("size") != stat.st_size or index.get("mtime_ns") != stat.st_mtime_ns):
            return None
        return index

    def _read(self, row: int) -> bytes:
        offset, length = int(self._offsets[row]), int(self._lengths[row])
        if hasattr(os, "pread"):
            data = os.pread(self._fd, length, offset)
        else:
            with self._lock:
                os.lseek(self._fd, offset, os.SEEK_SET)
                data = os.read(self._fd, length)
        if len(data) != length:
            raise DataFormatError(self.path, f"{len(data)} bytes at offset {offset}",
                                  f"{length} (the file changed after it was indexed)",
                                  line=int(self._lines[row]))
        return data

    def _where(self, row: int) -> dict:
        return {"path": self.path, "line": int(self._lines[row])}

    def _load(self, image_id: str, row: int, report: DataReport) -> RegionRecord:
        where = self._where(row)
        data = self._read(row).rstrip(b"\r\n")
        try:
            if b'"' not in data:
                # Base64 and numbers never need csv quoting, and bytes decode faster than str.
                fields = data.split(b"\t")
                fields[0] = fields[0].decode("utf-8")
            else:
                fields = next(csv.reader([data.decode("utf-8")], delimiter="\t"))
        except UnicodeDecodeError as e:
            raise DataFormatError(found=f"bytes that are not UTF-8 ({e})", expected="text",
                                  **where) from None
        except csv.Error as e:
            raise DataFormatError(found=f"unparsable line ({e})", expected="tab-separated fields",
                                  **where) from None
        if len(fields) == len(TSV_FIELDS):
            item = dict(zip(TSV_FIELDS, fields))
        elif len(fields) == len(VOLTA_TSV_FIELDS):
            item = dict(zip(VOLTA_TSV_FIELDS, fields))
        else:
            raise DataFormatError(
                found=f"{len(fields)} tab-separated fields",
                expected=f"10 ({', '.join(TSV_FIELDS)}) or 13 (VOLTA adds cls_prob, attrs, "
                         "classes)", **where)
        if item["img_id"] != image_id:
            raise DataFormatError(found=f"img_id {item['img_id']!r}",
                                  expected=f"{image_id!r} (the file changed after it was indexed)",
                                  **where)
        return _record_from_item(item, image_id, where)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _build_tsv_index(path: str, stat) -> dict:
    """One streaming pass: id, byte offset, length and 1-based line number of every record.

    Blank lines are skipped, as csv.DictReader skips them; a repeated id keeps its last line (what
    VOLTA's TSV->LMDB conversion keeps) and is warned about.
    """
    ids, offsets, lengths, lines = [], [], [], []
    seen: dict[str, int] = {}
    duplicates = []
    offset = 0
    with open(path, "rb", buffering=1 << 20) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                tab = line.find(b"\t")
                if tab <= 0:
                    raise DataFormatError(path, "a line without a leading img_id field",
                                          "img_id<TAB>img_h<TAB>...", line=lineno)
                try:
                    image_id = line[:tab].decode("utf-8")
                    if image_id.startswith('"'):  # csv quoted it: it holds a quote or a tab
                        _raise_csv_field_limit()
                        image_id = next(csv.reader([line.decode("utf-8")], delimiter="\t"))[0]
                except UnicodeDecodeError:
                    raise DataFormatError(path, f"img_id {line[:tab][:40]!r}",
                                          "UTF-8 text", line=lineno) from None
                if image_id in seen:
                    duplicates.append((image_id, lines[seen[image_id]], lineno))
                    row = seen[image_id]
                    offsets[row], lengths[row], lines[row] = offset, len(line), lineno
                else:
                    seen[image_id] = len(ids)
                    ids.append(image_id)
                    offsets.append(offset)
                    lengths.append(len(line))
                    lines.append(lineno)
            offset += len(line)
    if duplicates:
        shown = "; ".join(f"{i!r} at lines {a} and {b}" for i, a, b in duplicates[:3])
        warnings.warn(f"{path}: {len(duplicates)} repeated img_id(s), last line kept: {shown}",
                      stacklevel=3)
    if offset != stat.st_size:
        raise DataFormatError(path, f"{offset} bytes read", f"{stat.st_size} (file changed "
                              "while being indexed)")
    return {"version": _INDEX_VERSION, "source": os.path.basename(path), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "ids": ids, "offsets": offsets, "lengths": lengths,
            "lines": lines}


def _write_json_atomic(path: str, obj: dict) -> bool:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"))
        os.replace(tmp, path)
        return True
    except OSError:  # read-only dataset directory: keep the index in memory
        try:
            os.remove(tmp)
        except OSError:
            pass
        return False


# --------------------------------------------------------------------------- UNITER


class _UniterMixin:
    def _init_uniter(self, image_sizes, conf_th, min_bb, max_bb):
        self._image_sizes = dict(image_sizes) if image_sizes is not None else None
        for image_id, size in (self._image_sizes or {}).items():
            if len(size) != 2 or not all(v > 0 for v in size):
                raise ValueError(f"image_sizes[{image_id!r}] = {size!r} for {self.path} (expected a "
                                 "positive (width, height): boxes are scaled by it)")
        self._conf_th, self._min_bb, self._max_bb = conf_th, min_bb, max_bb

    def _uniter_record(self, image_id: str, dump: Mapping, where: dict,
                       report: DataReport) -> RegionRecord:
        """``features, norm_bb, conf, soft_labels`` (UNITER's npz keys) -> RegionRecord."""
        for name in ("features", "norm_bb"):
            if name not in dump:
                raise DataFormatError(found=f"no {name!r} (has {sorted(dump)})",
                                      expected="UNITER keys features, norm_bb, conf, soft_labels",
                                      **where)
        features = np.asarray(dump["features"]).astype(np.float32)
        norm_bb = np.asarray(dump["norm_bb"]).astype(np.float32)
        if features.ndim != 2 or norm_bb.ndim != 2 or norm_bb.shape[0] != features.shape[0] \
                or norm_bb.shape[1] < 4:
            raise DataFormatError(found=f"features {features.shape}, norm_bb {norm_bb.shape}",
                                  expected="[N, D] and [N, 6]", **where)
        n = features.shape[0]
        conf = dump.get("conf")
        conf = None if conf is None else np.asarray(conf).astype(np.float32).reshape(-1)
        soft = dump.get("soft_labels")
        soft = None if soft is None else np.asarray(soft).astype(np.float32)
        if conf is not None and conf.shape != (n,):
            raise DataFormatError(found=f"conf {conf.shape}", expected=f"({n},)", **where)
        if soft is not None and (soft.ndim != 2 or len(soft) != n):
            raise DataFormatError(found=f"soft_labels {soft.shape}", expected=f"[{n}, 1601]",
                                  **where)
        if self._conf_th is not None:
            if conf is None:
                raise DataFormatError(found="no 'conf'", expected="conf, since conf_th is set",
                                      **where)
            keep = uniter_num_bb(conf, self._conf_th, self._min_bb, self._max_bb)
            if keep < n:
                report.count("boxes_dropped_by_conf_th", n - keep, example=image_id)
            features, norm_bb, n = features[:keep], norm_bb[:keep], min(keep, n)
            conf = conf[:keep]
            soft = None if soft is None else soft[:keep]
        size = None if self._image_sizes is None else self._image_sizes.get(image_id)
        if size is not None:
            width, height = (int(v) for v in size)
            boxes = norm_bb[:, :4] * np.array([width, height, width, height], np.float32)
            units = "pixels"
        else:
            if self._image_sizes is not None:
                report.count("images_without_size", example=image_id)
            width = height = 1
            boxes, units = norm_bb[:, :4].copy(), "normalized"
        object_ids = object_conf = None
        if soft is not None and soft.shape[1] > 1:
            object_ids, object_conf = _argmax_foreground(soft)
        extras = {} if conf is None else {"conf": conf}
        return RegionRecord(image_id=image_id, image_w=width, image_h=height, boxes=boxes,
                            features=features, object_ids=object_ids, object_conf=object_conf,
                            cls_prob=soft, box_units=units, extras=extras)


def uniter_num_bb(conf: np.ndarray, conf_th: float = 0.2, min_bb: int = 10,
                  max_bb: int = 100) -> int:
    """UNITER's box count: ``clip(#(conf > conf_th), min_bb, max_bb)`` (convert_imgdir.py)."""
    return int(min(max_bb, max(min_bb, int((np.asarray(conf) > conf_th).sum()))))


class UniterNpzDirReader(_UniterMixin, _Reader):
    """A directory of per-image UNITER npz files (float16 as the BUTD docker writes them).

    Args:
      image_sizes: ``{image_id: (width, height)}`` in pixels (width FIRST); images without an
        entry get normalised boxes and are counted as images_without_size.
      key_to_image_id: maps an npz file name to the image id used for lookups.
      conf_th, min_bb, max_bb: if conf_th is set, keep UNITER's first ``uniter_num_bb`` boxes;
        dropped boxes are counted as boxes_dropped_by_conf_th.
      feature_dim: if given, every image must have this many feature values per box.
      Counts go to the report given to ``get``, else to ``reader.report``.
    """

    format = "uniter_npz"

    def __init__(self, path: PathLike, *, image_sizes: Optional[Mapping[str, tuple]] = None,
                 key_to_image_id: Optional[Callable[[str], str]] = None,
                 conf_th: Optional[float] = None, min_bb: int = 10, max_bb: int = 100,
                 feature_dim: Optional[int] = None):
        names = sorted(e.name for e in os.scandir(path) if e.name.endswith(".npz") and e.is_file())
        super().__init__(path, names, key_to_image_id, feature_dim)
        self._init_uniter(image_sizes, conf_th, min_bb, max_bb)

    def _where(self, name: str) -> dict:
        return {"path": os.path.join(self.path, name)}

    def _load(self, image_id: str, name: str, report: DataReport) -> RegionRecord:
        file = self._where(name)["path"]
        try:
            with np.load(file, allow_pickle=False) as npz:
                dump = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError) as e:
            raise DataFormatError(file, f"unreadable npz ({e})", "an np.savez file") from None
        return self._uniter_record(image_id, dump, {"path": file}, report)


class _LmdbReader(_Reader):
    def _open_env(self, path: str):
        import lmdb

        # As VOLTA opens them: shared read-only files, no lock file, no OS read-ahead.
        self._env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False,
                              subdir=os.path.isdir(path), max_readers=512)

    def _get(self, key: bytes) -> bytes:
        with self._env.begin(write=False) as txn:
            return txn.get(key)

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None


class UniterLmdbReader(_UniterMixin, _LmdbReader):
    """UNITER ``DetectFeatLmdb`` database (msgpack or compressed-npz values); options as
    ``UniterNpzDirReader``."""

    format = "uniter_lmdb"

    def __init__(self, path: PathLike, *, image_sizes: Optional[Mapping[str, tuple]] = None,
                 key_to_image_id: Optional[Callable[[str], str]] = None,
                 conf_th: Optional[float] = None, min_bb: int = 10, max_bb: int = 100,
                 feature_dim: Optional[int] = None):
        path = os.fspath(path)
        self._open_env(path)
        try:
            raw = self._get(b"__keys__")
            if raw is None:
                raise DataFormatError(path, "no '__keys__' entry", "UNITER's JSON list of keys")
            try:
                names = json.loads(bytes(raw).decode("utf-8"))
            except ValueError as e:
                raise DataFormatError(path, f"'__keys__' is not JSON ({e})", "a JSON list",
                                      key="__keys__") from None
            super().__init__(path, names, key_to_image_id, feature_dim)
            self._init_uniter(image_sizes, conf_th, min_bb, max_bb)
        except BaseException:
            self.close()
            raise

    def _where(self, name: str) -> dict:
        return {"path": self.path, "key": name}

    def _load(self, image_id: str, name: str, report: DataReport) -> RegionRecord:
        where = self._where(name)
        raw = self._get(name.encode("utf-8"))
        if raw is None:
            raise DataFormatError(found="a key listed in '__keys__' with no value",
                                  expected="a value for every listed key", **where)
        if raw[:2] == b"PK":  # the *_compressed databases hold np.savez_compressed bytes
            try:
                with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                    dump = {k: npz[k] for k in npz.files if k != "allow_pickle"}
            except (OSError, ValueError, EOFError) as e:
                raise DataFormatError(found=f"unreadable npz bytes ({e})",
                                      expected="np.savez_compressed output", **where) from None
        else:
            dump = _unpack_msgpack_numpy(raw, where)
        return self._uniter_record(image_id, dump, where, report)


def _unpack_msgpack_numpy(raw: bytes, where: dict) -> dict:
    import msgpack

    try:
        dump = msgpack.unpackb(raw, raw=False, object_hook=_decode_msgpack_numpy,
                               strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DataFormatError(found=f"undecodable msgpack ({e})",
                              expected="msgpack of a dict of arrays (msgpack-numpy)",
                              **where) from None
    if not isinstance(dump, dict):
        raise DataFormatError(found=f"msgpack of a {type(dump).__name__}", expected="a dict",
                              **where)
    return {k.decode("utf-8") if isinstance(k, bytes) else k: v for k, v in dump.items()}


def _decode_msgpack_numpy(obj: dict):
    """msgpack-numpy's array encoding: ``{nd: True, type: '<f2', kind: b'', shape, data}`` (keys
    bytes in current versions, str in old ones); ``nd: False`` is a numpy scalar."""
    def field(name):
        return obj[name.encode()] if name.encode() in obj else obj.get(name)

    nd = field("nd")
    if nd is None:
        if field("complex") is True:
            data = field("data")
            return complex(data.decode() if isinstance(data, bytes) else data)
        return obj
    descr = field("type")
    kind = field("kind")
    if kind in (b"V", "V"):  # structured dtype: a list of (name, type[, shape]) tuples
        descr = [tuple(t.decode() if isinstance(t, bytes) else t for t in d) for d in descr]
    elif isinstance(descr, bytes):
        descr = descr.decode()
    arr = np.frombuffer(field("data"), dtype=np.dtype(descr))
    return arr.reshape(field("shape")) if nd is True else arr[0]


# --------------------------------------------------------------------------- VOLTA


class VoltaLmdbReader(_LmdbReader):
    """VOLTA feature LMDB (TSV-converted base64 strings or H5-converted raw arrays).

    Values are unpickled: use only on feature files from a source you trust.
    """

    format = "volta_lmdb"

    def __init__(self, path: PathLike, *, feature_dim: Optional[int] = None,
                 key_to_image_id: Optional[Callable[[str], str]] = None):
        path = os.fspath(path)
        self._open_env(path)
        try:
            raw = self._get(b"keys")
            if raw is None:
                raise DataFormatError(path, "no 'keys' entry", "VOLTA's pickled list of ids")
            try:
                keys = pickle.loads(raw)
            except Exception as e:  # a damaged pickle can raise nearly anything
                raise DataFormatError(path, f"unpicklable 'keys' ({type(e).__name__}: {e})",
                                      "a pickled list of id bytes", key="keys") from None
            super().__init__(path, keys, key_to_image_id, feature_dim)
        except BaseException:
            self.close()
            raise

    def _where(self, key) -> dict:
        key_bytes = key if isinstance(key, bytes) else str(key).encode("utf-8")
        return {"path": self.path, "key": key_bytes.decode("utf-8", "replace")}

    def _load(self, image_id: str, key, report: DataReport) -> RegionRecord:
        key_bytes = key if isinstance(key, bytes) else str(key).encode("utf-8")
        where = self._where(key)
        raw = self._get(key_bytes)
        if raw is None:
            raise DataFormatError(found="a key listed in 'keys' with no value",
                                  expected="a value for every listed key", **where)
        try:
            item = pickle.loads(raw)
        except Exception as e:
            raise DataFormatError(found=f"unpicklable value ({type(e).__name__}: {e})",
                                  expected="a pickled dict", **where) from None
        if not isinstance(item, Mapping):
            raise DataFormatError(found=f"a pickled {type(item).__name__}",
                                  expected="a dict of TSV fields", **where)
        return _record_from_item(item, image_id, where)


# --------------------------------------------------------------------------- entry points

_READERS = {"lxmert_tsv": LxmertTsvReader, "uniter_npz": UniterNpzDirReader,
            "uniter_lmdb": UniterLmdbReader, "volta_lmdb": VoltaLmdbReader}


def detect_format(path: PathLike) -> str:
    """``lxmert_tsv`` for a file, ``uniter_npz`` for a directory of npz, and for an LMDB directory
    ``uniter_lmdb`` (has ``__keys__``) or ``volta_lmdb`` (has ``keys``)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) == "data.mdb":
            return detect_format(os.path.dirname(path) or ".")
        if path.endswith(".npz"):
            raise DataFormatError(path, "a single npz file",
                                  "the directory of UNITER npz files that holds it")
        return "lxmert_tsv"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no region features at {path}")
    entries = sorted(os.listdir(path))
    if "data.mdb" in entries:
        import lmdb

        env = lmdb.open(path, readonly=True, lock=False, readahead=False)
        try:
            with env.begin() as txn:
                if txn.get(b"__keys__") is not None:
                    return "uniter_lmdb"
                if txn.get(b"keys") is not None:
                    return "volta_lmdb"
                first = [bytes(k) for k, _ in zip(txn.cursor().iternext(values=False), range(3))]
        finally:
            env.close()
        raise DataFormatError(path, f"an LMDB without '__keys__' or 'keys' (first keys {first})",
                              "a UNITER (__keys__) or VOLTA (keys) feature database")
    if any(e.endswith(".npz") for e in entries):
        return "uniter_npz"
    lmdbs = [e for e in entries if os.path.isfile(os.path.join(path, e, "data.mdb"))]
    hint = f"; LMDB subdirectories here: {lmdbs}" if lmdbs else ""
    raise DataFormatError(path, f"a directory with no data.mdb and no .npz files{hint}",
                          "a .tsv file, an LMDB directory or a directory of UNITER npz files")


def open_region_features(path: PathLike, format: Optional[str] = None,
                         **options) -> RegionFeatureReader:
    """Opens region features for random access; ``format`` defaults to ``detect_format(path)``.

    ``options`` go to the format's reader: ``LxmertTsvReader(index_path, cache_index,
    feature_dim)``, ``UniterNpzDirReader`` / ``UniterLmdbReader(image_sizes, key_to_image_id,
    conf_th, min_bb, max_bb, feature_dim)``, ``VoltaLmdbReader(feature_dim, key_to_image_id)``.
    """
    fmt = format or detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return _READERS[fmt](path, **options)


def dataset_mean_feature(reader: RegionFeatureReader, image_ids: Optional[Iterable] = None,
                         report: Optional[DataReport] = None) -> np.ndarray:
    """[D] float32 mean feature over every region of the given images (default: all).

    Frank et al. (2021) replace ablated regions with this mean. VOLTA's ``_avg_feature`` sums
    once per phrase example, so an image counts as often as it has examples: pass the per-example
    image ids, repeats included, to reproduce it (each image is still read once). Sums run in
    float64. Ids without features are counted as images_without_features (in ``report``, else
    ``reader.report``) and, when no report is given, warned about.
    """
    counts = collections.Counter(_as_id(i) for i in image_ids) if image_ids is not None \
        else collections.Counter(reader.image_ids())
    missing = [i for i in counts if i not in reader]
    total: Optional[np.ndarray] = None
    regions = 0
    for image_id, times in counts.items():
        rec = reader.get(image_id, report)
        if rec is None or rec.num_boxes == 0:
            continue
        row_sum = rec.features.sum(axis=0, dtype=np.float64)
        total = row_sum * times if total is None else total + row_sum * times
        regions += rec.num_boxes * times
    if missing and report is None:
        warnings.warn(f"dataset_mean_feature: {len(missing)} of {len(counts)} image ids have no "
                      f"features in {reader.path} (e.g. {missing[:3]})", stacklevel=2)
    if total is None:
        raise ValueError(f"no regions to average in {reader.path} ({len(counts)} image ids asked, "
                         f"{len(missing)} without features)")
    return (total / regions).astype(np.float32)
