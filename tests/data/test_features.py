"""Region-feature readers: round trips through every format, the original loaders' view of the
fixture files, errors that name file:line and field, the TSV index cache, missing ids, means."""

import base64
import csv
import io
import json
import os
import pickle
import sys

import lmdb
import msgpack
import numpy as np
import pytest

from value_jax.data.errors import DataFormatError, DataReport
from value_jax.data.features import (
    FORMATS,
    ImageNotFoundError,
    LxmertTsvReader,
    RegionFeatureReader,
    RegionRecord,
    dataset_mean_feature,
    detect_format,
    open_region_features,
    uniter_name_to_image_id,
    uniter_num_bb,
)
from value_jax.data.fixtures.features import (
    iter_random_records,
    random_records,
    write_lxmert_tsv,
    write_uniter_lmdb,
    write_uniter_npz_dir,
    write_volta_lmdb,
)

FIELDS = [
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
]


@pytest.fixture(scope="module")
def recs():
    # Varied box counts, an image with none, the real feature width.
    return random_records(6, num_boxes=[36, 36, 10, 0, 36, 3], seed=3)


def _assert_same(got: RegionRecord, want: RegionRecord, *, cls_prob=True):
    assert got.image_id == want.image_id
    assert (got.image_w, got.image_h) == (want.image_w, want.image_h)
    for name in ("boxes", "features", "object_ids", "object_conf", "attr_ids", "attr_conf"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    if cls_prob:
        np.testing.assert_array_equal(got.cls_prob, want.cls_prob)


# --------------------------------------------------------------------------- fixtures themselves


def test_random_records_are_butd_like_and_deterministic(recs):
    again = random_records(6, num_boxes=[36, 36, 10, 0, 36, 3], seed=3)
    streamed = list(iter_random_records(6, num_boxes=[36, 36, 10, 0, 36, 3], seed=3))
    for r, a, s in zip(recs, again, streamed):
        _assert_same(a, r)
        _assert_same(s, r)
        assert r.features.shape == (r.num_boxes, 2048) and r.features.dtype == np.float32
        assert (r.features >= 0).all()
        x1, y1, x2, y2 = r.boxes.T
        assert (0 <= x1).all() and (x1 < x2).all() and (x2 <= r.image_w - 1).all()
        assert (0 <= y1).all() and (y1 < y2).all() and (y2 <= r.image_h - 1).all()
        assert r.cls_prob.shape == (r.num_boxes, 1601)
        np.testing.assert_allclose(r.cls_prob.sum(1), 1, atol=1e-5)
        np.testing.assert_array_equal(r.object_ids, r.cls_prob[:, 1:].argmax(1))
        np.testing.assert_array_equal(r.object_conf, r.cls_prob[:, 1:].max(1))
        assert r.object_ids.dtype == np.int64 and (r.object_ids < 1600).all()
        assert r.attr_ids.shape == r.attr_conf.shape == (r.num_boxes,)
    assert random_records(1, seed=4)[0].features.sum() != recs[0].features.sum()


def test_random_records_take_given_sizes_and_boxes():
    boxes = [np.array([[0, 0, 99, 49], [10, 5, 20, 30]], np.float32)]
    (r,) = random_records(1, image_sizes=[(100, 50)], boxes=boxes, feat_dim=8)
    assert (r.image_w, r.image_h) == (100, 50) and r.features.shape == (2, 8)
    np.testing.assert_array_equal(r.boxes, boxes[0])


# --------------------------------------------------------------------------- LXMERT TSV


def _load_obj_tsv_twin(path):
    """What airsplay/lxmert's load_obj_tsv does: csv.DictReader + base64 + np.frombuffer."""
    csv.field_size_limit(sys.maxsize)
    out = []
    with open(path) as f:
        for item in csv.DictReader(f, FIELDS, delimiter="\t"):
            n = int(item["num_boxes"])
            row = {
                "img_id": item["img_id"],
                "img_h": int(item["img_h"]),
                "img_w": int(item["img_w"]),
            }
            for key, shape, dtype in [
                ("objects_id", (n,), np.int64),
                ("objects_conf", (n,), np.float32),
                ("attrs_id", (n,), np.int64),
                ("attrs_conf", (n,), np.float32),
                ("boxes", (n, 4), np.float32),
                ("features", (n, -1), np.float32),
            ]:
                row[key] = np.frombuffer(base64.b64decode(item[key]), dtype).reshape(shape)
            out.append(row)
    return out


def test_tsv_file_is_what_load_obj_tsv_reads(tmp_path, recs):
    path = tmp_path / "feats.tsv"
    write_lxmert_tsv(path, [r for r in recs if r.num_boxes])
    raw = path.read_bytes()
    lines = raw.split(b"\r\n")
    assert lines[-1] == b"" and all(b"\n" not in ln for ln in lines)  # CRLF, no bare LF
    first = lines[0].split(b"\t")
    assert len(first) == 10
    assert (int(first[1]), int(first[2])) == (recs[0].image_h, recs[0].image_w)  # h before w
    for row, rec in zip(_load_obj_tsv_twin(path), [r for r in recs if r.num_boxes]):
        assert (row["img_id"], row["img_h"], row["img_w"]) == (
            rec.image_id,
            rec.image_h,
            rec.image_w,
        )
        np.testing.assert_array_equal(row["boxes"], rec.boxes)
        np.testing.assert_array_equal(row["features"], rec.features)
        np.testing.assert_array_equal(row["objects_id"], rec.object_ids)
        np.testing.assert_array_equal(row["attrs_conf"], rec.attr_conf)


def test_tsv_round_trip(tmp_path, recs):
    path = tmp_path / "feats.tsv"
    write_lxmert_tsv(path, recs)
    with open_region_features(path) as r:
        assert isinstance(r, RegionFeatureReader) and r.format == "lxmert_tsv"
        assert r.image_ids() == [x.image_id for x in recs] and len(r) == len(recs)
        for want in recs:
            got = r[want.image_id]
            _assert_same(got, want, cls_prob=False)
            assert got.cls_prob is None and got.box_units == "pixels"
            assert got.features.flags.writeable
        assert r[recs[3].image_id].features.shape == (0, 2048)


def test_volta_13_field_tsv_carries_cls_prob(tmp_path, recs):
    path = tmp_path / "volta.tsv"
    write_lxmert_tsv(path, recs, volta_columns=True)
    assert len(path.read_bytes().split(b"\r\n")[0].split(b"\t")) == 13
    with open_region_features(path) as r:
        for want in recs:
            _assert_same(r[want.image_id], want)


def test_random_access_does_not_depend_on_order(tmp_path):
    recs = random_records(25, num_boxes=4, seed=7, feat_dim=16)
    path = tmp_path / "f.tsv"
    write_lxmert_tsv(path, recs)
    order = np.random.default_rng(0).permutation(len(recs))
    with open_region_features(path) as r:
        for i in list(order) + list(order[::-1]) + [3, 3, 3]:
            _assert_same(r[recs[i].image_id], recs[i], cls_prob=False)


def _corrupt_line(path, lineno, field, edit):
    lines = path.read_bytes().split(b"\r\n")
    parts = lines[lineno - 1].split(b"\t")
    parts[FIELDS.index(field)] = edit(parts[FIELDS.index(field)])
    lines[lineno - 1] = b"\t".join(parts)
    path.write_bytes(b"\r\n".join(lines))


@pytest.mark.parametrize(
    "field,edit,found",
    [
        ("features", lambda v: v[:-5], "not valid base64"),  # cut mid-quantum
        ("features", lambda v: v[:-8], "holds"),  # cut on a quantum boundary
        ("boxes", lambda v: v[:10] + b"*" + v[11:], "not valid base64"),
        ("objects_id", lambda v: b"b'" + v + b"'", "bytes literal"),
        ("num_boxes", lambda v: b"35", "num_boxes = 35"),
        ("img_h", lambda v: b"tall", "an integer"),
    ],
)
def test_malformed_tsv_line_names_file_line_and_field(tmp_path, field, edit, found):
    recs = random_records(4, num_boxes=5, seed=1, feat_dim=32)
    path = tmp_path / "bad.tsv"
    write_lxmert_tsv(path, recs)
    _corrupt_line(path, 3, field, edit)
    with open_region_features(path, cache_index=False) as r:
        _assert_same(r[recs[1].image_id], recs[1], cls_prob=False)  # other lines still read
        with pytest.raises(DataFormatError) as err:
            r[recs[2].image_id]
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: ") and found in msg, msg
    assert err.value.line == 3
    if field != "num_boxes":
        assert repr(field) in msg


def test_tsv_wrong_field_count_and_missing_id(tmp_path):
    path = tmp_path / "short.tsv"
    path.write_bytes(b"42\t10\t20\tAAAA\r\n")
    with pytest.raises(DataFormatError, match=r"short\.tsv:1: 4 tab-separated fields"):
        open_region_features(path, cache_index=False)["42"]
    path.write_bytes(b"\tno id\r\n")
    with pytest.raises(DataFormatError, match=r"short\.tsv:1: "):
        open_region_features(path, cache_index=False)


def test_tsv_ids_that_csv_quotes(tmp_path):
    recs = random_records(3, num_boxes=2, feat_dim=4, image_ids=['a"b', "tab\there", "plain"])
    path = tmp_path / "q.tsv"
    write_lxmert_tsv(path, recs)
    with open_region_features(path) as r:
        assert r.image_ids() == ['a"b', "tab\there", "plain"]
        for want in recs:
            _assert_same(r[want.image_id], want, cls_prob=False)


def test_tsv_repeated_id_warns_and_keeps_last(tmp_path):
    a, b = random_records(2, num_boxes=2, seed=2, feat_dim=4, image_ids=["7", "7"])
    path = tmp_path / "dup.tsv"
    write_lxmert_tsv(path, [a, b])
    with pytest.warns(UserWarning, match="'7' at lines 1 and 2"):
        r = open_region_features(path, cache_index=False)
    _assert_same(r["7"], b, cls_prob=False)
    r.close()


def test_index_file_reused_and_invalidated(tmp_path):
    recs = random_records(5, num_boxes=3, seed=5, feat_dim=8)
    path = tmp_path / "f.tsv"
    write_lxmert_tsv(path, recs[:4])
    idx = tmp_path / "f.tsv.idx.json"
    with LxmertTsvReader(path) as r:
        assert r.index_status == "built" and r.index_file == str(idx)
    meta = json.loads(idx.read_text())
    assert meta["size"] == path.stat().st_size and len(meta["ids"]) == 4
    with LxmertTsvReader(path) as r:
        assert r.index_status == "loaded" and len(r) == 4
        _assert_same(r[recs[2].image_id], recs[2], cls_prob=False)
    write_lxmert_tsv(path, recs)  # size changes
    with LxmertTsvReader(path) as r:
        assert r.index_status == "built" and recs[4].image_id in r
        _assert_same(r[recs[4].image_id], recs[4], cls_prob=False)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, new mtime
    with LxmertTsvReader(path) as r:
        assert r.index_status == "built"
    idx.write_text("{not json")
    with LxmertTsvReader(path) as r:
        assert r.index_status == "built" and len(r) == 5
    with LxmertTsvReader(path) as r:
        assert r.index_status == "loaded"


def test_index_in_memory_when_not_cached_or_unwritable(tmp_path):
    path = tmp_path / "f.tsv"
    write_lxmert_tsv(path, random_records(2, num_boxes=1, feat_dim=4))
    with LxmertTsvReader(path, cache_index=False) as r:
        assert r.index_file is None and len(r) == 2
    assert not (tmp_path / "f.tsv.idx.json").exists()
    with LxmertTsvReader(path, index_path=tmp_path / "no_such_dir" / "i.json") as r:
        assert r.index_file is None and r.index_status == "built" and len(r) == 2
    assert not (tmp_path / "no_such_dir").exists()


def test_index_in_memory_when_the_folder_refuses_the_write(tmp_path, monkeypatch):
    # A read-only dataset folder (chmod does not stop root, so the write is made to fail).
    from value_jax.data.features import lxmert_tsv

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(lxmert_tsv, "write_json_atomic", refuse)
    path = tmp_path / "f.tsv"
    write_lxmert_tsv(path, random_records(2, num_boxes=1, feat_dim=4))
    with LxmertTsvReader(path) as r:
        assert r.index_file is None and r.index_status == "built" and len(r) == 2
    assert os.listdir(tmp_path) == ["f.tsv"]


def test_index_file_bytes_are_compact_json(tmp_path):
    path = tmp_path / "f.tsv"
    write_lxmert_tsv(path, random_records(2, num_boxes=1, feat_dim=4))
    with LxmertTsvReader(path) as r:
        written = open(r.index_file, "rb").read()
    assert written == json.dumps(json.loads(written), separators=(",", ":")).encode("ascii")


# --------------------------------------------------------------------------- UNITER


def test_uniter_npz_files_match_the_docker_layout(tmp_path, recs):
    names = write_uniter_npz_dir(tmp_path, recs[:1], prefix="flickr30k_")
    assert names == [f"flickr30k_{recs[0].image_id}.npz"]
    with np.load(tmp_path / names[0]) as z:
        assert sorted(z.files) == ["conf", "features", "norm_bb", "soft_labels"]
        assert all(z[k].dtype == np.float16 for k in z.files)
        r = recs[0]
        w, h = r.image_w, r.image_h
        want = np.stack(
            [
                r.boxes[:, 0] / w,
                r.boxes[:, 1] / h,
                r.boxes[:, 2] / w,
                r.boxes[:, 3] / h,
                (r.boxes[:, 2] - r.boxes[:, 0]) / w,
                (r.boxes[:, 3] - r.boxes[:, 1]) / h,
            ],
            1,
        )
        np.testing.assert_allclose(z["norm_bb"], want, atol=1e-3)


def _assert_uniter_same(got, want, sizes_known):
    np.testing.assert_allclose(got.features, want.features, rtol=1e-3, atol=1e-3)  # fp16
    assert got.features.dtype == np.float32
    np.testing.assert_allclose(got.cls_prob, want.cls_prob, atol=1e-3)
    fp16 = want.cls_prob.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.object_ids, fp16[:, 1:].argmax(1))
    np.testing.assert_allclose(got.normalized_boxes(), want.normalized_boxes(), atol=1e-3)
    if sizes_known:
        assert got.box_units == "pixels" and (got.image_w, got.image_h) == (
            want.image_w,
            want.image_h,
        )
        np.testing.assert_allclose(got.boxes, want.boxes, atol=0.5)
    else:
        assert got.box_units == "normalized" and (got.image_w, got.image_h) == (1, 1)
        np.testing.assert_array_equal(got.boxes, got.normalized_boxes())


