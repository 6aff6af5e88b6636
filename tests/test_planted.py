"""Planted structure: every VALUE analysis, run through its experiment entry point on a tiny model
whose weights make the answer known (`value_jax.testing.planted`), must find that answer.

Each case writes a planted checkpoint next to Flickr30k Entities data in the real formats, runs
the experiment on it in-process as `python -m experiments.<analysis>` would (a `RunConfig` with
the same flags, through the same entry point), and reads `results.json`. A run starts when the
first test reads it. Negative controls (the same pipeline without the planted head, a [CLS] pattern
that avoids the words) make the tests fail on a probe that reports its expectation regardless.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from value_jax import names
from value_jax.names import LayerId
from value_jax.testing import planted as P

N_IMAGES = 15  # 5 val images, 25 captions, ~120 links
UNITER_V2T, UNITER_T2V = (2, 3), (3, 2)  # (layer, head), 1-based as the paper names heads
LXMERT_V2T, LXMERT_T2V = (2, 3), (1, 2)  # cross layers
IMAGE_TO_TEXT = ((1, 2), (2, 4), (3, 1), (4, 3))  # no two on one head index or one diagonal
CLS_CONTROL = {
    (1, 1): "regions",
    (1, 3): "specials",
    (2, 2): "regions",
    (2, 4): "specials",
    (3, 4): "regions",
    (4, 1): "specials",
}
UNITER_COLLAPSE, LXMERT_COLLAPSE = 3, 2

# name: (experiment, model, planted (config, params)); longest runs first.
RUNS = {
    "uniter_coref": ("coref", "uniter", lambda d: P.uniter_coref(d, UNITER_V2T, UNITER_T2V)),
    "lxmert_coref": ("coref", "lxmert", lambda d: P.lxmert_coref(d, LXMERT_V2T, LXMERT_T2V)),
    "uniter_coref_control": ("coref", "uniter", lambda d: P.uniter_coref(d, planted=False)),
    "uniter_fusion": ("fusion", "uniter", lambda d: P.uniter_fusion(d, UNITER_COLLAPSE)),
    "lxmert_fusion": ("fusion", "lxmert", lambda d: P.lxmert_fusion(d, LXMERT_COLLAPSE)),
    "uniter_modality": ("modality", "uniter", lambda d: P.uniter_modality(d, IMAGE_TO_TEXT)),
    "uniter_modality_control": (
        "modality",
        "uniter",
        lambda d: P.uniter_modality(d, (), CLS_CONTROL),
    ),
}


def _experiment(root: Path, data: P.PlantedFlickr, name: str) -> Path:
    from experiments import suite
    from experiments.config import RunConfig
    from value_jax.models.configs import CONFIGS

    analysis, model, _ = RUNS[name]
    out = root / "out" / name
    vocab = data.vocab_uncased if CONFIGS[model].lowercase else data.vocab_cased
    cfg = RunConfig(
        model=model,
        checkpoint=str(root / "checkpoints" / name),
        flickr30k_root=str(data.flickr_root),
        flickr30k_features=str(data.features),
        vocab=str(vocab),
        out_dir=str(out),
        batch_size=8,
        resume=False,
    )
    suite.run_one_flickr(cfg, analysis)
    return out


class _Run:
    """One experiment run, made when first asked for (`result()`, as a future's)."""

    def __init__(self, make):
        self.result = functools.cache(make)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """`(data, {run name: its run; .result() is its out_dir})`."""
    root = tmp_path_factory.mktemp("planted")
    data = P.write_planted_flickr(root / "data", n_images=N_IMAGES)
    for name, (_, _, build) in RUNS.items():
        P.save_checkpoint(root / "checkpoints" / name, *build(data))
    return data, {name: _Run(functools.partial(_experiment, root, data, name)) for name in RUNS}


def _results(planted, name: str, analysis: str | None = None) -> dict:
    _, runs = planted
    experiment, model, _ = RUNS[name]
    path = runs[name].result() / (analysis or experiment) / model / "results.json"
    return json.loads(path.read_text())


def _label(model: str, layer_head) -> str:
    """The table label of a 1-based (layer, head): UNITER `layer<l>`, LXMERT cross layer l."""
    layer, head = layer_head
    name = LayerId("cross", layer, "v2l") if model == "lxmert" else LayerId("layer", layer)
    return names.head_label(name.name, head - 1)


# ---- the planted data itself ------------------------------------------------------------------


def test_planted_data_codes_every_link(planted):
    """Every gold link has a key word in common with its region (what the coreference heads
    can find), and few non-links do (what VCD could mistake): the tests below rely on both."""
    data, _ = planted
    assert data.links >= 80 and data.examples == 5 * (N_IMAGES // 3)
    assert data.uncoded_links == 0
    assert data.confusable_pairs <= 0.03 * data.unlinked_pairs


def test_planted_model_is_what_its_docstring_says(planted):
    """In process, one batch: identity layers, and the V→T head's region rows on S(v)."""
    import value_jax
    from value_jax.data.loaders import CorefLoader
    from value_jax.models import build_model

    data, _ = planted
    config, params = P.uniter_coref(data, UNITER_V2T, UNITER_T2V)
    model = build_model(config, outputs=())
    loader = CorefLoader(
        data.flickr_root, data.features, data.vocab_cased, lowercase=False, batch_size=8
    )
    batch, targets = next(iter(loader))
    trace = value_jax.run(model, params, batch)
    hidden = {k: np.asarray(v) for k, v in trace.hidden.items()}
    for name, h in hidden.items():
        np.testing.assert_allclose(h, hidden["embeddings"], atol=1e-4, err_msg=name)
    tokens = Path(data.vocab_cased).read_text().splitlines()
    v2t = np.asarray(trace.blocks("v2t", [f"layer{UNITER_V2T[0]}"])[0])[0, :, UNITER_V2T[1] - 1]
    checked = 0
    for row, index in enumerate(targets["example_index"]):
        if index < 0:
            continue
        example = loader.examples[index]
        words = [tokens[i].lower() for i in example.input_ids]
        for region, keys in enumerate(data.region_keys[example.image_id]):
            on_keys = [w in keys for w in words]
            if any(on_keys):
                mass = v2t[row, region, : len(words)][np.array(on_keys)].sum()
                assert mass > 0.99, (example.id, region, sorted(keys), mass)
                checked += 1
    assert checked >= 10


# ---- (a) visual coreference, VALUE §3.3.2-3.3.3 ------------------------------------------------


@pytest.mark.parametrize(
    "name,v2t,t2v",
    [("uniter_coref", UNITER_V2T, UNITER_T2V), ("lxmert_coref", LXMERT_V2T, LXMERT_T2V)],
)
def test_coref_names_the_planted_heads(planted, name, v2t, t2v):
    data, _ = planted
    model = RUNS[name][1]
    res = _results(planted, name)
    assert res["links"] == data.links
    assert len(res["per_type"]) >= 5, sorted(res["per_type"])
    for type_name, entry in res["per_type"].items():
        for direction, head in (("v2t", v2t), ("t2v", t2v)):
            got = entry[direction]
            assert got["head"] == _label(model, head), (type_name, direction, got)
            assert got["value"] >= 0.25, (type_name, direction, got)
            assert got["value"] >= got["rand_same_head"] + 0.2, (type_name, direction, got)
    # Per type, the planted head is clearly above every other head (those stay uniform).
    for direction, (layer, head) in (("v2t", v2t), ("t2v", t2v)):
        means = np.array(res["mean_per_head"][direction], dtype=float)  # [type, L, H]
        means = means[means.sum(axis=(1, 2)) > 0].reshape(-1, means[0].size)  # types present
        planted_head = (layer - 1) * res["heads"] + head - 1
        others = np.delete(means, planted_head, axis=1)
        assert (means[:, planted_head] - others.max(axis=1)).min() >= 0.15, (direction, means)
    vcd = res["probers"]["VCD"]["attention_prober"]
    assert vcd["test_acc"][0] >= 0.95 and vcd["majority_acc"] <= 0.7, vcd


def test_coref_control_singles_out_no_head(planted):
    res = _results(planted, "uniter_coref_control")
    for type_name, entry in res["per_type"].items():
        for direction in ("v2t", "t2v"):
            got = entry[direction]
            assert got["value"] < 0.1, (type_name, direction, got)
            assert got["value"] <= got["rand_same_head"] + 0.02, (type_name, direction, got)
    for direction in ("v2t", "t2v"):
        means = np.array(res["mean_per_head"][direction], dtype=float)
        spread = means.max(axis=(1, 2)) - means.min(axis=(1, 2))
        assert spread.max() < 0.01, (direction, spread)
    vcd = res["probers"]["VCD"]["attention_prober"]
    assert vcd["test_acc"][0] <= 0.8, vcd


# ---- (b) image-to-text heads and (d) modality importance, VALUE §3.2-3.3.1 ----------------------


def test_image_to_text_probability_is_one_at_the_planted_heads(planted):
    data, _ = planted
    res = _results(planted, "uniter_modality", "image_to_text")
    expected = np.zeros((4, 4))
    for layer, head in IMAGE_TO_TEXT:
        expected[layer - 1, head - 1] = 1.0
    np.testing.assert_allclose(np.array(res["probability"]), expected, atol=1e-6)
    assert res["samples"] == data.examples


def test_cls_attending_to_the_words_gives_text_importance_one(planted):
    data, _ = planted
    res = _results(planted, "uniter_modality")
    text, image = np.array(res["per_head_text"]), np.array(res["per_head_image"])
    assert text.shape == (4, 4) and text.min() >= 0.95 and image.max() <= 0.05, (text, image)
    assert min(res["per_layer_text"]) >= 0.95 and max(res["per_layer_image"]) <= 0.05
    assert res["overall_text"] >= 0.95 * text.size and res["overall_image"] <= 0.05
    assert res["samples"] == data.examples


def test_modality_control_follows_the_cls_pattern(planted):
    """[CLS] on the regions in some heads and on [CLS]/[SEP] (which Eq. 1 leaves out) in
    others; no image-to-text head at all."""
    res = _results(planted, "uniter_modality_control")
    expected_text, expected_image = np.ones((4, 4)), np.zeros((4, 4))
    for (layer, head), target in CLS_CONTROL.items():
        expected_text[layer - 1, head - 1] = 0.0
        expected_image[layer - 1, head - 1] = float(target == "regions")
    np.testing.assert_allclose(np.array(res["per_head_text"]), expected_text, atol=0.05)
    np.testing.assert_allclose(np.array(res["per_head_image"]), expected_image, atol=0.05)
    i2t = _results(planted, "uniter_modality_control", "image_to_text")
    assert np.array(i2t["probability"]).max() == 0.0


# ---- (c) multimodal fusion, VALUE §3.1 ------------------------------------------------------


@pytest.mark.parametrize(
    "name,layers,collapse",
    [
        ("uniter_fusion", ["1", "2", "3", "4"], UNITER_COLLAPSE),
        ("lxmert_fusion", ["x1", "x2", "x3"], LXMERT_COLLAPSE),
    ],
)
def test_fusion_nmi_drops_to_zero_where_the_modalities_coincide(planted, name, layers, collapse):
    data, _ = planted
    res = _results(planted, name)
    assert res["layers"] == layers and res["samples"] == data.examples
    nmi = np.array(res["nmi"])
    assert nmi[: collapse - 1].min() >= 0.5, nmi
    assert nmi[collapse - 1 :].max() <= 0.05, nmi
