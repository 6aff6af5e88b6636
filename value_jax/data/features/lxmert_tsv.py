"""``lxmert_tsv``: airsplay/lxmert's ``load_obj_tsv`` format (and VOLTA's 13-field variant), read
through a byte-offset index kept next to the file.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import warnings
from typing import Optional

import numpy as np

from value_jax.data.errors import DataFormatError, DataReport, PathLike
from value_jax.data.features.base import (
    _INDEX_VERSION,
    INDEX_SUFFIX,
    TSV_FIELDS,
    VOLTA_TSV_FIELDS,
    RegionRecord,
    _Reader,
)
from value_jax.data.features.fields import _record_from_item
from value_jax.io import write_json_atomic


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

    def __init__(
        self,
        path: PathLike,
        *,
        index_path: Optional[PathLike] = None,
        cache_index: bool = True,
        feature_dim: Optional[int] = None,
    ):
        _raise_csv_field_limit()
        path = os.fspath(path)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            stat = os.fstat(self._fd)
            self.index_file = (
                (os.fspath(index_path) if index_path is not None else path + INDEX_SUFFIX)
                if cache_index
                else None
            )
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
        if (
            not isinstance(index, dict)
            or index.get("version") != _INDEX_VERSION
            or index.get("size") != stat.st_size
            or index.get("mtime_ns") != stat.st_mtime_ns
        ):
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
            raise DataFormatError(
                self.path,
                f"{len(data)} bytes at offset {offset}",
                f"{length} (the file changed after it was indexed)",
                line=int(self._lines[row]),
            )
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
            raise DataFormatError(
                found=f"bytes that are not UTF-8 ({e})", expected="text", **where
            ) from None
        except csv.Error as e:
            raise DataFormatError(
                found=f"unparsable line ({e})", expected="tab-separated fields", **where
            ) from None
        if len(fields) == len(TSV_FIELDS):
            item = dict(zip(TSV_FIELDS, fields))
        elif len(fields) == len(VOLTA_TSV_FIELDS):
            item = dict(zip(VOLTA_TSV_FIELDS, fields))
        else:
            raise DataFormatError(
                found=f"{len(fields)} tab-separated fields",
                expected=f"10 ({', '.join(TSV_FIELDS)}) or 13 (VOLTA adds cls_prob, attrs, "
                "classes)",
                **where,
            )
        if item["img_id"] != image_id:
            raise DataFormatError(
                found=f"img_id {item['img_id']!r}",
                expected=f"{image_id!r} (the file changed after it was indexed)",
                **where,
            )
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
                    raise DataFormatError(
                        path,
                        "a line without a leading img_id field",
                        "img_id<TAB>img_h<TAB>...",
                        line=lineno,
                    )
                try:
                    image_id = line[:tab].decode("utf-8")
                    if image_id.startswith('"'):  # csv quoted it: it holds a quote or a tab
                        _raise_csv_field_limit()
                        image_id = next(csv.reader([line.decode("utf-8")], delimiter="\t"))[0]
                except UnicodeDecodeError:
                    raise DataFormatError(
                        path, f"img_id {line[:tab][:40]!r}", "UTF-8 text", line=lineno
                    ) from None
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
        warnings.warn(
            f"{path}: {len(duplicates)} repeated img_id(s), last line kept: {shown}", stacklevel=3
        )
    if offset != stat.st_size:
        raise DataFormatError(
            path, f"{offset} bytes read", f"{stat.st_size} (file changed while being indexed)"
        )
    return {
        "version": _INDEX_VERSION,
        "source": os.path.basename(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ids": ids,
        "offsets": offsets,
        "lengths": lengths,
        "lines": lines,
    }


def _write_json_atomic(path: str, obj: dict) -> bool:
    """Writes the offset index next to the file; False (the index stays in memory) where the
    dataset directory is read-only or missing (no folder is created for it)."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return False
    try:
        write_json_atomic(path, obj, separators=(",", ":"))
        return True
    except OSError:
        return False
