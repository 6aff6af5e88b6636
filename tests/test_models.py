"""Model structure tests that need no PyTorch: region embedding vs a numpy twin, masking,
shared cross-attention, sown names. Numerical parity with HF lives in test_parity.py."""

import jax
import numpy as np
import pytest
from scipy.special import erf

import value_jax
from value_jax.models import LxmertConfig, UniterConfig, build_model, init_params


def _batch(cfg, rng, b=2, t=7, r=5, text_lens=None, region_lens=None, masked=None):
    feat_dim = cfg.img_dim if cfg.model_type == "uniter" else cfg.visual_feat_dim
    text_lens = text_lens or [t] * b
    region_lens = region_lens or [r] * b
    x1y1 = rng.uniform(0, 0.5, (b, r, 2))
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(0.1, 0.5, (b, r, 2))], -1)
    return value_jax.Batch.create(
        rng.integers(0, cfg.vocab_size, (b, t)),
        np.arange(t)[None] < np.array(text_lens)[:, None],
        rng.normal(size=(b, r, feat_dim)).clip(0),
        boxes,
        region_mask=np.arange(r)[None] < np.array(region_lens)[:, None],
        region_masked=masked,
    )


def _ln(x, p, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def test_uniter_region_embedding_matches_numpy_twin():
    cfg = UniterConfig.tiny()
    model = build_model(cfg)
    params = jax.tree_util.tree_map(np.asarray, init_params(model, jax.random.PRNGKey(1)))
    # A non-zero mask embedding, so that masked regions visibly differ.
    params["uniter"]["img_embeddings"]["mask_embedding"]["embedding"] = (
        np.random.default_rng(2).normal(size=(2, cfg.img_dim)).astype(np.float32)
    )
    rng = np.random.default_rng(0)
    masked = np.array([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]])
    batch = _batch(cfg, rng, masked=masked)
    trace = value_jax.run(model, params, batch)
    got = np.asarray(trace.hidden["embeddings"])[:, batch.text_len :]

    p = params["uniter"]["img_embeddings"]
    feats = np.asarray(batch.region_feats) + masked[..., None] * p["mask_embedding"]["embedding"][1]
    boxes = np.asarray(batch.region_boxes)
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    pos7 = np.concatenate([boxes, w[..., None], h[..., None], (w * h)[..., None]], -1)
    type1 = params["uniter"]["embeddings"]["token_type_embeddings"]["embedding"][1]
    want = _ln(
        _ln(_dense(feats, p["img_linear"]), p["img_layer_norm"])
        + _ln(_dense(pos7, p["pos_linear"]), p["pos_layer_norm"])
        + type1,
        p["LayerNorm"],
    )
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "cfg", [UniterConfig.tiny(), LxmertConfig.tiny()], ids=["uniter", "lxmert"]
)
def test_padding_changes_nothing_on_real_tokens(cfg):
    """Padded text/region slots (masked with -10000) leave every real token's state unchanged."""
    model = build_model(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    padded = _batch(cfg, rng, b=2, t=9, r=6, text_lens=[9, 5], region_lens=[6, 4])
    tight = value_jax.Batch.create(
        padded.input_ids[1:, :5],
        padded.text_mask[1:, :5],
        padded.region_feats[1:, :4],
        padded.region_boxes[1:, :4],
    )
    full, small = value_jax.run(model, params, padded), value_jax.run(model, params, tight)
    for mod, n in (("text", 5), ("image", 4)):
        a, names = full.hidden_states(mod)
        b, _ = small.hidden_states(mod)
        np.testing.assert_allclose(
            np.asarray(a)[:, 1, :n], np.asarray(b)[:, 0], atol=2e-5, err_msg=f"{mod} states differ"
        )
    for d in ("t2t", "t2v", "v2t", "v2v"):
        a, _ = full.blocks(d)
        b, _ = small.blocks(d)
        q, k = (5 if d[0] == "t" else 4), (5 if d[2] == "t" else 4)
        a = np.asarray(a)[:, 1, :, :q]
        np.testing.assert_allclose(a[..., :k], np.asarray(b)[:, 0], atol=2e-5)
        assert np.all(a[..., k:] == 0.0), f"{d}: padded keys got attention"


def test_gelu_is_erf_and_layernorm_eps():
    from value_jax.models.layers import LN_EPS, gelu

    x = np.linspace(-4, 4, 101).astype(np.float32)
    np.testing.assert_allclose(np.asarray(gelu(x)), x * 0.5 * (1 + erf(x / np.sqrt(2))), atol=1e-6)
    assert LN_EPS == 1e-12


@pytest.mark.parametrize("mean,std", [(10.0, 1.0), (100.0, 1.0), (0.0, 1e-3)])
def test_layer_norm_matches_float64_two_pass(mean, std):
    """Inputs whose mean is large next to their spread, against a float64 numpy LayerNorm.

    Float32 inputs of size `mean` carry rounding ~6e-8·mean, i.e. ~6e-8·mean/std once
    normalised, so the bound is 2e-6·mean/std, and at least 4e-6 (a few ulps of outputs of size
    ~4); torch's two-pass LayerNorm stays ~10× inside it. Flax's fast variance E[x²] − E[x]²
    errs by 5.8e-5 at mean/std = 10 and 6.3e-3 at 100; `std` = 1e-3 makes epsilon 1e-6 (Flax's
    default) visible, an error of ~1.
    """
    from value_jax.models.layers import layer_norm

    rng = np.random.default_rng(0)
    p = {
        "scale": rng.normal(1, 0.1, 768).astype(np.float32),
        "bias": rng.normal(0, 0.1, 768).astype(np.float32),
    }
    x = (mean + std * rng.normal(size=(256, 768))).astype(np.float32)
    got = np.asarray(layer_norm().apply({"params": p}, x))
    want = _ln(x.astype(np.float64), {k: v.astype(np.float64) for k, v in p.items()})
    err, bound = np.abs(got - want).max(), max(4e-6, 2e-6 * mean / std)
    assert err <= bound, f"mean {mean}, std {std}: max |diff| {err:.2e} > {bound:.1e}"


def test_lxmert_cross_attention_is_shared_and_directions_sown():
    cfg = LxmertConfig.tiny()
    model = build_model(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    layer = params["lxmert"]["encoder"]["x_layers_0"]
    assert set(layer["visual_attention"]) == {"att", "output"}  # one module for both directions
    trace = value_jax.run(model, params, _batch(cfg, np.random.default_rng(0), t=7, r=5))
    assert trace.attention["cross1.l2v"].shape == (2, cfg.num_heads, 7, 5)
    assert trace.attention["cross1.v2l"].shape == (2, cfg.num_heads, 5, 7)
    # Recompute v2l by hand from the shared weights and the layer's inputs.
    att = jax.tree_util.tree_map(np.asarray, layer["visual_attention"]["att"])
    lang_in = np.asarray(trace.hidden[f"lang{cfg.l_layers}"])
    visn_in = np.asarray(trace.hidden[f"visn{cfg.r_layers}"])
    hd = cfg.hidden_size // cfg.num_heads
    q = _dense(visn_in, att["query"]).reshape(2, 5, cfg.num_heads, hd)
    k = _dense(lang_in, att["key"]).reshape(2, 7, cfg.num_heads, hd)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    want = np.exp(s - s.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(trace.attention["cross1.v2l"]), want, atol=1e-5)


def test_attention_rows_are_distributions_and_names_documented():
    for cfg, n_maps in ((UniterConfig.tiny(), 3), (LxmertConfig.tiny(), 2 + 2 + 4 * 2)):
        model = build_model(cfg)
        params = init_params(model, jax.random.PRNGKey(0))
        trace = value_jax.run(model, params, _batch(cfg, np.random.default_rng(1)))
        maps = trace.attention_numpy()
        assert len(maps) == n_maps
        for name, a in maps.items():
            np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5, err_msg=name)


def test_output_heads_absent_from_checkpoint_are_refused():
    cfg = UniterConfig.tiny()
    model = build_model(cfg, outputs=("mlm",))
    params = init_params(model, jax.random.PRNGKey(0))
    assert "region_classifier" not in params
    with pytest.raises(ValueError, match="no weights for outputs \\['mrc'\\]"):
        value_jax.run(model, params, _batch(cfg, np.random.default_rng(0)), outputs=("mrc",))
    with pytest.raises(ValueError, match="unknown UNITER outputs"):
        value_jax.run(model, params, _batch(cfg, np.random.default_rng(0)), outputs=("vqa",))


def test_base_configs_have_the_published_sizes():
    from value_jax.models import param_shapes

    uniter = param_shapes(build_model(UniterConfig()))
    lxmert = param_shapes(build_model(LxmertConfig()))
    assert uniter["uniter"]["embeddings"]["word_embeddings"]["embedding"].shape == (28996, 768)
    assert len([k for k in uniter["uniter"]["encoder"]]) == 12
    assert uniter["region_classifier"]["net_3"]["kernel"].shape == (768, 1601)
    enc = lxmert["lxmert"]["encoder"]
    assert sum(k.startswith("layer_") for k in enc) == 9
    assert sum(k.startswith("r_layers_") for k in enc) == 5
    assert sum(k.startswith("x_layers_") for k in enc) == 5
    assert lxmert["obj_predict_head"]["decoder_dict_obj"]["kernel"].shape == (768, 1600)
    assert enc["visn_fc"]["box_fc"]["kernel"].shape == (4, 768)
