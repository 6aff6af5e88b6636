"""Trace: blocks are the right slices, layouts are right, names in forward order."""

import jax
import numpy as np
import pytest

import value_jax
from value_jax.models import LxmertConfig, UniterConfig, build_model, init_params


def _run(cfg, text_lens=(7, 5), region_lens=(5, 3)):
    model = build_model(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    b, t, r = 2, 7, 5
    feat = cfg.feature_dim
    batch = value_jax.Batch.create(
        rng.integers(0, cfg.vocab_size, (b, t)),
        np.arange(t)[None] < np.array(text_lens)[:, None],
        rng.random((b, r, feat)),
        np.tile([0.1, 0.2, 0.6, 0.7], (b, r, 1)),
        region_mask=np.arange(r)[None] < np.array(region_lens)[:, None],
    )
    return value_jax.run(model, params, batch)


def test_uniter_blocks_are_slices_of_the_joint_map():
    tr = _run(UniterConfig.tiny())
    joint = np.asarray(tr.attention["layer2"])
    t = tr.text_len
    for d, (q, k) in {
        "t2t": (slice(0, t), slice(0, t)),
        "t2v": (slice(0, t), slice(t, None)),
        "v2t": (slice(t, None), slice(0, t)),
        "v2v": (slice(t, None), slice(t, None)),
    }.items():
        blocks, names = tr.blocks(d)
        assert names == ["layer1", "layer2", "layer3"]
        np.testing.assert_array_equal(np.asarray(blocks[1]), joint[:, :, q, k])
    # Joint normalisation is kept: t2t + t2v rows sum to 1 on real queries.
    tt, tv = np.asarray(tr.blocks("t2t")[0]), np.asarray(tr.blocks("t2v")[0])
    np.testing.assert_allclose((tt.sum(-1) + tv.sum(-1))[:, 0], 1.0, atol=1e-5)


def test_lxmert_blocks_and_hidden_names():
    cfg = LxmertConfig.tiny()
    tr = _run(cfg)
    assert tr.layer_names("t2t") == ["lang1", "lang2", "cross1.lang_self", "cross2.lang_self"]
    assert tr.layer_names("v2v") == ["visn1", "visn2", "cross1.visn_self", "cross2.visn_self"]
    assert tr.layer_names("t2v") == ["cross1.l2v", "cross2.l2v"]
    assert tr.layer_names("v2t") == ["cross1.v2l", "cross2.v2l"]
    v2t, _ = tr.blocks("v2t")
    np.testing.assert_array_equal(np.asarray(v2t[1]), np.asarray(tr.attention["cross2.v2l"]))
    assert tr.hidden_names("text") == [
        "lang.embeddings",
        "lang1",
        "lang2",
        "cross1.lang",
        "cross2.lang",
    ]
    assert tr.hidden_names("image") == [
        "visn.embeddings",
        "visn1",
        "visn2",
        "cross1.visn",
        "cross2.visn",
    ]
    assert tr.paired_layers() == [("cross1.lang", "cross1.visn"), ("cross2.lang", "cross2.visn")]


def test_layout_masks():
    tr = _run(UniterConfig.tiny(), text_lens=(7, 4))
    np.testing.assert_array_equal(np.asarray(tr.sep_index), [6, 3])
    np.testing.assert_array_equal(
        np.asarray(tr.word_mask).astype(int), [[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]]
    )
    m = {k: np.asarray(v) for k, v in tr.token_masks().items()}
    assert m["cls"][:, 0].all() and m["cls"].sum() == 2
    assert m["regions"][1].sum() == 3 and not m["regions"][:, :7].any()
    assert m["sep"][1, 3] and m["sep"].sum() == 2


@pytest.mark.parametrize(
    "cfg",
    [UniterConfig.tiny(num_layers=3), LxmertConfig.tiny(l_layers=3, r_layers=2, x_layers=2)],
    ids=["uniter", "lxmert"],
)
def test_layout_from_config_names_what_the_model_sows(cfg):
    """Probes take their layer names from `Layout.from_config` before anything runs; it must
    name exactly what a pass sows, in the same order."""
    from value_jax.trace import Layout

    traced, expected = _run(cfg).layout, Layout.from_config(cfg)
    assert sorted(traced.attention) == sorted(expected.attention)
    assert sorted(traced.hidden) == sorted(expected.hidden)
    for d in ("t2t", "t2v", "v2t", "v2v"):
        assert expected.layer_names(d) == traced.layer_names(d)
    for m in ("text", "image"):
        assert expected.hidden_names(m) == traced.hidden_names(m)
    assert expected.paired_layers() == traced.paired_layers()