@pytest.mark.parametrize("layout", ["npz", "lmdb", "lmdb_compressed"])
@pytest.mark.parametrize("sizes_known", [True, False])
def test_uniter_round_trip(tmp_path, recs, layout, sizes_known):
    path = tmp_path / "db"
    if layout == "npz":
        write_uniter_npz_dir(path, recs, prefix="flickr30k_")
    else:
        write_uniter_lmdb(path, recs, compressed=layout == "lmdb_compressed", prefix="flickr30k_")
    sizes = {r.image_id: (r.image_w, r.image_h) for r in recs} if sizes_known else None
    with open_region_features(
        path, image_sizes=sizes, key_to_image_id=uniter_name_to_image_id
    ) as r:
        assert r.format == ("uniter_npz" if layout == "npz" else "uniter_lmdb")
        assert sorted(r.image_ids()) == sorted(x.image_id for x in recs)
        for want in reversed(recs):
            _assert_uniter_same(r[want.image_id], want, sizes_known)
        assert len(r.report) == 0


def test_uniter_lmdb_values_are_what_detectfeatlmdb_reads(tmp_path, recs):
    write_uniter_lmdb(tmp_path / "plain", recs[:2])
    write_uniter_lmdb(tmp_path / "comp", recs[:2], compressed=True)
    for name, compressed in (("plain", False), ("comp", True)):
        env = lmdb.open(str(tmp_path / name), readonly=True, lock=False)
        with env.begin() as txn:
            keys = json.loads(txn.get(b"__keys__").decode("utf-8"))
            assert keys == [f"{r.image_id}.npz" for r in recs[:2]]
            dump = txn.get(keys[0].encode())
        env.close()
        if compressed:  # DetectFeatLmdb: np.load(BytesIO(dump), allow_pickle=True)
            npz = np.load(io.BytesIO(dump), allow_pickle=True)
            assert "allow_pickle" in npz.files  # old numpy's savez kept the kwarg as an array
            feats = npz["features"]
        else:  # msgpack.loads(dump, raw=False) with msgpack_numpy's decode hook
            obj = msgpack.unpackb(dump, raw=False)
            enc = obj["features"]
            assert enc[b"nd"] is True and enc[b"type"] == "<f2" and enc[b"kind"] == b""
            feats = np.frombuffer(enc[b"data"], np.dtype(enc[b"type"])).reshape(enc[b"shape"])
        assert feats.dtype == np.float16
        np.testing.assert_array_equal(feats, recs[0].features.astype(np.float16))


