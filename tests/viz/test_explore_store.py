"""The explorer store: what it holds equals the Trace, it opens lazily, and the app's statistics
are the probes' (equal to what the runner writes to results.json)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from value_jax.data.loaders import ExampleLoader
from value_jax.runner import run_probes
from value_jax.viz import export, stats, views
from value_jax.viz.compute import analysis_probes
from value_jax.viz.store import Store, group_of, store_bytes


@pytest.mark.parametrize("which", ["lxmert_built", "uniter_built"])
def test_store_holds_the_trace(which, request):
    built = request.getfixturevalue(which)
    store = built.open()
    assert len(store) == len(built.infos) > 0
    for index in (0, len(store) - 1):
        rec = store.record(index)
        trace, batch = built.trace(index)
        n_text, n_reg = rec["info"]["n_text"], rec["info"]["n_regions"]
        assert rec["tokens"][0] == "[CLS]" and rec["tokens"][-1] == "[SEP]"
        assert len(rec["tokens"]) == n_text and len(rec["regions"]) == n_reg
        t_slot = batch.text_len
        keep = {
            "text": np.arange(n_text),
            "image": np.arange(n_reg),
            "joint": np.concatenate([np.arange(n_text), t_slot + np.arange(n_reg)]),
        }
        assert list(rec["attention"]) == store.map_names
        for name, stored in rec["attention"].items():
            axes = store.meta["maps"][name]
            want = np.asarray(trace.attention[name][0])[:, keep[axes["query"]]][
                :, :, keep[axes["key"]]
            ]
            assert stored.dtype == np.float16 and stored.shape == want.shape
            np.testing.assert_allclose(stored.astype(np.float32), want, atol=1e-3, rtol=1e-2)
        for name in trace.hidden:
            states, where = store.example_hidden(index, group_of(name))
            h = np.asarray(trace.hidden[name][0])
            if store.model_type == "uniter":
                want = np.concatenate([h[:n_text], h[t_slot : t_slot + n_reg]])
            else:
                kind = 0 if (name.startswith("lang") or name.endswith(".lang")) else 1
                want = h[:n_text] if kind == 0 else h[:n_reg]
                states = states[where[:, 0] == kind]
            np.testing.assert_allclose(states, want, atol=2e-2, rtol=1e-2)


def test_store_opens_lazily(lxmert_built):
    start = time.perf_counter()
    store = Store(lxmert_built.store_dir)
    assert time.perf_counter() - start < 1.0
    assert not store._cache and not store._tables  # nothing read until asked for
    store.record(3)
    assert list(store._cache) == [3]


def test_app_statistics_equal_the_runner_results(lxmert_built, uniter_built):
    """The "all examples" statistics are the probes' finalize over the runner's sums: run the
    runner on the same examples and compare every number."""
    for built in (lxmert_built, uniter_built):
        store = built.open()
        probes = analysis_probes(store.single_stream, coref=True)
        loader = ExampleLoader([i.example for i in built.infos], 8, regions=built.session.regions)
        want = run_probes(built.model, built.params, loader, probes, label="test")
        got = stats.results(store, None)
        assert set(got) == set(want)
        for name, result in want.items():
            a = json.loads(json.dumps(result.to_json()))
            from value_jax.probes.results import Result

            b = json.loads(json.dumps(Result(name, got[name]).to_json()))
            _close(a, b)
        # z-scores of a head whose mean barely varies over layers amplify float noise (sums
        # in another order): compared where the spread is real.
        for block, entry in want["head_summary"].data.items():
            if not isinstance(entry, dict) or "zscore_across_layers" not in entry:
                continue
            spread = np.asarray(entry["mean"]).std(axis=0) > 1e-4
            np.testing.assert_allclose(
                np.asarray(got["head_summary"][block]["zscore_across_layers"])[:, spread],
                np.asarray(entry["zscore_across_layers"])[:, spread],
                atol=1e-3,
            )


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k != "zscore_across_layers":
                _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


def _delete_specials_then_slice(joint, tokens):
    """VL-InterpreT's head summary of one map [H, N, N] (db_analyzer.py): [CLS]/[SEP] rows and
    columns deleted, then blocks sliced with the text length taken BEFORE the deletion."""
    txt_len = len(tokens)
    drop = [i for i, t in enumerate(tokens) if t in ("[CLS]", "[SEP]")]
    a = np.delete(np.delete(joint, drop, axis=1), drop, axis=2)
    return a[:, :txt_len, txt_len:].mean(axis=(1, 2))  # its "image-to-text" = t2v block


def test_vl_interpret_block_shift_is_not_reproduced(uniter_built):
    """Bug 1: after dropping [CLS]/[SEP], VL-InterpreT slices the t2v block with the original
    text length, so its block starts two regions late and misses words. Ours is the mean over
    words × regions exactly."""
    store = uniter_built.open()
    index = 0
    rec = store.record(index)
    data = stats.results(store, index)
    m, rows, _ = stats.head_matrix(store, data, "t2v")
    n_text = rec["info"]["n_text"]
    shift = []
    for layer, name in enumerate(rows):
        joint = rec["attention"][name].astype(np.float64)
        exact = joint[:, 1 : n_text - 1, n_text:].mean(axis=(1, 2))  # words → regions
        np.testing.assert_allclose(m[layer], exact, atol=2e-3)
        buggy = _delete_specials_then_slice(joint, rec["tokens"])
        shift.append(np.abs(buggy - exact).max())
    assert max(shift) > 1e-3  # the planted layer-3 head tells the two apart
    # v2t too: region queries → word keys.
    m, rows, _ = stats.head_matrix(store, data, "v2t")
    joint = rec["attention"][rows[0]].astype(np.float64)
    np.testing.assert_allclose(m[0], joint[:, n_text:, 1 : n_text - 1].mean(axis=(1, 2)), atol=2e-3)


def test_mean_over_heads_is_over_heads_not_layers(lxmert_built):
    """Bug 2: VL-InterpreT's "average over heads" loops over the layer count. The LXMERT
    language stack has 5 maps (lang1, lang2, cross1..3.lang_self) and 4 heads."""
    store = lxmert_built.open()
    rec = store.record(1)
    trace, _ = lxmert_built.trace(1)
    names = store.meta["directions"]["t2v"]  # cross1..3.l2v; cross1 head 2 planted
    assert len(names) != store.meta["num_heads"]
    name = names[0]
    n, r = rec["info"]["n_text"], rec["info"]["n_regions"]
    want = np.asarray(trace.attention[name][0]).mean(axis=0)[:n, :r]
    np.testing.assert_allclose(views.head_map(rec, name, "mean"), want, atol=1e-3)
    text_w, region_w = views.attention_from(store, rec, name, "mean", ("text", 2))
    np.testing.assert_allclose(region_w, want[2], atol=1e-3)
    assert text_w is None
    stacked = np.stack([rec["attention"][x].astype(np.float32) for x in names])  # [L, H, Q, K]
    over_layers = stacked[:, 0].mean(axis=0)  # one head position across the layers
    assert np.abs(over_layers - want).max() > 1e-2


def test_planted_head_finds_the_object(lxmert_built, uniter_built):
    """In the demo, a key word's planted head puts its top box on a region labelled with it."""
    for built, name, head in ((lxmert_built, "cross1.l2v", 1), (uniter_built, "layer3", 1)):
        store = built.open()
        found = 0
        for index in range(len(store)):
            rec = store.record(index)
            for pos, tok in enumerate(rec["tokens"]):
                labelled = [r for r, lab in enumerate(rec["regions"]) if tok in lab.split()[1:]]
                if not labelled or tok in ("[CLS]", "[SEP]"):
                    continue
                _, region_w = views.attention_from(store, rec, name, head, ("text", pos))
                assert views.top_k(region_w, 1)[0] in labelled, (index, tok)
                found += 1
        assert found >= 3


