"""``volta_lmdb``: e-bug/volta's ``ImageFeaturesH5Reader`` LMDB (pickled values from its TSV or
H5 converter).
"""

from __future__ import annotations

import os
import pickle
from typing import Callable, Mapping, Optional

from value_jax.data.errors import DataFormatError, DataReport, PathLike
from value_jax.data.features.base import RegionRecord, _LmdbReader
from value_jax.data.features.fields import _record_from_item


class VoltaLmdbReader(_LmdbReader):
    """VOLTA feature LMDB (TSV-converted base64 strings or H5-converted raw arrays).

    Values are unpickled: use only on feature files from a source you trust.
    """

    format = "volta_lmdb"

    def __init__(
        self,
        path: PathLike,
        *,
        feature_dim: Optional[int] = None,
        key_to_image_id: Optional[Callable[[str], str]] = None,
    ):
        path = os.fspath(path)
        self._open_env(path)
        try:
            raw = self._get(b"keys")
            if raw is None:
                raise DataFormatError(path, "no 'keys' entry", "VOLTA's pickled list of ids")
            try:
                keys = pickle.loads(raw)
            except Exception as e:  # a damaged pickle can raise nearly anything
                raise DataFormatError(
                    path,
                    f"unpicklable 'keys' ({type(e).__name__}: {e})",
                    "a pickled list of id bytes",
                    key="keys",
                ) from None
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
            raise DataFormatError(
                found="a key listed in 'keys' with no value",
                expected="a value for every listed key",
                **where,
            )
        try:
            item = pickle.loads(raw)
        except Exception as e:
            raise DataFormatError(
                found=f"unpicklable value ({type(e).__name__}: {e})",
                expected="a pickled dict",
                **where,
            ) from None
        if not isinstance(item, Mapping):
            raise DataFormatError(
                found=f"a pickled {type(item).__name__}", expected="a dict of TSV fields", **where
            )
        return _record_from_item(item, image_id, where)
