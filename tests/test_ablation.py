"""Cross-modal input ablation (Frank et al. 2021): data, losses, planted models, entry point."""

import math
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import value_jax
from value_jax.data import ablation_data as A
from value_jax.data.ablation_loader import AblationLoader
from value_jax.data.alignment import phrase_overlap
from value_jax.data.demo import make_demo_data
from value_jax.data.errors import DataReport
from value_jax.data.features import dataset_mean_feature, open_region_features
from value_jax.data.fixtures.features import write_lxmert_tsv
from value_jax.data.tokenization import WordPieceTokenizer
from value_jax.models import LxmertConfig, UniterConfig, build_model, param_shapes
from value_jax.probes import ablation as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEAT = 24
PAD, CLS, SEP, MASK = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# Losses against hand computation.


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_and_xe_match_numpy_and_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 1601)).astype(np.float32) * 3
    probs = rng.dirichlet(np.ones(1601) * 0.05, 5).astype(np.float32)
    probs[:, :700] = 0.0  # 0 log 0 = 0, as F.kl_div (xlogy) does
    probs /= probs.sum(1, keepdims=True)
    logq = _log_softmax(logits.astype(np.float64))
    nz = probs > 0
    want_kl = np.where(nz, probs * (np.log(np.where(nz, probs, 1.0)) - logq), 0.0).sum(1)
    np.testing.assert_allclose(
        np.asarray(P.kl_divergence(probs, logits)), want_kl, rtol=1e-5, atol=1e-5
    )
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    ref = F.kl_div(
        F.log_softmax(torch.tensor(logits), -1), torch.tensor(probs), reduction="none"
    ).sum(-1)
    np.testing.assert_allclose(
        np.asarray(P.kl_divergence(probs, logits)), ref.numpy(), rtol=1e-5, atol=1e-5
    )
    idx = np.array([0, 5, 1600, 42, 7])
    np.testing.assert_allclose(
        np.asarray(P.cross_entropy(logits, idx)), -logq[np.arange(5), idx], rtol=1e-5
    )


def test_masked_lm_bits_is_mean_nats_over_masked_tokens_divided_by_ln2():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (3, 6))
    mask = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), labels[..., None], -1)[
        ..., 0
    ]
    want = np.array([nll[0, 1:3].mean(), nll[1, 3], 0.0]) / math.log(2)
    np.testing.assert_allclose(np.asarray(P.masked_lm_bits(logits, labels, mask)), want, rtol=1e-5)
    assert want[0] > nll[0, 1:3].mean()  # bits are larger than nats


def _lang4vis_targets(obj, conf, probs, region):
    b = len(obj)
    return {
        "setting": np.zeros(b, np.int32),
        "type": np.zeros(b, np.int32),
        "valid": np.ones(b, bool),
        "label_match": np.zeros(b, bool),
        "target_region": np.asarray(region, np.int32),
        "target_object": np.asarray(obj, np.int32),
        "target_conf": np.asarray(conf, np.float32),
        "target_probs": probs,
        "has_probs": np.ones(b, bool),
    }


def test_mrc_xe_uses_object_id_plus_one_not_the_reference_off_by_one():
    """The detector's class k (0-based over 1600) is column k+1 of the 1601-way head. The logits
    put the mass on k+1 and almost none on k: the right index gives a small XE, VOLTA's
    `xent_1601` (index k) a large one."""
    obj = np.array([0, 41, 1599])
    logits = np.full((3, 2, 1601), -5.0, np.float32)
    for i, k in enumerate(obj):
        logits[i, 1, k + 1] = 8.0  # the detected class
        logits[i, 1, k] = -9.0  # what the off-by-one index would read
    probs = np.zeros((3, 1601), np.float32)
    probs[np.arange(3), obj + 1] = 1.0
    probe = P.Lang4VisProbe([A.Lang4Vis("none")], "uniter")
    trace = types.SimpleNamespace(outputs={"mrc": logits})
    stats = jax.device_get(probe.step(trace, _lang4vis_targets(obj, [0.5] * 3, probs, [1, 1, 1])))
    res = probe.finalize({k: np.asarray(v, np.float64) for k, v in stats.items()}, {})
    logq = _log_softmax(logits[:, 1].astype(np.float64))
    right = -logq[np.arange(3), obj + 1].mean()
    off_by_one = -logq[np.arange(3), obj].mean()
    got = res.data["mrc_xe_nats"]["none"]["mean"]
    assert got == pytest.approx(right, abs=1e-6)
    assert off_by_one - got > 10.0
    assert res.data["mrc_kl_nats"]["none"]["mean"] == pytest.approx(
        right, abs=1e-6
    )  # one-hot p: KL = XE
    assert res.data["top1_matches_detector"]["none"] == 1.0
    assert P.Lang4VisProbe([A.Lang4Vis()], "uniter").outputs == ("mrc",)