def test_old_msgpack_numpy_str_keys_decode(tmp_path):
    from value_jax.data.features import _decode_msgpack_numpy, _unpack_msgpack_numpy

    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    old = {"nd": True, "type": "<f2", "shape": [2, 3], "data": arr.tobytes()}
    np.testing.assert_array_equal(_decode_msgpack_numpy(old), arr)
    scalar = {b"nd": False, b"type": "<i8", b"data": np.int64(7).tobytes()}
    assert _decode_msgpack_numpy(scalar) == 7
    with pytest.raises(DataFormatError, match=r"db \[k\]: undecodable msgpack"):
        _unpack_msgpack_numpy(b"\xc1", {"path": "db", "key": "k"})


def test_uniter_conf_threshold_keeps_uniters_box_count(tmp_path, recs):
    write_uniter_lmdb(tmp_path / "db", recs[:3])
    report = DataReport()
    with open_region_features(tmp_path / "db", conf_th=0.5, min_bb=2, max_bb=20) as r:
        for want in recs[:3]:
            conf = want.object_conf.astype(np.float16)
            keep = min(20, max(2, int((conf > 0.5).sum())))
            assert keep == uniter_num_bb(conf, 0.5, 2, 20)
            got = r.get(f"{want.image_id}.npz", report)
            assert got.num_boxes == min(keep, want.num_boxes)
            np.testing.assert_allclose(got.features, want.features[:keep], atol=1e-2, rtol=1e-3)
    dropped = sum(
        max(0, w.num_boxes - uniter_num_bb(w.object_conf.astype(np.float16), 0.5, 2, 20))
        for w in recs[:3]
    )
    assert report["boxes_dropped_by_conf_th"] == dropped > 0


