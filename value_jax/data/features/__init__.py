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

One module per format (`lxmert_tsv`, `uniter`, `volta`) behind `base._Reader`; `fields` decodes
one image's fields; this module picks the reader (`open_region_features`, `detect_format`).
"""

from __future__ import annotations

import collections
import os
import warnings
from typing import Iterable, Optional

import numpy as np

from value_jax.data.errors import DataFormatError, DataReport, PathLike
from value_jax.data.features.base import (  # noqa: F401
    FEATURE_DIM,
    FORMATS,
    INDEX_SUFFIX,
    NUM_OBJECT_CLASSES,
    TSV_FIELDS,
    VOLTA_TSV_FIELDS,
    FeatureReport,
    ImageNotFoundError,
    RegionFeatureReader,
    RegionRecord,
    _as_id,
    uniter_name_to_image_id,
)
from value_jax.data.features.lxmert_tsv import LxmertTsvReader
from value_jax.data.features.uniter import (  # noqa: F401
    UniterLmdbReader,
    UniterNpzDirReader,
    _decode_msgpack_numpy,
    _unpack_msgpack_numpy,
    uniter_num_bb,
)
from value_jax.data.features.volta import VoltaLmdbReader

_READERS = {
    "lxmert_tsv": LxmertTsvReader,
    "uniter_npz": UniterNpzDirReader,
    "uniter_lmdb": UniterLmdbReader,
    "volta_lmdb": VoltaLmdbReader,
}


def detect_format(path: PathLike) -> str:
    """``lxmert_tsv`` for a file, ``uniter_npz`` for a directory of npz, and for an LMDB directory
    ``uniter_lmdb`` (has ``__keys__``) or ``volta_lmdb`` (has ``keys``)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) == "data.mdb":
            return detect_format(os.path.dirname(path) or ".")
        if path.endswith(".npz"):
            raise DataFormatError(
                path, "a single npz file", "the directory of UNITER npz files that holds it"
            )
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
        raise DataFormatError(
            path,
            f"an LMDB without '__keys__' or 'keys' (first keys {first})",
            "a UNITER (__keys__) or VOLTA (keys) feature database",
        )
    if any(e.endswith(".npz") for e in entries):
        return "uniter_npz"
    lmdbs = [e for e in entries if os.path.isfile(os.path.join(path, e, "data.mdb"))]
    hint = f"; LMDB subdirectories here: {lmdbs}" if lmdbs else ""
    raise DataFormatError(
        path,
        f"a directory with no data.mdb and no .npz files{hint}",
        "a .tsv file, an LMDB directory or a directory of UNITER npz files",
    )


def open_region_features(
    path: PathLike, format: Optional[str] = None, **options
) -> RegionFeatureReader:
    """Opens region features for random access; ``format`` defaults to ``detect_format(path)``.

    ``options`` go to the format's reader: ``LxmertTsvReader(index_path, cache_index,
    feature_dim)``, ``UniterNpzDirReader`` / ``UniterLmdbReader(image_sizes, key_to_image_id,
    conf_th, min_bb, max_bb, feature_dim)``, ``VoltaLmdbReader(feature_dim, key_to_image_id)``.
    """
    fmt = format or detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return _READERS[fmt](path, **options)


def dataset_mean_feature(
    reader: RegionFeatureReader,
    image_ids: Optional[Iterable] = None,
    report: Optional[DataReport] = None,
) -> np.ndarray:
    """[D] float32 mean feature over every region of the given images (default: all).

    Frank et al. (2021) replace ablated regions with this mean. VOLTA's ``_avg_feature`` sums
    once per phrase example, so an image counts as often as it has examples: pass the per-example
    image ids, repeats included, to reproduce it (each image is still read once). Sums run in
    float64. Ids without features are counted as images_without_features (in ``report``, else
    ``reader.report``) and, when no report is given, warned about.
    """
    counts = (
        collections.Counter(_as_id(i) for i in image_ids)
        if image_ids is not None
        else collections.Counter(reader.image_ids())
    )
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
        warnings.warn(
            f"dataset_mean_feature: {len(missing)} of {len(counts)} image ids have no "
            f"features in {reader.path} (e.g. {missing[:3]})",
            stacklevel=2,
        )
    if total is None:
        raise ValueError(
            f"no regions to average in {reader.path} ({len(counts)} image ids asked, "
            f"{len(missing)} without features)"
        )
    return (total / regions).astype(np.float32)