def test_lxmert_mrc_xe_is_confidence_weighted_on_the_1600_way_head():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 3, 1600)).astype(np.float32)
    obj, conf, region = (
        np.array([0, 7, 1599, 300]),
        np.array([0.9, 0.2, 0.5, 1.0]),
        np.array([2, 0, 1, 2]),
    )
    probe = P.Lang4VisProbe([A.Lang4Vis("none")], "lxmert")
    assert probe.outputs == ("obj",)
    stats = jax.device_get(
        probe.step(
            types.SimpleNamespace(outputs={"obj": logits}),
            _lang4vis_targets(obj, conf, np.zeros((4, 1), np.float32), region),
        )
    )
    res = probe.finalize({k: np.asarray(v, np.float64) for k, v in stats.items()}, {})
    ce = -_log_softmax(logits[np.arange(4), region].astype(np.float64))[np.arange(4), obj]
    assert res.data["mrc_xe_nats"]["none"]["mean"] == pytest.approx((conf * ce).mean(), rel=1e-5)
    assert res.data["mrc_xe_unweighted_nats"]["none"]["mean"] == pytest.approx(ce.mean(), rel=1e-5)
    assert res.data["mrc_kl_nats"] is None
    row = next(
        line for line in res.to_markdown().splitlines() if line.startswith("| LXMERT | none")
    )
    assert row.split(" | ")[2] == "—", row


def test_fold_classes_keeps_background_and_total_mass():
    p = np.random.default_rng(4).dirichlet(np.ones(1601)).astype(np.float32)
    folded, obj = A.fold_classes(p, 1234, 10)
    assert folded.shape == (11,) and folded[0] == p[0] and obj == 1234 % 10
    assert folded.sum() == pytest.approx(1.0, abs=1e-5)
    same, obj = A.fold_classes(p, 1234, 1600)
    assert same is p and obj == 1234


# ---------------------------------------------------------------------------------------------
# Planted models.


def _mirror_kernel(rng, fan_in, hidden):
    """Writes `W f` into dims 0..7 and `-W f` into 8..15: every later LayerNorm sees a zero-mean
    input, so it only rescales the feature direction (it cannot leak into other dims)."""
    w = rng.normal(size=(fan_in, 8)) / math.sqrt(fan_in)
    k = np.zeros((fan_in, hidden), np.float32)
    k[:, 0:8], k[:, 8:16] = w, -w
    return k


def _sign_layer(fan_in, hidden, s=10.0):
    """Dims 16/17 = ±s (0.5 - x1): after the LayerNorm they are ±sqrt(D/2) * sign(0.5 - x1)."""
    k = np.zeros((fan_in, hidden), np.float32)
    b = np.zeros(hidden, np.float32)
    k[0, 16], k[0, 17], b[16], b[17] = -s, s, 0.5 * s, -0.5 * s
    return {"kernel": k, "bias": b}


def _ln_on(dims, hidden):
    scale = np.zeros(hidden, np.float32)
    scale[dims] = 1.0
    return {"scale": scale, "bias": np.zeros(hidden, np.float32)}


def _query_key(hidden, heads, strength):
    """Every head's query is the constant e_0 and its key reads dim 16, so the score of a key is
    `strength * x_16 / sqrt(head_dim)`: + for regions left of x = 0.5, - right of it, 0 for
    keys without dim 16 (text)."""
    hd = hidden // heads
    q = {"kernel": np.zeros((hidden, hidden), np.float32), "bias": np.zeros(hidden, np.float32)}
    k = {"kernel": np.zeros((hidden, hidden), np.float32), "bias": np.zeros(hidden, np.float32)}
    for h in range(heads):
        q["bias"][h * hd] = 1.0
        k["kernel"][16, h * hd] = strength
    return q, k