# --------------------------------------------------------------------------- VOLTA


def _volta_reader_twin(path, image_id):
    """What VOLTA's ImageFeaturesH5Reader.__getitem__ does with a TSV-converted LMDB."""
    env = lmdb.open(
        str(path), max_readers=1, readonly=True, lock=False, readahead=False, meminit=False
    )
    with env.begin(write=False) as txn:
        ids = pickle.loads(txn.get("keys".encode()))
        item = pickle.loads(txn.get(str(image_id).encode()))
    env.close()
    feats = np.frombuffer(base64.b64decode(item["features"]), np.float32).reshape(-1, 2048)
    boxes = np.frombuffer(base64.b64decode(item["boxes"]), np.float32).reshape(-1, 4)
    cls = np.frombuffer(base64.b64decode(item["cls_prob"]), np.float32).reshape(-1, 1601)
    return ids, int(item["img_h"]), int(item["img_w"]), feats, boxes, cls


@pytest.mark.parametrize("raw_arrays", [False, True])
def test_volta_round_trip(tmp_path, recs, raw_arrays):
    path = tmp_path / "flickr30k_feat.lmdb"
    write_volta_lmdb(path, recs, raw_arrays=raw_arrays)
    with open_region_features(path) as r:
        assert r.format == "volta_lmdb" and r.image_ids() == [x.image_id for x in recs]
        for want in recs[::-1]:
            _assert_same(r[want.image_id], want)
    if not raw_arrays:
        ids, h, w, feats, boxes, cls = _volta_reader_twin(path, int(recs[0].image_id))
        assert ids == [x.image_id.encode() for x in recs]
        assert (h, w) == (recs[0].image_h, recs[0].image_w)
        np.testing.assert_array_equal(feats, recs[0].features)
        np.testing.assert_array_equal(cls, recs[0].cls_prob)


