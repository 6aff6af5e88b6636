"""Decoding one image's fields (TSV strings, base64 buffers, raw arrays) into a `RegionRecord`,
with the checks that name the file, line or key and the field at fault.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Mapping, Optional

import numpy as np

from value_jax.data.errors import DataFormatError
from value_jax.data.features.base import _ALIASES, FEATURE_DIM, NUM_OBJECT_CLASSES, RegionRecord


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


def _array_field(
    value: Any, name: str, dtype, where: dict, num_boxes: int, width: Optional[int]
) -> np.ndarray:
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
                "decode the base64 to str before writing)",
                **where,
            )
        try:
            buf = _b64decode_strict(value)
        except (binascii.Error, ValueError) as e:
            raise DataFormatError(
                found=f"field {name!r} is not valid base64 ({e}; {len(value)} characters, "
                f"ends {_short(value[-12:])})",
                expected="base64 of a little-endian buffer; a truncated line looks like this",
                **where,
            ) from None
        if len(buf) % dtype.itemsize:
            raise DataFormatError(
                found=f"field {name!r} decodes to {len(buf)} bytes",
                expected=f"a multiple of {dtype.itemsize} ({dtype.name})",
                **where,
            )
        flat = np.frombuffer(buf, dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        flat = np.array(value).reshape(-1)
        if flat.dtype.kind not in "biuf":
            raise DataFormatError(
                found=f"field {name!r} of dtype {flat.dtype}",
                expected=f"numbers ({dtype.name})",
                **where,
            )
        flat = flat.astype(dtype)
    if width is None:
        need = num_boxes
    elif width == -1:
        if num_boxes == 0:
            if flat.size:
                raise DataFormatError(
                    found=f"field {name!r} holds {flat.size} values",
                    expected="none, since num_boxes = 0",
                    **where,
                )
            return flat.reshape(0, 0)
        if flat.size % num_boxes:
            raise DataFormatError(
                found=f"field {name!r} holds {flat.size} {dtype.name} values",
                expected=f"a multiple of num_boxes = {num_boxes}",
                **where,
            )
        return flat.reshape(num_boxes, flat.size // num_boxes)
    else:
        need = num_boxes * width
    if flat.size != need:
        per = f" ({flat.size / (width or 1):g} boxes)" if width else ""
        raise DataFormatError(
            found=f"field {name!r} holds {flat.size} {dtype.name} values{per}",
            expected=f"{need} for num_boxes = {num_boxes}" + (f" x {width}" if width else ""),
            **where,
        )
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
            raise DataFormatError(
                found=f"no field {name!r} (has {sorted(map(str, item))})",
                expected=" or ".join(map(repr, _ALIASES[name])),
                **where,
            )
        return alias, value

    image_h = _int_field(required("img_h")[1], "img_h", where)
    image_w = _int_field(required("img_w")[1], "img_w", where)
    if image_w <= 0 or image_h <= 0:
        raise DataFormatError(
            found=f"image {image_id!r}: img_w x img_h = {image_w}x{image_h}",
            expected="a positive image size (boxes are normalised by it)",
            **where,
        )
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
    return RegionRecord(
        image_id=image_id,
        image_w=image_w,
        image_h=image_h,
        boxes=boxes,
        features=features,
        object_ids=object_ids,
        object_conf=object_conf,
        attr_ids=optional("attrs_id", np.int64, None),
        attr_conf=optional("attrs_conf", np.float32, None),
        cls_prob=cls_prob,
    )


def _argmax_foreground(cls_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based VG class and its probability, background (column 0) excluded, as BUTD does."""
    fg = cls_prob[:, 1:]
    ids = fg.argmax(axis=1).astype(np.int64)
    return ids, fg[np.arange(len(fg)), ids].astype(np.float32)