def _random_params(model, rng):
    """Random weights filled in numpy from the shapes (compiling `model.init` costs seconds)."""

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return np.full(leaf.shape, float(name == "scale"), np.float32)
        scale = 1.0 / math.sqrt(leaf.shape[0] if name == "kernel" else 32)
        return (rng.normal(size=leaf.shape) * scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, param_shapes(model))


def planted(model_type):
    """A 1-layer model whose masked phrase tokens see ONLY the regions left of x = 0.5 (the
    fixture puts exactly the regions on the phrase's gold box there, IoT > 0.5, and the others
    right of it, IoT = 0).

    How: region features go through `_mirror_kernel` into dims 0-15 and the box's x1 through
    `_sign_layer` into dims 16-17; with zero-mean inputs every LayerNorm is a pure rescaling, so
    a region's dim 16 is ±const by the side of x = 0.5, whatever its features. The text→region
    attention score is then ±~100 (`_query_key`), and exp(-200) underflows to exactly 0 in
    float32: the other regions get zero weight. UNITER has one layer (text reads regions only in
    its attention); LXMERT has no relational layer and one cross layer (text reads regions only
    in the language→vision cross-attention). Values and everything else stay random, so the
    phrase prediction depends on the aligned regions' features; the MLM transform LayerNorm is
    scaled 5x so the predictions are peaked. Labels are planted by `_plant_labels`.
    """
    rng = np.random.default_rng(7)
    if model_type == "uniter":
        cfg = UniterConfig.tiny(
            num_layers=1, hidden_size=32, num_heads=4, img_dim=FEAT, vocab_size=60
        )
    else:
        cfg = LxmertConfig.tiny(
            l_layers=1,
            r_layers=0,
            x_layers=1,
            hidden_size=32,
            num_heads=4,
            visual_feat_dim=FEAT,
            vocab_size=60,
        )
    model = build_model(cfg)
    params = _random_params(model, rng)
    d = cfg.hidden_size
    if model_type == "uniter":
        img = params["uniter"]["img_embeddings"]
        img["img_linear"] = {
            "kernel": _mirror_kernel(rng, FEAT, d),
            "bias": np.zeros(d, np.float32),
        }
        img["img_layer_norm"] = _ln_on(np.arange(16), d)
        img["pos_linear"] = _sign_layer(7, d)
        img["pos_layer_norm"] = _ln_on([16, 17], d)
        img["LayerNorm"] = _ln_on(np.arange(d), d)
        params["uniter"]["embeddings"]["token_type_embeddings"]["embedding"][1] = 0.0
        for key in ("scale", "bias"):  # text keys carry nothing in dim 16
            params["uniter"]["embeddings"]["LayerNorm"][key][[16, 17]] = 0.0
        att = params["uniter"]["encoder"]["layer_0"]["attention"]["self"]
        att["query"], att["key"] = _query_key(d, cfg.num_heads, 100.0)
        params["cls"]["predictions"]["transform"]["LayerNorm"]["scale"] *= 5.0
    else:
        v = params["lxmert"]["encoder"]["visn_fc"]
        v["visn_fc"] = {"kernel": _mirror_kernel(rng, FEAT, d), "bias": np.zeros(d, np.float32)}
        v["visn_layer_norm"] = _ln_on(np.arange(16), d)
        v["box_fc"] = _sign_layer(4, d)
        v["box_layer_norm"] = _ln_on([16, 17], d)
        att = params["lxmert"]["encoder"]["x_layers_0"]["visual_attention"]["att"]
        att["query"], att["key"] = _query_key(d, cfg.num_heads, 150.0)
        params["cls"]["predictions"]["transform"]["LayerNorm"]["scale"] *= 5.0
    return model, params


