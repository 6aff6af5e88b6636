"""Pair analyses (VALUE Tables 2-4): image-disjoint prober splits, full-rank Eq. 4, relation
control types, the seed, and the "(Rand.)" columns as the paper prints them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from value_jax.models import UniterConfig
from value_jax.probes import classifiers, pair_probers, pairs, probing
from value_jax.probes.coref import CorefProbe
from value_jax.probes.relation import RelationProbe
from value_jax.probes.results import Result
from value_jax.progress import FitProgress
from value_jax.state import LayerFiles
from value_jax.trace import Layout, Trace

FAST = {"linear": dict(max_epochs=300, patience=30), "bilinear": dict(max_epochs=40, patience=8)}


def _leaky_coref_stats(n_images=60, phrases=3, captions=5, regions_per_phrase=2, seed=0):
    """Each image has `phrases` phrases (ids unique to the image), each in all `captions` captions
    and linked to `regions_per_phrase` regions: 30 identical items per phrase. Features are the
    one-hot phrase id; labels (link type, linked or not) are random PER PHRASE, so nothing but
    memorising a phrase seen in training can beat chance."""
    rng = np.random.default_rng(seed)
    n_phrases = n_images * phrases
    type_of, linked_of = rng.integers(0, 8, n_phrases), rng.random(n_phrases) < 0.5
    phrase = np.repeat(np.arange(n_phrases), captions * regions_per_phrase)
    onehot = np.eye(n_phrases, dtype=np.float32)[phrase]
    return {
        "att_features": onehot,
        "emb_region": onehot[:, None],
        "emb_phrase": onehot[:, None],
        "linked": linked_of[phrase].astype(np.int32),
        "type": type_of[phrase],
        "phrase_ids": phrase[:, None],
        "image": phrase // phrases,
    }


def test_split_by_image_keeps_memorised_phrases_at_chance():
    stats = _leaky_coref_stats()
    linked = stats["linked"].astype(bool)
    # The leak is real: an item split puts every test phrase in training too.
    leaky = probing.train_prober(
        stats["att_features"][linked], stats["type"][linked], seed=0, **FAST["linear"]
    )
    assert leaky.test_acc[0] > 0.9
    result = Result("coref", {}, [], {})
    pair_probers.coref_probers(result, stats, None, ["layer1"], seed=0, settings=FAST)
    probers = result.data["probers"]
    for task, chance in (("VCD", 0.5), ("VCC", 1 / 8)):
        for kind in ("attention_prober", "embedding_prober"):
            got = probers[task][kind]
            assert got["test_acc"][0] <= max(chance, got["majority_acc"]) + 0.12, (task, kind, got)
            assert got["control_test_acc"][0] <= 0.7, (task, kind, got)
    assert "image" in result.data["prober_settings"]["split"]


def _recording_train_prober(calls):
    """Stands in for `probing.train_prober`: records its keyword arguments, trains nothing."""

    def fake(features, labels, **kw):
        calls.append(kw)
        names = list(kw["names"])
        acc = [0.5] * len(names)
        return probing.ProbeResult(
            names,
            acc,
            acc,
            acc,
            [0] * len(names),
            [1] * len(names),
            2,
            8,
            1,
            1,
            0.5,
            acc,
            [0.0] * len(names),
        )

    return fake


def test_embedding_prober_is_full_rank_unless_a_rank_is_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(probing, "train_prober", _recording_train_prober(calls))
    stats = _leaky_coref_stats(n_images=12, phrases=2, captions=2, regions_per_phrase=1)
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(stats["type"]), 2, 160)).astype(np.float32)  # D = 160 > 128
    stats.update(emb_region=emb, emb_phrase=emb[:, ::-1])
    full = Result("coref", {}, [], {})
    pair_probers.coref_probers(full, stats, None, ["layer1", "layer2"])
    ranks = [kw["rank"] for kw in calls if "rank" in kw]
    assert len(ranks) == 2 and set(ranks) == {160}  # VCD and VCC embedding probers
    assert full.data["prober_settings"]["bilinear_rank"] == 160
    assert full.data["probers"]["VCC"]["embedding_prober"]["rank"] == 160
    calls.clear()
    low = Result("coref", {}, [], {})
    pair_probers.coref_probers(low, stats, None, ["layer1", "layer2"], bilinear_rank=8)
    assert {kw["rank"] for kw in calls if "rank" in kw} == {8}
    assert low.data["prober_settings"]["bilinear_rank"] == 8
    assert "rank 8" in low.tables[0].caption
    # The rank reaches the Eq. 4 weights.
    e = rng.normal(size=(1, 40, 160)).astype(np.float32)
    probe = classifiers.fit_bilinear(
        e, e, np.arange(40) % 2, e, e, np.arange(40) % 2, 2, jax.random.PRNGKey(0), max_epochs=1
    )
    assert probe.weights["w_i"].shape == (1, 160, 160)


def test_relation_control_types_are_subject_and_object_classes():
    rng = np.random.default_rng(2)
    n, classes = 320, 4
    centres = rng.normal(size=(classes, 64)) * 5
    cs, co = rng.integers(0, classes, n), rng.integers(0, classes, n)
    subj = centres[cs] + rng.normal(size=(n, 64)) * 0.3  # every region its own features
    obj = centres[co] + rng.normal(size=(n, 64)) * 0.3
    types, info = pair_probers.relation_control_classes(subj, obj, seed=0)
    assert info["classes"] == 4 and info["types"] == 16 and info["mean_items_per_type"] == 20
    # One type per (subject class, object class), whatever the cluster numbering.
    truth = cs * classes + co
    assert len(set(zip(truth, types))) == 16
    # Far more data: K grows to MAX_CONTROL_CLASSES at most.
    big = rng.normal(size=(60000, 4)).astype(np.float32)
    _, info = pair_probers.relation_control_classes(big[:30000], big[30000:], seed=0)
    assert info["classes"] == pair_probers.MAX_CONTROL_CLASSES


def _relation_stats(rng, n_images=12, pairs_per_image=20):
    n = n_images * pairs_per_image
    classes = rng.integers(0, 3, (n, 2))
    centres = rng.normal(size=(3, 16)) * 4
    raw = centres[classes] + rng.normal(size=(n, 2, 16))
    related = rng.random(n) < 0.5
    return {
        "att_features": rng.normal(size=(n, 8)).astype(np.float32),
        "emb_subj": rng.normal(size=(n, 2, 8)).astype(np.float32),
        "emb_obj": rng.normal(size=(n, 2, 8)).astype(np.float32),
        "raw_subj": raw[:, 0].astype(np.float32),
        "raw_obj": raw[:, 1].astype(np.float32),
        "related": related.astype(np.int32),
        "pred": np.where(related, rng.integers(0, 3, n), -1),
        "image": np.repeat(np.arange(n_images), pairs_per_image),
        "pair.sum": np.ones((3, 2, 2)),
        "pair.count": np.ones(3),
        "rand.sum": np.ones((3, 2, 2)),
        "rand.count": np.ones(3),
    }


def test_seed_reaches_the_pair_probers(monkeypatch):
    calls = []
    monkeypatch.setattr(probing, "train_prober", _recording_train_prober(calls))
    stats = _leaky_coref_stats(n_images=10, phrases=2, captions=2, regions_per_phrase=1)
    for k in ("v2t", "t2v", "v2t_rand", "t2v_rand"):
        stats[k + ".sum"], stats[k + ".count"] = np.ones((8, 2, 2)), np.ones(8)
    probe = CorefProbe(seed=7)
    probe.layer_names, probe.embedding_layers = ["layer1", "layer2"], ["layer1"]
    res = probe.finalize(stats, {})
    assert calls and {kw["seed"] for kw in calls} == {7}
    assert all(kw["groups"] is not None for kw in calls)
    assert res.data["prober_settings"]["seed"] == 7
    calls.clear()
    probe = RelationProbe(["on", "has", "in"], seed=11)
    probe.layer_names, probe.embedding_layers = ["layer1", "layer2"], ["layer1", "layer2"]
    res = probe.finalize(_relation_stats(np.random.default_rng(3)), {})
    assert calls and {kw["seed"] for kw in calls} == {11}
    np.testing.assert_array_equal(calls[0]["groups"], np.repeat(np.arange(12), 20))
    assert res.data["prober_settings"]["seed"] == 11


def test_prober_fits_report_progress_through_the_runs_log(monkeypatch, capfd):
    """Every fit of a probe's finalize prints one line on `info["log"]`: what it trained, its
    count of the probe's total and an ETA; the last one says all are done."""
    monkeypatch.setattr(probing, "train_prober", _recording_train_prober([]))
    stats = _leaky_coref_stats(n_images=10, phrases=2, captions=2, regions_per_phrase=1)
    for k in ("v2t", "t2v", "v2t_rand", "t2v_rand"):
        stats[k + ".sum"], stats[k + ".count"] = np.ones((8, 2, 2)), np.ones(8)
    for k in ("emb_region", "emb_phrase"):
        stats[k] = np.repeat(stats[k], 2, axis=1)  # two layers
    probe = CorefProbe()
    probe.layer_names, probe.embedding_layers = ["layer1", "layer2"], ["layer1", "layer2"]
    lines = []
    probe.finalize(stats, {"log": lines.append})
    assert [line.split(":")[0] for line in lines] == [
        "VCD attention prober",
        "VCD embedding prober, layers layer1–layer2",  # one fit of both layers
        "VCC attention prober",
        "VCC embedding prober, layers layer1–layer2",
    ]
    assert [line.split("; ")[1].split(",")[0] for line in lines] == [
        f"{k} of 6 fits done" for k in (1, 3, 4, 6)
    ]
    assert lines[-1].endswith("ETA 0:00:00") and "ETA" in lines[0]
    lines.clear()
    probe = RelationProbe(["on", "has", "in"])
    probe.layer_names, probe.embedding_layers = ["layer1", "layer2"], ["layer1", "layer2"]
    logged = probe.finalize(_relation_stats(np.random.default_rng(3)), {"log": lines.append})
    assert [line.split(":")[0] for line in lines] == [
        "VRI attention prober",
        "VRI embedding prober, layers layer1–layer2",
        "VRC attention prober",
        "VRC embedding prober, layers layer1–layer2",
        "VRI raw-feature baseline",
        "VRC raw-feature baseline",
    ]
    assert "8 of 8 fits done" in lines[-1]
    # Layers streamed one by one: a line each; a skipped fit says so.
    lines.clear()
    n = 40
    e = np.random.default_rng(0).normal(size=(n, 2, 4)).astype(np.float32)
    progress = FitProgress(lines.append, 2)
    sel, labels = np.ones(n, bool), np.arange(n) % 2
    args = (sel, labels, np.arange(n), np.arange(n) // 4, 0, ["l1", "l2"], FAST, 0)
    pair_probers._fit_layers(e, e, *args, budget=1, progress=progress, what="VCD emb")
    assert [line.split(": ")[0] for line in lines] == [
        "VCD emb, layer l1 (streamed)",
        "VCD emb, layer l2 (streamed)",
    ]
    lines.clear()
    one_image = (sel, labels, np.arange(n), np.zeros(n), 0, ["l1", "l2"], FAST, 0)
    pair_probers._fit_layers(e, e, *one_image, progress=FitProgress(lines.append, 2))
    assert "(skipped: 1 image(s)" in lines[0] and "2 of 2 fits done" in lines[0]
    # Without a log (a finalize called without one): nothing printed, the same results.
    capfd.readouterr()
    quiet = probe.finalize(_relation_stats(np.random.default_rng(3)), {})
    assert capfd.readouterr() == ("", "")
    assert quiet.data["probers"] == logged.data["probers"] and quiet.data["probers"]


def test_suite_passes_seed_and_rank_flags_to_the_probes():
    """--seed and --bilinear_rank reach the coreference probe: parsed into a RunConfig, passed
    down by the suite."""
    from absl import flags

    from experiments import suite
    from experiments.config import RunConfig

    class Model:
        class config:
            model_type = "uniter"
            single_stream = True
            display_name = "UNITER"

    class Loader:
        types = ("people", "other")

    flags.FLAGS(["test", "--seed=5", "--bilinear_rank=16"])
    try:
        cfg = RunConfig.from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    (probe,) = suite.flickr_probes(cfg, Model, Loader, {"coref"})
    assert (probe.seed, probe.bilinear_rank) == (5, 16)
    assert probe.fingerprint()["seed"] == 5


def test_random_region_pairs_are_distinct_real_regions_uniformly():
    mask = jnp.asarray([[1] * 4 + [0] * 2, [1] * 6, [1] + [0] * 5])
    a, b = pairs.random_region_pairs(3, jnp.asarray([5, 6, 7]), jnp.asarray([0, 0, 0]), mask, 3000)
    a, b = np.asarray(a), np.asarray(b)
    assert (a[0] != b[0]).all() and a[0].max() < 4 and b[0].max() < 4
    counts = np.bincount(a[0] * 4 + b[0], minlength=16).reshape(4, 4)
    assert (np.diag(counts) == 0).all()
    off = counts[~np.eye(4, dtype=bool)]
    assert off.min() > 3000 / 12 * 0.75 and off.max() < 3000 / 12 * 1.25
    assert (a[1] != b[1]).all() and b[1].max() == 5
    assert (a[2] == 0).all() and (b[2] == 0).all()  # one region: no pair
    # Item k of a row split at offset 1000 draws what item 1000 + k of the whole row draws.
    a2, b2 = pairs.random_region_pairs(3, jnp.asarray([5]), jnp.asarray([1000]), mask[:1], 50)
    np.testing.assert_array_equal(np.asarray(a2)[0], a[0, 1000:1050])
    np.testing.assert_array_equal(np.asarray(b2)[0], b[0, 1000:1050])
    a3, _ = pairs.random_region_pairs(4, jnp.asarray([5]), jnp.asarray([0]), mask[:1], 50)
    assert not np.array_equal(np.asarray(a3)[0], a[0, :50])


def test_table4_rand_is_the_best_head_on_random_pairs_of_the_same_image():
    rng = np.random.default_rng(4)
    b, t, r, q, heads = 3, 4, 6, 5, 3
    layout = Layout.from_config(UniterConfig.tiny(num_layers=2, num_heads=heads))
    att = rng.random((b, heads, t + r, t + r)).astype(np.float32)
    att[:, 1, t:, t:] += 1.0  # head 1-2 is high on every region pair
    region_mask = np.ones((b, r), np.int32)
    region_mask[2, 5:] = 0
    trace = Trace(
        {"layer1": jnp.asarray(att), "layer2": jnp.asarray(att[:, ::-1] * 0.5)},
        {},
        jnp.ones((b, t), np.int32),
        jnp.asarray(region_mask),
        {},
        jnp.zeros((b, t), np.int32),
        jnp.zeros((b, r, 2)),
        "uniter",
    )
    subj = np.array([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1], [0, 2, 4, 1, 3]])
    obj = (subj + 1) % 5
    pred = rng.integers(0, 2, (b, q))
    related = rng.random((b, q)) < 0.7
    related[:, 0] = True
    for i in range(b):  # head 1-1 is highest on the related pairs
        s, o = t + subj[i][related[i]], t + obj[i][related[i]]
        att[i, 0, s, o] += 10.0
        att[i, 0, o, s] += 10.0
    trace = trace.replace(
        attention={"layer1": jnp.asarray(att), "layer2": jnp.asarray(att[:, ::-1] * 0.5)}
    )
    targets = {
        "rel.subj": jnp.asarray(subj),
        "rel.obj": jnp.asarray(obj),
        "rel.pred": jnp.asarray(np.where(related, pred, -1)),
        "rel.related": jnp.asarray(related),
        "rel.mask": jnp.ones((b, q), bool),
        "row.image": jnp.asarray([101, 202, 303]),
        "row.item_offset": jnp.asarray([0, 0, 5]),
    }
    probe = RelationProbe(["on", "has"], collect_features=False, seed=9)
    probe.bind(layout)
    stats = jax.tree.map(np.asarray, probe.step(trace, targets))
    res = probe.finalize(stats, {})
    # The twin: the same draws, scored by hand.
    ra, rb = (
        np.asarray(x)
        for x in pairs.random_region_pairs(
            9, targets["row.image"], targets["row.item_offset"], trace.region_mask, q
        )
    )
    maps = np.stack([att, att[:, ::-1] * 0.5])  # [L, B, H, N, N]
    for c, name in enumerate(["on", "has"]):
        sel = related & (pred == c)
        if not sel.any():
            continue
        vals = [
            (maps[:, i, :, t + ra[i, p], t + rb[i, p]] + maps[:, i, :, t + rb[i, p], t + ra[i, p]])
            / 2
            for i, p in zip(*np.nonzero(sel))
        ]
        mean = np.mean(vals, axis=0)  # [L, H]
        l, h = np.unravel_index(np.argmax(mean), mean.shape)
        got = res.data["per_predicate"][name]
        assert got["head"] == "1-1" and got["rand_head"] == f"{l + 1}-{h + 1}"
        assert got["rand_value"] == pytest.approx(mean[l, h], abs=1e-5)
        assert got["value"] > got["rand_value"] + 2
        assert got["rand_same_head"] == pytest.approx(mean[0, 0], abs=1e-5)
        row = next(row for row in res.tables[0].rows if row[0] == name)
        assert row[4:] == [got["rand_head"], got["rand_value"]]
    assert "Rand." in res.tables[0].header[-1]


