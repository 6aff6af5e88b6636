"""``uniter_npz`` and ``uniter_lmdb``: the BUTD docker's npz directories and UNITER's
``DetectFeatLmdb`` (msgpack-numpy or compressed npz values).
"""

from __future__ import annotations

import io
import json
import os
from typing import Callable, Mapping, Optional

import numpy as np

from value_jax.data.errors import DataFormatError, DataReport, PathLike
from value_jax.data.features.base import RegionRecord, _LmdbReader, _Reader
from value_jax.data.features.fields import _argmax_foreground


class _UniterMixin:
    def _init_uniter(self, image_sizes, conf_th, min_bb, max_bb):
        self._image_sizes = dict(image_sizes) if image_sizes is not None else None
        for image_id, size in (self._image_sizes or {}).items():
            if len(size) != 2 or not all(v > 0 for v in size):
                raise ValueError(
                    f"image_sizes[{image_id!r}] = {size!r} for {self.path} (expected a "
                    "positive (width, height): boxes are scaled by it)"
                )
        self._conf_th, self._min_bb, self._max_bb = conf_th, min_bb, max_bb

    def _uniter_record(
        self, image_id: str, dump: Mapping, where: dict, report: DataReport
    ) -> RegionRecord:
        """``features, norm_bb, conf, soft_labels`` (UNITER's npz keys) -> RegionRecord."""
        for name in ("features", "norm_bb"):
            if name not in dump:
                raise DataFormatError(
                    found=f"no {name!r} (has {sorted(dump)})",
                    expected="UNITER keys features, norm_bb, conf, soft_labels",
                    **where,
                )
        features = np.asarray(dump["features"]).astype(np.float32)
        norm_bb = np.asarray(dump["norm_bb"]).astype(np.float32)
        if (
            features.ndim != 2
            or norm_bb.ndim != 2
            or norm_bb.shape[0] != features.shape[0]
            or norm_bb.shape[1] < 4
        ):
            raise DataFormatError(
                found=f"features {features.shape}, norm_bb {norm_bb.shape}",
                expected="[N, D] and [N, 6]",
                **where,
            )
        n = features.shape[0]
        conf = dump.get("conf")
        conf = None if conf is None else np.asarray(conf).astype(np.float32).reshape(-1)
        soft = dump.get("soft_labels")
        soft = None if soft is None else np.asarray(soft).astype(np.float32)
        if conf is not None and conf.shape != (n,):
            raise DataFormatError(found=f"conf {conf.shape}", expected=f"({n},)", **where)
        if soft is not None and (soft.ndim != 2 or len(soft) != n):
            raise DataFormatError(
                found=f"soft_labels {soft.shape}", expected=f"[{n}, 1601]", **where
            )
        if self._conf_th is not None:
            if conf is None:
                raise DataFormatError(
                    found="no 'conf'", expected="conf, since conf_th is set", **where
                )
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
        return RegionRecord(
            image_id=image_id,
            image_w=width,
            image_h=height,
            boxes=boxes,
            features=features,
            object_ids=object_ids,
            object_conf=object_conf,
            cls_prob=soft,
            box_units=units,
            extras=extras,
        )


def uniter_num_bb(
    conf: np.ndarray, conf_th: float = 0.2, min_bb: int = 10, max_bb: int = 100
) -> int:
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

    def __init__(
        self,
        path: PathLike,
        *,
        image_sizes: Optional[Mapping[str, tuple]] = None,
        key_to_image_id: Optional[Callable[[str], str]] = None,
        conf_th: Optional[float] = None,
        min_bb: int = 10,
        max_bb: int = 100,
        feature_dim: Optional[int] = None,
    ):
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


class UniterLmdbReader(_UniterMixin, _LmdbReader):
    """UNITER ``DetectFeatLmdb`` database (msgpack or compressed-npz values); options as
    ``UniterNpzDirReader``."""

    format = "uniter_lmdb"

    def __init__(
        self,
        path: PathLike,
        *,
        image_sizes: Optional[Mapping[str, tuple]] = None,
        key_to_image_id: Optional[Callable[[str], str]] = None,
        conf_th: Optional[float] = None,
        min_bb: int = 10,
        max_bb: int = 100,
        feature_dim: Optional[int] = None,
    ):
        path = os.fspath(path)
        self._open_env(path)
        try:
            raw = self._get(b"__keys__")
            if raw is None:
                raise DataFormatError(path, "no '__keys__' entry", "UNITER's JSON list of keys")
            try:
                names = json.loads(bytes(raw).decode("utf-8"))
            except ValueError as e:
                raise DataFormatError(
                    path, f"'__keys__' is not JSON ({e})", "a JSON list", key="__keys__"
                ) from None
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
            raise DataFormatError(
                found="a key listed in '__keys__' with no value",
                expected="a value for every listed key",
                **where,
            )
        if raw[:2] == b"PK":  # the *_compressed databases hold np.savez_compressed bytes
            try:
                with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                    dump = {k: npz[k] for k in npz.files if k != "allow_pickle"}
            except (OSError, ValueError, EOFError) as e:
                raise DataFormatError(
                    found=f"unreadable npz bytes ({e})",
                    expected="np.savez_compressed output",
                    **where,
                ) from None
        else:
            dump = _unpack_msgpack_numpy(raw, where)
        return self._uniter_record(image_id, dump, where, report)


def _unpack_msgpack_numpy(raw: bytes, where: dict) -> dict:
    import msgpack

    try:
        dump = msgpack.unpackb(
            raw, raw=False, object_hook=_decode_msgpack_numpy, strict_map_key=False
        )
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DataFormatError(
            found=f"undecodable msgpack ({e})",
            expected="msgpack of a dict of arrays (msgpack-numpy)",
            **where,
        ) from None
    if not isinstance(dump, dict):
        raise DataFormatError(
            found=f"msgpack of a {type(dump).__name__}", expected="a dict", **where
        )
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