def _planted_data(n_images=4, seed=0):
    """Images 100x100: 3 jittered copies of the phrase's gold box (left half), 5 boxes in the
    right half overlapping no gold box; captions `[CLS] w w [phrase p p] w [SEP]`."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n_images):
        gold = np.array([[5 + i, 10, 40, 60 + i]], np.float64)
        aligned = gold + rng.uniform(-2, 2, (3, 4))
        x1 = rng.uniform(60, 70, 5)
        others = np.stack(
            [x1, rng.uniform(0, 40, 5), x1 + rng.uniform(10, 28, 5), rng.uniform(50, 99, 5)], 1
        )
        boxes = np.concatenate([aligned, others])[rng.permutation(8)]
        feats = rng.normal(size=(8, FEAT)).astype(np.float32) * 2
        probs = rng.dirichlet(np.ones(1601), 8).astype(np.float32)
        obj = probs[:, 1:].argmax(1)
        regions = A.ImageRegions(
            str(i),
            feats,
            boxes,
            (boxes / 100).astype(np.float32),
            probs,
            obj,
            probs[np.arange(8), obj + 1],
        )
        ids = np.array([CLS, 10 + i, 11, 20, 21, 12, SEP], np.int32)
        iot = phrase_overlap([gold], boxes, "iot", True)[0].astype(np.float32)
        iou = phrase_overlap([gold], boxes, "iou", True)[0].astype(np.float32)
        examples.append(
            A.AblationExample(
                f"{i}:0:0", str(i), 0, 0, "p p", "people", ids, (3, 5), regions, iot, iou, "p"
            )
        )
    mean = np.mean([e.regions.features.mean(0) for e in examples], 0).astype(np.float32)
    return A.AblationData(examples, mean, MASK, PAD, DataReport())


def _row_bits(model, params, loader):
    """{(setting name, example index): bits} from a plain forward of every collated row."""
    out = {}
    for batch, tg in loader:
        trace = value_jax.run(model, params, batch, outputs=("mlm",))
        bits = np.asarray(P.masked_lm_bits(trace.outputs["mlm"], tg["labels"], tg["label_mask"]))
        for i in np.flatnonzero(tg["valid"]):
            out[loader.settings[tg["setting"][i]].name, int(tg["example_index"][i])] = float(
                bits[i]
            )
    return out


def _by_hand(model, params, data, left_feature=None):
    """`[E, T, V]` float64 MLM log-probabilities with the phrase masked, built without the loader
    (padded to the loader's shapes, so nothing recompiles); `left_feature` replaces the features
    of the regions left of x = 0.5 — in this fixture, exactly the gold-box regions."""
    n, t, r = len(data.examples), 16, 36
    ids, feats, boxes = np.zeros((n, t), np.int32), np.zeros((n, r, FEAT)), np.zeros((n, r, 4))
    text_mask, region_mask = np.zeros((n, t)), np.zeros((n, r))
    for i, ex in enumerate(data.examples):
        k, m = len(ex.input_ids), ex.regions.num_regions
        ids[i, :k], text_mask[i, :k] = ex.input_ids, 1
        ids[i, ex.span[0] : ex.span[1]] = MASK
        feats[i, :m], boxes[i, :m], region_mask[i, :m] = (
            ex.regions.features,
            ex.regions.normalized_boxes,
            1,
        )
        if left_feature is not None:
            feats[i, :m][ex.regions.normalized_boxes[:, 0] < 0.5] = left_feature
    batch = value_jax.Batch.create(ids, text_mask, feats, boxes, region_mask)
    logits = value_jax.run(model, params, batch, outputs=("mlm",)).outputs["mlm"]
    return _log_softmax(np.asarray(logits, np.float64))


def _plant_labels(model, params, data, margin=0.3):
    """Each phrase piece := the most likely (non-special) token among those whose
    log-probability the aligned regions raise by > `margin` nats over the dataset-mean feature.
    The input there is [MASK] in every setting, so planting changes no input; it makes a correct
    `object` ablation raise the loss by construction, while ablating any other region cannot
    change it (zero attention)."""
    logp = _by_hand(model, params, data)
    gain = logp - _by_hand(model, params, data, data.mean_feature)
    for i, ex in enumerate(data.examples):
        for t in range(*ex.span):
            ok = gain[i, t, 4:] > margin
            assert ok.any(), "the aligned regions raise no token's probability"
            ex.input_ids[t] = 4 + np.argmax(np.where(ok, logp[i, t, 4:], -np.inf))


@pytest.mark.parametrize("model_type", ["uniter", "lxmert"])
def test_planted_object_ablation(model_type):
    model, params = planted(model_type)
    data = _planted_data()
    _plant_labels(model, params, data)
    settings = [
        A.Vis4Lang("none"),
        A.Vis4Lang("object", 0.5),
        A.Vis4Lang("all"),
        A.Vis4Lang("outside"),
    ]
    n = len(data.examples)
    bits = _row_bits(model, params, AblationLoader(data, settings, n, model_type))
    logp = _by_hand(model, params, data)
    for e, ex in enumerate(data.examples):
        # `none` reproduces the unablated input's loss.
        nll = -logp[e, np.arange(*ex.span), ex.input_ids[ex.span[0] : ex.span[1]]]
        assert bits["none", e] == pytest.approx(nll.mean() / math.log(2), abs=1e-6)
        assert bits["object@0.50", e] > bits["none", e] + 0.05, (e, bits)
        assert abs(bits["outside", e] - bits["none", e]) < 1e-6
        assert bits["all", e] >= bits["object@0.50", e] - 1e-6
    # The probe through the runner gives the means of the same per-row numbers.
    from experiments.ablation import run_ablation

    res = run_ablation(model, params, data, settings, [], n, progress_every=1000)
    per = res.data["vis4lang"]["settings"]
    for name in ("none", "object@0.50", "all", "outside"):
        want = np.mean([bits[name, e] for e in range(n)])
        assert per[name]["mean"] == pytest.approx(want, abs=1e-6)
        assert per[name]["per_type"]["people"] == pytest.approx(want, abs=1e-6)
    assert per["object@0.50"]["relative_change_pct"] > 0
    assert per["none"]["relative_change_pct"] == 0.0


# ---------------------------------------------------------------------------------------------
# Data preparation and collation on the demo files.


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=0, n_images=6, feat_dim=16)


def _prepare(demo, **kw):
    tok = WordPieceTokenizer(demo.vocab_uncased, lowercase=True)
    features = kw.pop("features", demo.flickr_features_tsv)
    return A.prepare_ablation(demo.flickr_root, features, tok, **kw)


def test_dataset_mean_replaces_ablated_regions_and_masking_zeroes_them(demo):
    data = _prepare(demo)
    with open_region_features(demo.flickr_features_tsv) as reader:
        want = dataset_mean_feature(reader, [e.image_id for e in data.examples])
    np.testing.assert_allclose(data.mean_feature, want, rtol=1e-6)
    assert np.abs(data.mean_feature).sum() > 0
    seen = 0
    for batch, tg in AblationLoader(
        data, [A.Vis4Lang("all"), A.Vis4Lang("object", 0.5)], 4, "lxmert"
    ):
        feats, real = np.asarray(batch.region_feats), np.asarray(batch.region_mask) > 0
        assert not feats[~real].any()  # padding stays zero
        for i in np.flatnonzero(tg["valid"]):
            seen += 1
            ex = data.examples[tg["example_index"][i]]
            row = feats[i, : ex.regions.num_regions]
            ablated = np.ones(len(row), bool) if tg["setting"][i] == 0 else ex.iot > 0.5
            np.testing.assert_array_equal(
                row[ablated], np.tile(data.mean_feature, (ablated.sum(), 1))
            )
            np.testing.assert_array_equal(row[~ablated], ex.regions.features[~ablated])
            assert tg["num_ablated"][i] == ablated.sum()
            assert (np.asarray(batch.input_ids)[i, ex.span[0] : ex.span[1]] == data.mask_id).all()
            assert (
                tg["labels"][i, ex.span[0] : ex.span[1]] == ex.input_ids[ex.span[0] : ex.span[1]]
            ).all()
            assert tg["label_mask"][i].sum() == ex.span[1] - ex.span[0]
    assert seen == 2 * len(data.examples)
    for model_type in ("uniter", "lxmert"):
        loader = AblationLoader(
            data, [A.Lang4Vis("all")], 4, model_type, head_classes=1601, fold=True
        )
        for batch, tg in loader:
            for i in np.flatnonzero(tg["valid"]):
                ex = data.examples[tg["example_index"][i]]
                masked = ex.iot > 0.5
                assert not np.asarray(batch.region_feats)[i, : len(masked)][masked].any()
                flagged = np.asarray(batch.region_masked)[i, : len(masked)] > 0
                assert (flagged == (masked & (model_type == "uniter"))).all()
                ids = np.asarray(batch.input_ids)[i, : len(ex.input_ids)]
                assert ids[0] == ex.input_ids[0] and ids[-1] == ex.input_ids[-1]
                assert (ids[1:-1] == data.mask_id).all()
                k = tg["target_region"][i]
                assert masked[k] and ex.iou[k] == ex.iou[masked].max()
                assert tg["target_object"][i] == ex.regions.object_ids[k] % (
                    1601 - (model_type == "uniter")
                )


def test_counts_every_left_out_phrase(demo, tmp_path):
    base = _prepare(demo)
    short = _prepare(demo, max_text_len=9)
    assert short.report["phrases_truncated"] > 0
    assert len(short.examples) + short.report["phrases_truncated"] == len(base.examples)
    assert base.report["notvisual_phrases"] > 0 and base.report["phrases_without_box"] > 0
    assert "phrases_truncated" in base.report.to_dict()  # listed even at zero
    dropped = base.examples[0].image_id
    with open_region_features(demo.flickr_features_tsv) as reader:
        keep = [i for i in reader.image_ids() if i != dropped]
        write_lxmert_tsv(tmp_path / "part.tsv", (reader[i] for i in keep))
    part = _prepare(demo, features=tmp_path / "part.tsv")
    assert part.report["images_without_features"] == 1
    missing = len(base.examples) - len(part.examples)
    assert missing > 0 and part.report["examples_without_features"] == missing
    loader = AblationLoader(
        base, [A.Lang4Vis("none", threshold=1.0)], 4, "lxmert", head_classes=1600
    )
    assert len(loader) == 0 and base.report["lang4vis_no_region_masked"] == len(base.examples)


def test_label_match(demo, tmp_path):
    names = [f"class{k}" for k in range(1600)]
    names[5], names[9] = "man,men", "dog"
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("\n".join(names), encoding="utf-8")
    table = A.read_objects_vocab(vocab)
    assert A.match_label("men", table) == 5 and A.match_label("dogs", table) == 9
    assert A.match_label("cat", table) == -1 and A.head_noun(["A", "Dog"]) == "dog"
    data = _prepare(demo, objects_vocab=vocab)
    flagged = [e for e in data.examples if e.label_match]
    assert flagged and all(e.head_noun in ("man", "men", "dog", "dogs") for e in flagged)
    assert len(data.label_match_subset().examples) == len(flagged)
    with pytest.raises(ValueError, match="objects_vocab"):
        _prepare(demo).label_match_subset()


def _one_hot_mrc(obj, probs_on=True):
    logits = np.full((len(obj), 2, 1601), -5.0, np.float32)
    logits[np.arange(len(obj)), 1, np.asarray(obj) + 1] = 3.0
    probs = np.zeros((len(obj), 1601), np.float32)
    probs[np.arange(len(obj)), np.asarray(obj) + 1] = 1.0
    return logits, probs


def _lang4vis_result(probe, obj, types_of=None):
    logits, probs = _one_hot_mrc(obj)
    targets = _lang4vis_targets(obj, [1.0] * len(obj), probs, [1] * len(obj))
    if types_of is not None:
        targets["type"] = np.asarray(types_of, np.int32)
    stats = jax.device_get(probe.step(types.SimpleNamespace(outputs={"mrc": logits}), targets))
    return probe.finalize({k: np.asarray(v, np.float64) for k, v in stats.items()}, {})


def test_mrc_tables_print_bits_and_the_json_keeps_nats():
    res = _lang4vis_result(P.Lang4VisProbe([A.Lang4Vis("none")], "uniter"), [3, 8, 100])
    kl, xe = res.data["mrc_kl_nats"]["none"]["mean"], res.data["mrc_xe_nats"]["none"]["mean"]
    assert res.data["units"].startswith("nats") and kl > 0.01
    main = res.tables[0]
    assert "MRC-KL (bits)" in main.header and "MRC-XE (bits)" in main.header
    row = main.rows[0]
    assert row[main.header.index("MRC-KL (bits)")] == pytest.approx(kl / math.log(2))
    assert row[main.header.index("MRC-XE (bits)")] == pytest.approx(xe / math.log(2))
    per_type = res.tables[1]
    assert "(bits)" in per_type.caption and per_type.rows[0][-1] == pytest.approx(kl / math.log(2))
    assert not any("nats" in t.caption or any("nats" in h for h in t.header) for t in res.tables)


def test_reference_average_adds_zero_loss_for_examples_without_a_masked_region():
    obj, kinds = [3, 8, 100], [0, 0, 1]
    unmasked = {"count": [[2, 0] + [0] * 6], "label_match": [0]}
    masked = _lang4vis_result(P.Lang4VisProbe([A.Lang4Vis("none")], "uniter"), obj, kinds)
    ref_probe = P.Lang4VisProbe(
        [A.Lang4Vis("none")], "uniter", average="reference", unmasked=unmasked
    )
    ref = _lang4vis_result(ref_probe, obj, kinds)
    for key in ("mrc_kl_nats", "mrc_xe_nats"):
        m, r = masked.data[key]["none"], ref.data[key]["none"]
        assert (m["count"], r["count"]) == (3, 5)
        assert r["mean"] == pytest.approx(m["mean"] * 3 / 5)
        people = masked.data[key]["none"]["per_type"]["people"]
        assert r["per_type"]["people"] == pytest.approx(people * 2 / 4)
        assert r["per_type"]["clothing"] == pytest.approx(m["per_type"]["clothing"])
    assert (masked.data["average"], ref.data["average"]) == ("masked", "reference")
    assert "count as 0" in ref.tables[0].caption
    with pytest.raises(ValueError, match="unmasked"):
        P.Lang4VisProbe([A.Lang4Vis("none")], "uniter", average="reference")


def test_unmasked_counts_are_the_examples_left_out(demo):
    data = _prepare(demo)
    settings = [A.Lang4Vis("none", 0.5), A.Lang4Vis("all", 1.0)]
    loader = AblationLoader(data, settings, 4, "lxmert", head_classes=1600)
    counts = loader.unmasked_counts()
    rows = {s: 0 for s in range(2)}
    for _, tg in loader:
        for s in tg["setting"][tg["valid"]]:
            rows[int(s)] += 1
    for s in range(2):
        assert sum(counts["count"][s]) + rows[s] == len(data.examples)
    assert sum(counts["count"][1]) == len(data.examples)  # IoT > 1 masks nothing
    assert sum(counts["count"][0]) == data.report["lang4vis_no_region_masked"]
    with pytest.raises(ValueError, match="Lang4Vis"):
        AblationLoader(data, [A.Vis4Lang("none")], 4, "lxmert").unmasked_counts()


def test_examples_cite_their_caption_by_file_and_1_based_line(demo):
    import ast
    from pathlib import Path

    def line_of(place):  # "<image id>.txt:<1-based line>" -> that line
        name, line = place.split(":")
        return (Path(demo.flickr_root) / "Sentences" / name).read_text().splitlines()[int(line) - 1]

    data = _prepare(demo, max_text_len=9)
    for ex in data.examples:
        place, phrase = ex.id.split(" phrase ")
        assert place == f"{ex.image_id}.txt:{ex.sentence_index + 1}"
        assert int(phrase) == ex.phrase_index + 1 and ex.phrase in line_of(place)
    cited = data.report.examples("phrases_truncated")
    assert cited
    for c in cited:
        place, text = c.split(" ", 1)
        assert ast.literal_eval(text) in line_of(place), c


# ---------------------------------------------------------------------------------------------
# The experiment, end to end on the demo.


def test_experiment_writes_every_file(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.ablation",
            "--model=uniter",
            f"--out_dir={out}",
            "--sweep=0.3,0.7",
            "--batch_size=8",
            "--lang4vis_average=reference",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built-in demo" in proc.stderr
    res = out / "ablation" / "uniter"
    for name in (
        "results.json",
        "table.md",
        "flags.json",
        "ablation_iot_sweep.png",
        "ablation_iot_sweep.svg",
    ):
        assert (res / name).is_file() and (res / name).stat().st_size > 0, name
    assert not (out / "_state" / "ablation" / "uniter").exists()
    import json

    data = json.loads((res / "results.json").read_text())
    assert set(data["vis4lang"]["settings"]) == {
        "none",
        "all",
        "object@0.30",
        "object@0.50",
        "object@0.70",
    }
    assert set(data["lang4vis"]["mrc_kl_nats"]) == {"none", "phrase", "all"}
    assert data["lang4vis"]["average"] == "reference"
    assert json.loads((res / "flags.json").read_text())["lang4vis_average"] == "reference"
    table = (res / "table.md").read_text()
    assert "Δ vs none" in table and "MRC-KL" in table