def test_table2_rand_is_the_best_random_head_with_its_own_label():
    probe = CorefProbe(collect_features=False)
    probe.layer_names = ["layer1", "layer2"]
    stats = {}
    for key in ("v2t", "t2v", "v2t_rand", "t2v_rand"):
        stats[key + ".sum"], stats[key + ".count"] = np.full((8, 2, 3), 0.01), np.zeros(8)
    stats["v2t.count"][0] = stats["t2v.count"][0] = 1
    stats["v2t_rand.count"][0] = stats["t2v_rand.count"][0] = 1
    stats["v2t.sum"][0, 0, 0] = 0.5  # real best: 1-1
    stats["v2t_rand.sum"][0, 0, 0] = 0.1  # random at 1-1
    stats["v2t_rand.sum"][0, 1, 2] = 0.3  # random best: 2-3
    res = probe.finalize(stats, {})
    got = res.data["per_type"]["people"]["v2t"]
    assert (got["head"], got["rand_head"]) == ("1-1", "2-3")
    assert got["rand_value"] == pytest.approx(0.3) and got["rand_same_head"] == pytest.approx(0.1)
    header, row = res.tables[0].header, res.tables[0].rows[0]
    assert row[header.index("V→T (Rand.) head")] == "2-3"
    assert row[header.index("V→T (Rand.)")] == pytest.approx(0.3)