def test_volta_bad_value_names_the_key(tmp_path, recs):
    path = tmp_path / "v.lmdb"
    write_volta_lmdb(path, recs[:2])
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        item = pickle.loads(txn.get(recs[1].image_id.encode()))
        item["features"] = item["features"][:-4]
        txn.put(recs[1].image_id.encode(), pickle.dumps(item))
    env.close()
    with open_region_features(path) as r:
        with pytest.raises(DataFormatError) as err:
            r[recs[1].image_id]
    assert str(err.value).startswith(f"{path} [{recs[1].image_id}]: field 'features'")


# --------------------------------------------------------------------------- shared behaviour


def test_format_detection(tmp_path, recs):
    write_lxmert_tsv(tmp_path / "a.tsv", recs[:2])
    write_uniter_npz_dir(tmp_path / "npz", recs[:2])
    write_uniter_lmdb(tmp_path / "ul", recs[:2])
    write_volta_lmdb(tmp_path / "vl", recs[:2])
    assert [detect_format(tmp_path / p) for p in ("a.tsv", "npz", "ul", "vl")] == list(FORMATS)
    assert detect_format(tmp_path / "vl" / "data.mdb") == "volta_lmdb"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no data.mdb and no .npz"):
        detect_format(tmp_path / "empty")
    (tmp_path / "parent").mkdir()
    write_uniter_lmdb(tmp_path / "parent" / "feat_th0.2_max100_min10", recs[:1])
    with pytest.raises(DataFormatError, match="feat_th0.2_max100_min10"):
        detect_format(tmp_path / "parent")
    env = lmdb.open(str(tmp_path / "other"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"x", b"1")
    env.close()
    with pytest.raises(DataFormatError, match=r"without '__keys__' or 'keys'.*b'x'"):
        detect_format(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="format 'h5'"):
        open_region_features(tmp_path / "a.tsv", format="h5")


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_image_is_a_clear_keyerror_and_counted_by_get(tmp_path, recs, fmt):
    path = tmp_path / "x"
    {
        "lxmert_tsv": write_lxmert_tsv,
        "uniter_npz": write_uniter_npz_dir,
        "uniter_lmdb": write_uniter_lmdb,
        "volta_lmdb": write_volta_lmdb,
    }[fmt](path, recs[:2])
    with open_region_features(path, format=fmt) as r:
        with pytest.raises(KeyError) as err:
            r["999"]
        assert isinstance(err.value, ImageNotFoundError)
        msg = str(err.value)
        assert "'999'" in msg and str(path) in msg and fmt in msg and "2 images" in msg
        report = DataReport()
        assert r.get("999", report) is None and r.get("998", report) is None
        assert report["images_without_features"] == 2 and report.examples(
            "images_without_features"
        ) == ["999", "998"]
        assert r.get("997") is None and r.report["images_without_features"] == 1
        assert "999" not in r


def test_uniter_names_hint_and_int_ids(tmp_path, recs):
    write_uniter_npz_dir(tmp_path / "npz", recs[:2], prefix="flickr30k_")
    with open_region_features(tmp_path / "npz") as r:
        with pytest.raises(KeyError, match="key_to_image_id=uniter_name_to_image_id"):
            r[recs[0].image_id]
    write_volta_lmdb(tmp_path / "vl", recs[:2])
    with open_region_features(tmp_path / "vl") as r:
        assert int(recs[0].image_id) in r
        assert r[int(recs[0].image_id)].image_id == recs[0].image_id


def test_dataset_mean_feature_is_the_mean_over_regions(tmp_path, recs):
    path = tmp_path / "f.tsv"
    write_lxmert_tsv(path, recs)
    with open_region_features(path) as r:
        want = np.concatenate([x.features for x in recs]).astype(np.float64).mean(0)
        got = dataset_mean_feature(r)
        assert got.shape == (2048,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)
        # VOLTA weighting: one term per phrase example, repeats included
        ids = [recs[0].image_id] * 3 + [recs[2].image_id]
        rows = [recs[0].features] * 3 + [recs[2].features]
        np.testing.assert_allclose(
            dataset_mean_feature(r, ids), np.concatenate(rows).astype(np.float64).mean(0), rtol=1e-6
        )
        report = DataReport()
        got = dataset_mean_feature(r, ids + ["nope"], report)
        assert report["images_without_features"] == 1
        with pytest.warns(UserWarning, match="1 of 3 image ids have no features"):
            dataset_mean_feature(r, ids + ["nope"])
        with pytest.raises(ValueError, match="no regions to average"):
            dataset_mean_feature(r, [recs[3].image_id], DataReport())


def test_normalized_boxes_maths():
    feats = np.zeros((2, 3), np.float32)
    rec = RegionRecord(
        "1",
        image_w=500,
        image_h=375,
        features=feats,
        boxes=np.array([[0, 0, 499.5, 374], [50, 75, 250, 150]], np.float32),
    )
    np.testing.assert_allclose(
        rec.normalized_boxes(), [[0, 0, 0.999, 374 / 375], [0.1, 0.2, 0.5, 0.4]], rtol=1e-6
    )
    norm = RegionRecord(
        "1",
        1,
        1,
        np.array([[0.1, 0.2, 0.5, 0.4]], np.float32),
        np.zeros((1, 3), np.float32),
        box_units="normalized",
    )
    np.testing.assert_array_equal(norm.normalized_boxes(), norm.boxes)
    unknown = RegionRecord("1", 0, 0, rec.boxes, feats)
    with pytest.raises(ValueError, match="size 0x0 unknown"):
        unknown.normalized_boxes()
    with pytest.raises(ValueError, match="boxes"):
        RegionRecord("1", 5, 5, np.zeros((3, 4), np.float32), feats)


def test_uniter_name_to_image_id():
    assert uniter_name_to_image_id("flickr30k_1000092795.npz") == "1000092795"
    assert uniter_name_to_image_id("coco_val2014_000000391895.npz") == "000000391895"


# --------------------------------------------------------------------------- checked records

_WRITERS = {
    "lxmert_tsv": write_lxmert_tsv,
    "uniter_npz": write_uniter_npz_dir,
    "uniter_lmdb": write_uniter_lmdb,
    "volta_lmdb": write_volta_lmdb,
}


def _open(path, fmt, **options):
    if fmt.startswith("uniter"):
        options["key_to_image_id"] = uniter_name_to_image_id
    return open_region_features(path, format=fmt, **options)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "field,value", [("features", np.nan), ("features", np.inf), ("boxes", np.nan)]
)
def test_nonfinite_image_is_dropped_and_counted_by_get(tmp_path, fmt, field, value):
    # One NaN in one image used to flow into every mean downstream with exit 0.
    recs = random_records(3, num_boxes=4, seed=5, feat_dim=16)
    getattr(recs[1], field)[2, 1] = value
    path = tmp_path / "x"
    _WRITERS[fmt](path, recs)
    with _open(path, fmt) as r:
        report = DataReport()
        assert r.get(recs[0].image_id, report) is not None
        assert r.get(recs[1].image_id, report) is None
        assert r.get(recs[2].image_id, report) is not None
        assert report["images_with_nonfinite_features"] == 1
        (example,) = report.examples("images_with_nonfinite_features")
        assert str(path) in example and repr(recs[1].image_id) in example, example
        assert f"{field}: 1 non-finite value(s)" in example and "at box 2" in example, example
        if fmt == "lxmert_tsv":
            assert f"{path}:2 " in example, example
        with pytest.raises(DataFormatError, match=f"image {recs[1].image_id!r}: {field}"):
            r[recs[1].image_id]
        for image_id in r:
            rec = r.get(image_id, DataReport())
            assert rec is None or (np.isfinite(rec.features).all() and np.isfinite(rec.boxes).all())