def test_nearest_neighbours_come_from_other_examples(lxmert_built):
    store = lxmert_built.open()
    group = store.groups[-1]
    _, rows, _ = store.hidden(group)
    hits = store.nearest(group, 0, k=5)
    assert len(hits) == 5
    assert all(rows[r, 0] != rows[0, 0] for r, _ in hits)
    sims = [s for _, s in hits]
    assert sims == sorted(sims, reverse=True)


def test_typed_caption_is_added_and_projected(tmp_path, lxmert_built):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(lxmert_built.store_dir, copy)
    store = Store(copy)
    n = len(store)
    index = lxmert_built.session.add_caption(store, 0, "a guitar near the lake")
    assert index == n and len(store) == n + 1
    rec = store.record(index)
    assert rec["info"]["added"] and rec["tokens"][1:3] == ["a", "guitar"]
    assert len(rec["regions"]) == store.examples[0]["n_regions"]
    trace, _ = lxmert_built.trace(0)  # shapes only: the typed caption has its own pass
    group = store.groups[-1]
    states, _ = store.example_hidden(index, group)
    _, _, coords = store.hidden(group)
    assert len(coords) == len(store.hidden(group)[0]) and len(states) > 0
    reopened = Store(copy)
    assert len(reopened) == n + 1
    # The aggregate (results.json's numbers) leaves typed captions out.
    a = stats.results(reopened, None)["head_summary"]["t2v"]["mean"]
    b = stats.results(Store(lxmert_built.store_dir), None)["head_summary"]["t2v"]["mean"]
    np.testing.assert_array_equal(a, b)