def test_embedding_probers_beyond_the_budget_train_in_layer_chunks_from_disk(tmp_path):
    """Planted: only layer 2 of 3 carries the label (the sign of e_a·e_b). With a budget of one
    layer, each layer is read from the memmaps alone and trained alone; below one layer, each
    layer's rows are streamed from the memmaps an epoch at a time. Every way finds the layer,
    and the streamed fits train as the in-memory ones (same epochs, same scores but for the
    float rounding of the standardisation statistics)."""
    rng = np.random.default_rng(0)
    n, d = 600, 4
    a, b = (
        rng.normal(size=(n, 3, d)).astype(np.float32),
        rng.normal(size=(n, 3, d)).astype(np.float32),
    )
    labels = rng.integers(0, 2, n).astype(np.int32)
    b[:, 1] = np.where(labels[:, None] == 1, a[:, 1], -a[:, 1])  # e_a·e_b = ±|e_a|²
    disk = []
    for name, x in (("a", a), ("b", b)):
        m = np.memmap(tmp_path / name, np.float32, "w+", shape=x.shape)
        m[:] = x
        m.flush()
        disk.append(np.memmap(tmp_path / name, np.float32, "r", shape=x.shape))
    # As a spilled collection comes back: one memmap per layer.
    layered = [LayerFiles([x[:, i] for i in range(3)]) for x in disk]
    sel, groups, types = np.ones(n, bool), np.arange(n) // 4, np.arange(n) // 2
    slow = {"bilinear": dict(max_epochs=300, patience=30)}
    args = (sel, labels, types, groups, 0, ["l1", "l2", "l3"], slow, 0)
    whole = pair_probers._fit_layers(a, b, *args)
    one_layer = pair_probers._fit_memory(n, d)
    chunked = pair_probers._fit_layers(*disk, *args, budget=one_layer)
    streamed = pair_probers._fit_layers(*disk, *args, budget=one_layer - 1)
    assert pair_probers._fit_layers(*layered, *args, budget=one_layer) == chunked
    assert pair_probers._fit_layers(*layered, *args, budget=one_layer - 1) == streamed
    assert "layers_per_fit" not in whole and chunked["layers_per_fit"] == 1
    assert streamed["streamed"] and "streamed" not in chunked
    assert chunked["names"] == whole["names"] == streamed["names"] == ["l1", "l2", "l3"]
    for res in (whole, chunked, streamed):
        acc = res["test_acc"]
        assert acc[1] > 0.85 and max(acc[0], acc[2]) < 0.7, acc
    for key in ("best_epoch", "epochs_run", "num_train", "num_dev", "num_test"):
        assert streamed[key] == chunked[key], key
    for key in ("train_acc", "dev_acc", "test_acc", "control_test_acc"):
        np.testing.assert_allclose(streamed[key], chunked[key], atol=1.5 / n, err_msg=key)