def test_mean_feature_skips_nonfinite_images(tmp_path):
    recs = random_records(3, num_boxes=4, seed=5, feat_dim=8)
    recs[0].features[0, 0] = np.nan
    write_lxmert_tsv(tmp_path / "f.tsv", recs)
    report = DataReport()
    with open_region_features(tmp_path / "f.tsv") as r:
        mean = dataset_mean_feature(r, report=report)
    assert np.isfinite(mean).all() and report["images_with_nonfinite_features"] == 1
    np.testing.assert_allclose(
        mean, np.concatenate([x.features for x in recs[1:]]).mean(0), rtol=1e-6
    )


@pytest.mark.parametrize("fmt", ["lxmert_tsv", "volta_lmdb"])
def test_zero_image_size_names_file_and_image(tmp_path, fmt):
    recs = random_records(2, num_boxes=3, seed=2, feat_dim=8)
    recs[1].image_w = recs[1].image_h = 0
    path = tmp_path / "x"
    _WRITERS[fmt](path, recs)
    with _open(path, fmt) as r:
        assert r[recs[0].image_id].image_w > 0
        for read in (lambda i: r[i], lambda i: r.get(i, DataReport())):
            with pytest.raises(DataFormatError) as err:
                read(recs[1].image_id)
            msg = str(err.value)
            assert msg.startswith(str(path) + (":2: " if fmt == "lxmert_tsv" else " ["))
            assert f"image {recs[1].image_id!r}: img_w x img_h = 0x0" in msg, msg