def test_export_data_round_trip(tmp_path, uniter_built):
    store = uniter_built.open()
    paths = export.export_data(store, 2, tmp_path)
    doc, arrays = export.read_export(paths[0])
    rec = store.record(2)
    assert doc["schema"] == export.EXAMPLE_SCHEMA and doc["tokens"]["text"] == rec["tokens"]
    assert len(doc["boxes_xyxy_pixels"]) == len(rec["regions"])
    for name, entry in doc["attention"].items():
        np.testing.assert_array_equal(arrays[entry["npz"]], rec["attention"][name])
        assert entry["query"] == "joint"
    assert set(doc["hidden"]) == set(store.groups)
    assert "head_summary" in doc["statistics"]


def test_export_views_png_and_svg(tmp_path, lxmert_built):
    store = lxmert_built.open()
    paths = export.export_views(
        store,
        0,
        tmp_path,
        map_name="cross1.l2v",
        head=1,
        source=("text", 2),
        stat="cross_modal",
        zscore=True,
    )
    assert len(paths) == 8
    for p in paths:
        data = open(p, "rb").read()
        assert len(data) > 1000
        assert data[:4] == b"\x89PNG" if p.endswith(".png") else b"<svg" in data[:400]


def test_demo_images_match_the_boxes(lxmert_built):
    from PIL import Image

    store = lxmert_built.open()
    rec = store.record(0)
    info = rec["info"]
    with Image.open(info["image"]) as im:
        assert im.size == (info["width"], info["height"])
        pixels = np.asarray(im.convert("RGB")).astype(int)
    named = [r for r, lab in enumerate(rec["regions"]) if len(lab.split()) > 1]
    assert named
    for r in named:
        x1, y1, x2, y2 = np.round(rec["boxes"][r]).astype(int)
        edge = pixels[y1 + 1, (x1 + x2) // 2]  # the box outline, in the box's colour
        assert np.ptp(edge) > 40  # coloured, not the grey background
    assert store_bytes(store.path) > 0


def test_app_serves_images_and_region_crops(lxmert_built):
    """The routes the overlay and the hidden-state hover use (no browser needed)."""
    import io

    from PIL import Image

    from value_jax.viz.app import make_app

    store = lxmert_built.open()
    client = make_app(store).server.test_client()
    image = client.get("/explore/image/0")
    assert image.status_code == 200 and image.data[:4] == b"\x89PNG"
    x1, y1, x2, y2 = store.record(0)["boxes"][1]
    crop = client.get("/explore/crop/0/1.png")
    assert crop.status_code == 200
    with Image.open(io.BytesIO(crop.data)) as im:
        assert abs(im.size[0] - (x2 - x1)) <= 2 and abs(im.size[1] - (y2 - y1)) <= 2
    assert client.get(f"/explore/image/{len(store) + 5}").status_code in (404, 500)


def test_attention_from_a_region(uniter_built, lxmert_built):
    """A region as the source: UNITER's joint row n_text + r split into words and regions;
    LXMERT's cross2.v2l row r over the words, and no row in a map without region queries."""
    store = uniter_built.open()
    rec = store.record(0)
    n = rec["info"]["n_text"]
    joint = rec["attention"]["layer2"][2].astype(np.float32)
    text_w, region_w = views.attention_from(store, rec, "layer2", 2, ("region", 3))
    np.testing.assert_array_equal(text_w, joint[n + 3, :n])
    np.testing.assert_array_equal(region_w, joint[n + 3, n:])
    store = lxmert_built.open()
    rec = store.record(0)
    text_w, region_w = views.attention_from(store, rec, "cross2.v2l", "mean", ("region", 1))
    np.testing.assert_allclose(
        text_w, rec["attention"]["cross2.v2l"].astype(np.float32).mean(0)[1], rtol=1e-6
    )
    assert region_w is None
    assert views.attention_from(store, rec, "cross1.l2v", 0, ("region", 1)) == (None, None)