def test_zero_uniter_image_size_is_refused(tmp_path):
    recs = random_records(2, num_boxes=3, seed=2, feat_dim=8)
    write_uniter_npz_dir(tmp_path / "npz", recs)
    sizes = {recs[0].image_id: (100, 80), recs[1].image_id: (0, 0)}
    with pytest.raises(ValueError, match=rf"image_sizes\['{recs[1].image_id}'\] = \(0, 0\)"):
        open_region_features(tmp_path / "npz", image_sizes=sizes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_feature_width_differs_between_images(tmp_path, fmt):
    # Before: each image kept its own width and collate failed later without naming the file.
    recs = random_records(2, num_boxes=3, seed=1, feat_dim=16) + random_records(
        1, num_boxes=3, seed=2, feat_dim=12, image_ids=["77"]
    )
    path = tmp_path / "x"
    _WRITERS[fmt](path, recs)
    with _open(path, fmt) as r:
        assert r[recs[0].image_id].features.shape == (3, 16)
        with pytest.raises(DataFormatError) as err:
            r.get("77", DataReport())
    msg = str(err.value)
    assert str(path) in msg and "image '77' has 12 feature values per box" in msg, msg
    assert f"expected 16, as image {recs[0].image_id!r} at {path}" in msg, msg
    if fmt == "lxmert_tsv":
        assert msg.startswith(f"{path}:3: ") and f"at {path}:1)" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_feature_width_against_feature_dim(tmp_path, fmt):
    recs = random_records(2, num_boxes=3, seed=1, feat_dim=16)
    recs.append(random_records(1, num_boxes=0, seed=3, feat_dim=16, image_ids=["empty"])[0])
    path = tmp_path / "x"
    _WRITERS[fmt](path, recs)
    with _open(path, fmt, feature_dim=2048) as r:
        assert r["empty"].features.shape == (0, 2048)
        with pytest.raises(
            DataFormatError,
            match=rf"image '{recs[1].image_id}' has 16 feature values per box "
            r"\(expected 2048, as feature_dim = 2048\)",
        ):
            r[recs[1].image_id]
    with _open(path, fmt, feature_dim=16) as r:
        assert r["empty"].features.shape == (0, 16)
