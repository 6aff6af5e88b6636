"""checkpoints_convert: round trips per format, HF PyTorch parity through the converter, the CLI,
and every refusal. Tiny configs; the Flax names are checked against an independent twin of the
naming rule (`a.b.3.c.weight` <-> `a/b_3/c/kernel`), not against the tables themselves."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from absl.testing import flagsaver
from flax.traverse_util import flatten_dict
from torch_refs import perturb, random_inputs

import value_jax
from checkpoints_convert import (
    LAYOUTS,
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    infer_config,
    read_state_dict,
)
from checkpoints_convert.fake import make_state_dict, state_dict_shapes, write_fake_checkpoint
from value_jax.checkpoint import load, read_config
from value_jax.models import LxmertConfig, UniterConfig, build_model, param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U, L = UniterConfig.tiny(), LxmertConfig.tiny()
TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "feat_regress.weight"}
UNUSED = {
    "uniter": (),
    "lxmert": ("answer_head.",),
    "hf_lxmert": ("answer_head.",),
    "bert": ("cls.seq_relationship.",),
}


# ---- the independent naming twin -------------------------------------------------------------


def _canonical(fmt, key, bare=False):
    if fmt == "uniter":
        return key[len("module.") :] if key.startswith("module.") else key
    if fmt == "lxmert":
        assert key.startswith("module.")
        key = key[len("module.") :]
        return "lxmert." + key[len("bert.") :] if key.startswith("bert.") else key
    if fmt == "hf_lxmert":
        return "lxmert." + key if bare else key
    if fmt == "bert":
        if bare:
            return "uniter." + key
        return "uniter." + key[len("bert.") :] if key.startswith("bert.") else key


def _twin_path(canonical, ndim):
    """`(flax path, transpose?)` by the written-down naming rule."""
    parts = canonical.replace("decoder_dict.", "decoder_dict_").split(".")
    merged = []
    for p in parts:
        if p.isdigit():
            merged[-1] = f"{merged[-1]}_{p}"
        else:
            merged.append(p)
    *mods, leaf = merged
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    if leaf == "bias":
        return "/".join(mods + ["bias"]), False
    if ndim == 1:
        return "/".join(mods + ["scale"]), False
    if "embedding" in mods[-1]:
        return "/".join(mods + ["embedding"]), False
    return "/".join(mods + ["kernel"]), True


def _assert_leaf_by_leaf(fmt, sd, params, bare=False, text_only=False):
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    seen = set()
    for key, value in sd.items():
        canonical = _canonical(fmt, key, bare)
        if canonical in TIED or canonical.startswith(UNUSED[fmt]):
            continue
        path, transpose = _twin_path(canonical, value.ndim)
        src = value.float().numpy()
        np.testing.assert_array_equal(flat[path], src.T if transpose else src, err_msg=key)
        seen.add(path)
    rest = set(flat) - seen
    if text_only:
        assert rest and all(p.startswith("uniter/img_embeddings/") for p in rest), rest
        assert all(not flat[p].any() for p in rest)
    else:
        assert not rest, f"leaves not filled from the source: {sorted(rest)}"
    assert not any("decoder/" in p or p.endswith("feat_regress/kernel") for p in flat)


ROUND_TRIPS = {
    "uniter": ("uniter", U, {}),
    "uniter-fp16-gamma-module": (
        "uniter",
        U,
        dict(dtype=torch.float16, old_layer_norm_names=True, module_prefix=True),
    ),
    "lxmert-answer_head": ("lxmert", L, dict(answer_labels=5)),
    "hf_lxmert": ("hf_lxmert", L, {}),
    "hf_lxmert-bare": ("hf_lxmert", L, dict(bare=True)),
    "bert": ("bert", U, {}),
    "bert-bare-gamma": ("bert", U, dict(bare=True, old_layer_norm_names=True)),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip_every_leaf_equals_its_source(name):
    fmt, cfg, kw = ROUND_TRIPS[name]
    sd = make_state_dict(fmt, cfg, seed=3, **kw)
    result = convert_state_dict(sd, fmt, num_heads=cfg.num_heads)
    bare = kw.get("bare", False)
    _assert_leaf_by_leaf(fmt, sd, result.params, bare=bare, text_only=fmt == "bert")
    assert result.report.ok and result.report.text_only == (fmt == "bert")
    assert all(ok for *_, ok in result.report.tied)
    if fmt == "uniter":
        assert result.config == cfg and result.outputs == ("mlm", "mrc", "mrfr", "itm")
        assert len(result.report.tied) == 2
    if fmt == "lxmert":
        assert result.config == cfg and result.outputs == ("mlm", "obj", "attr", "feat", "itm")
        assert len(result.report.unused) == 6
        assert all(k.startswith("module.answer_head.") for k, _ in result.report.unused)
    if bare:
        assert result.outputs == ()
    if fmt == "bert" and not bare:
        assert result.outputs == ("mlm",)
        assert {k for k, _ in result.report.unused} == {
            "cls.seq_relationship.weight",
            "cls.seq_relationship.bias",
        }
    # The Flax tree is exactly the model's, and it runs.
    want = jax.tree_util.tree_map(
        lambda s: s.shape, param_shapes(build_model(result.config, result.outputs))
    )
    assert jax.tree_util.tree_map(np.shape, result.params) == want


@pytest.mark.parametrize(
    "fmt,cfg",
    [
        ("uniter", UniterConfig()),
        ("lxmert", LxmertConfig()),
        ("hf_lxmert", LxmertConfig()),
        ("bert", UniterConfig(vocab_size=30522)),
    ],
)
def test_tables_cover_the_full_size_models(fmt, cfg):
    """At base size, without allocating: every Flax leaf has a source key of the right shape."""
    shapes = state_dict_shapes(fmt, cfg, answer_labels=9500 if "lxmert" in fmt else 0)
    assert infer_config({k: _Shape(s) for k, s in shapes.items()}, fmt) == cfg  # 768 // 64 heads
    layout = LAYOUTS[fmt][0]
    canon = {layout.canonical(k): s for k, s in shapes.items()}
    expected = flatten_dict(param_shapes(build_model(cfg, ("mlm",) if fmt == "bert" else None)))
    for path, leaf in expected.items():
        path = "/".join(path)
        if any(path.startswith(p) for p in layout.zero_fill):
            continue
        rule, key = next((r, r.match_flax(path)) for r in layout.rules if r.match_flax(path))
        assert canon[key] == rule.transform.source_shape(leaf.shape), (path, key)


class _Shape:
    def __init__(self, shape):
        self.shape = tuple(shape)


# ---- HF parity through the converter ---------------------------------------------------------


def _close(ours, theirs, what, diffs):
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape, what
    diffs[what] = float(np.max(np.abs(ours - theirs)))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=what)


def _hf_lxmert_config(**kw):
    return transformers.LxmertConfig(
        vocab_size=L.vocab_size,
        hidden_size=L.hidden_size,
        num_attention_heads=L.num_heads,
        intermediate_size=L.intermediate_size,
        max_position_embeddings=L.max_position_embeddings,
        l_layers=L.l_layers,
        r_layers=L.r_layers,
        x_layers=L.x_layers,
        visual_feat_dim=L.visual_feat_dim,
        num_object_labels=L.num_object_labels,
        num_attr_labels=L.num_attr_labels,
        hidden_act="gelu",
        attn_implementation="eager",
        **kw,
    )


def _lxmert_parity(hf, result, pretraining=True):
    ids, tm, feats, boxes, rm = random_inputs(L.visual_feat_dim, L.vocab_size)
    t = lambda x: torch.from_numpy(np.asarray(x))
    base = hf.lxmert if pretraining else hf
    with torch.no_grad():
        kw = dict(
            input_ids=t(ids),
            attention_mask=t(tm),
            visual_feats=t(feats),
            visual_pos=t(boxes),
            visual_attention_mask=t(rm).float(),
            output_hidden_states=True,
            output_attentions=True,
        )
        enc = base(**kw)
        full = hf(**kw) if pretraining else None
        visual = hf.obj_predict_head(enc.vision_output) if pretraining else None
    model = build_model(result.config, result.outputs)
    # Un-jitted: one forward of a tiny model is quicker op by op than compiled.
    trace = value_jax.forward(
        model,
        result.params,
        value_jax.Batch.create(ids, tm, feats, boxes, rm),
        outputs=result.outputs,
    )
    out, diffs = trace.outputs, {}
    c = result.config
    lang_names = [f"lang{i}" for i in range(1, c.l_layers + 1)] + [
        f"cross{j}.lang" for j in range(1, c.x_layers + 1)
    ]
    visn_names = [f"visn{i}" for i in range(1, c.r_layers + 1)] + [
        f"cross{j}.visn" for j in range(1, c.x_layers + 1)
    ]
    for name, h in zip(lang_names, enc.language_hidden_states, strict=True):
        _close(trace.hidden[name], h, f"language hidden {name}", diffs)
    for name, h in zip(visn_names, enc.vision_hidden_states, strict=True):
        _close(trace.hidden[name], h, f"vision hidden {name}", diffs)
    for i, a in enumerate(enc.language_attentions, 1):
        _close(trace.attention[f"lang{i}"], a, f"attention lang{i}", diffs)
    for i, a in enumerate(enc.vision_attentions, 1):
        _close(trace.attention[f"visn{i}"], a, f"attention visn{i}", diffs)
    for j, a in enumerate(enc.cross_encoder_attentions, 1):
        _close(trace.attention[f"cross{j}.l2v"], a, f"attention cross{j}.l2v", diffs)
    _close(out["lang_output"], enc.language_output, "language output", diffs)
    _close(out["visn_output"], enc.vision_output, "vision output", diffs)
    _close(out["pooled_output"], enc.pooled_output, "pooled output", diffs)
    if pretraining:
        _close(out["mlm"], full.prediction_logits, "mlm logits", diffs)
        _close(out["itm"], full.cross_relationship_score, "seq_relationship", diffs)
        for k in ("obj", "attr", "feat"):
            _close(out[k], visual[k], f"{k} logits", diffs)
    return diffs


@pytest.fixture(scope="module")
def hf_lxmert():
    torch.manual_seed(0)
    hf = perturb(transformers.LxmertForPreTraining(_hf_lxmert_config(num_qa_labels=5)), 1)
    return hf


def test_hf_lxmert_pretraining_parity(hf_lxmert, tmp_path):
    path = str(tmp_path / "hf_lxmert.bin")
    torch.save(hf_lxmert.state_dict(), path)
    result = convert_state_dict(read_state_dict(path), "hf_lxmert", num_heads=L.num_heads)
    assert result.outputs == ("mlm", "obj", "attr", "feat", "itm")
    assert [k for k, _ in result.report.unused] == [
        k for k in hf_lxmert.state_dict() if k.startswith("answer_head.")
    ]
    diffs = _lxmert_parity(hf_lxmert, result)
    print("hf_lxmert max|diff|:", max(diffs.values()))


def test_original_lxmert_layout_parity(hf_lxmert):
    """`Epoch20_LXRT.pth` spelling = HF keys under DataParallel's `module.`, `lxmert.` -> `bert.`."""
    sd = {
        ("module.bert." + k[len("lxmert.") :]) if k.startswith("lxmert.") else "module." + k: v
        for k, v in hf_lxmert.state_dict().items()
    }
    result = convert_state_dict(sd, "lxmert", num_heads=L.num_heads)
    hf_result = convert_state_dict(hf_lxmert.state_dict(), "hf_lxmert", num_heads=L.num_heads)
    jax.tree_util.tree_map(np.testing.assert_array_equal, result.params, hf_result.params)
    diffs = _lxmert_parity(hf_lxmert, result)
    print("lxmert (original layout) max|diff|:", max(diffs.values()))


def test_hf_lxmert_model_parity(hf_lxmert):
    """A bare `LxmertModel` state dict (`embeddings.*`, `encoder.*`, `pooler.*`)."""
    bare = hf_lxmert.lxmert
    assert type(bare) is transformers.LxmertModel
    result = convert_state_dict(bare.state_dict(), "hf_lxmert", num_heads=L.num_heads)
    assert result.outputs == () and result.report.layout == "LxmertModel"
    full = convert_state_dict(hf_lxmert.state_dict(), "hf_lxmert", num_heads=L.num_heads)
    assert set(result.params) == {"lxmert"}
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, result.params["lxmert"], full.params["lxmert"]
    )
    diffs = _lxmert_parity(bare, result, pretraining=False)
    print("hf LxmertModel max|diff|:", max(diffs.values()))


def test_bert_parity_on_uniter_text_path(tmp_path):
    torch.manual_seed(4)
    cfg = transformers.BertConfig(
        vocab_size=U.vocab_size,
        hidden_size=U.hidden_size,
        num_hidden_layers=U.num_layers,
        num_attention_heads=U.num_heads,
        intermediate_size=U.intermediate_size,
        max_position_embeddings=U.max_position_embeddings,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    hf = perturb(transformers.BertForPreTraining(cfg), 5)
    config_json = tmp_path / "config.json"
    config_json.write_text(cfg.to_json_string())
    result = convert_state_dict(hf.state_dict(), "bert", model_config=str(config_json))
    assert result.config.num_heads == U.num_heads and result.report.text_only
    ids, tm, *_ = random_inputs(8, U.vocab_size)
    with torch.no_grad():
        t = lambda x: torch.from_numpy(np.asarray(x))
        enc = hf.bert(
            input_ids=t(ids),
            attention_mask=t(tm),
            output_hidden_states=True,
            output_attentions=True,
        )
        full = hf(input_ids=t(ids), attention_mask=t(tm))
    b, n = ids.shape
    batch = value_jax.Batch.create(
        ids,
        tm,
        np.zeros((b, 0, result.config.img_dim), np.float32),
        np.zeros((b, 0, 4), np.float32),
    )
    trace = value_jax.forward(
        build_model(result.config, result.outputs), result.params, batch, outputs=("mlm",)
    )
    diffs = {}
    names = ["embeddings"] + [f"layer{i}" for i in range(1, U.num_layers + 1)]
    for name, h in zip(names, enc.hidden_states, strict=True):
        _close(trace.hidden[name], h, f"hidden {name}", diffs)
    for i, a in enumerate(enc.attentions, 1):
        _close(trace.attention[f"layer{i}"], a, f"attention layer{i}", diffs)
    _close(trace.outputs["pooled_output"], enc.pooler_output, "pooled output", diffs)
    _close(trace.outputs["mlm"], full.prediction_logits, "mlm logits", diffs)
    print("bert max|diff|:", max(diffs.values()))


# ---- the fakes themselves --------------------------------------------------------------------


def test_fake_layouts_match_hugging_face_module_trees(hf_lxmert):
    ours = make_state_dict("hf_lxmert", L, seed=0, answer_labels=5)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in hf_lxmert.state_dict().items()
    }
    bert = transformers.BertForPreTraining(
        transformers.BertConfig(
            vocab_size=U.vocab_size,
            hidden_size=U.hidden_size,
            num_hidden_layers=U.num_layers,
            num_attention_heads=U.num_heads,
            intermediate_size=U.intermediate_size,
            max_position_embeddings=U.max_position_embeddings,
        )
    )
    assert {k: tuple(v.shape) for k, v in make_state_dict("bert", U, seed=0).items()} == {
        k: tuple(v.shape) for k, v in bert.state_dict().items()
    }


def test_fake_is_deterministic_tied_and_bert_scaled():
    a, b, c = (make_state_dict("uniter", U, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(
        a["uniter.pooler.dense.weight"], c["uniter.pooler.dense.weight"]
    )
    assert a["cls.predictions.decoder.weight"] is a["uniter.embeddings.word_embeddings.weight"]
    assert a["feat_regress.weight"] is a["uniter.img_embeddings.img_linear.weight"]
    assert not a["uniter.img_embeddings.mask_embedding.weight"][0].any()
    assert abs(float(a["uniter.encoder.layer.0.output.dense.weight"].std()) - 0.02) < 0.005
    assert abs(float(a["uniter.encoder.layer.0.output.LayerNorm.weight"].mean()) - 1) < 0.01
    half = make_state_dict("uniter", U, seed=5, dtype=torch.float16)
    assert (
        half["cls.predictions.decoder.weight"] is half["uniter.embeddings.word_embeddings.weight"]
    )
    peaked = make_state_dict("uniter", U, seed=5, attention_score_std=1.5)
    changed = {k for k in a if not torch.equal(a[k], peaked[k])}
    assert changed == {
        f"uniter.encoder.layer.{i}.attention.self.{p}.weight"
        for i in range(U.num_layers)
        for p in ("query", "key")
    }


# ---- files and the CLI -----------------------------------------------------------------------


def test_cli_writes_a_directory_that_loads_and_runs(tmp_path):
    src = write_fake_checkpoint(
        str(tmp_path / "uniter.pt"),
        "uniter",
        U,
        seed=7,
        wrap="model",
        dtype=torch.float16,
        old_layer_norm_names=True,
    )
    out = tmp_path / "uniter_ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoints_convert",
            f"--src={src}",
            "--format=uniter",
            f"--out={out}",
            f"--num_heads={U.num_heads}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "result: OK" in proc.stdout and "equal, dropped" in proc.stdout
    model, params = load(str(out))
    assert model.available_outputs == ("mlm", "mrc", "mrfr", "itm")
    expected = convert_state_dict(read_state_dict(src), "uniter", num_heads=U.num_heads).params
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
    _, _, meta = read_config(str(out))
    assert meta["format"] == "uniter" and meta["text_only"] is False
    ids, tm, feats, boxes, rm = random_inputs(U.img_dim, U.vocab_size)
    trace = value_jax.forward(
        model,
        params,
        value_jax.Batch.create(ids, tm, feats, boxes, rm),
        outputs=model.available_outputs,
    )
    probs = np.asarray(trace.attention["layer1"])
    assert np.isfinite(probs).all() and np.allclose(probs.sum(-1), 1, atol=1e-5)
    assert probs.std() > 0


def test_cli_refuses_and_writes_nothing(tmp_path, capsys):
    sd = make_state_dict("lxmert", L, seed=1)
    del sd["module.bert.encoder.x_layers.1.visn_output.dense.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    out = tmp_path / "never"
    argv = [
        "checkpoints_convert",
        f"--src={tmp_path / 'broken.pth'}",
        "--format=lxmert",
        f"--out={out}",
    ]
    import checkpoints_convert.__main__ as cli  # defines the CLI's absl flags; only here

    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        flags.FLAGS(argv)
        cli.main(argv[:1])
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert "module.bert.encoder.x_layers.1.visn_output.dense.bias" in stderr
    assert "REFUSED" in stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["broken.pth"]


def test_convert_checkpoint_safetensors_and_text_only_metadata(tmp_path):
    src = write_fake_checkpoint(str(tmp_path / "bert.safetensors"), "bert", U, seed=2)
    result = convert_checkpoint(src, "bert", str(tmp_path / "bert_ckpt"), num_heads=U.num_heads)
    _, heads, meta = read_config(str(tmp_path / "bert_ckpt"))
    assert heads == ("mlm",) and meta["text_only"] is True and meta["report"]["text_only"] is True
    model, params = load(str(tmp_path / "bert_ckpt"))
    assert not np.asarray(params["uniter"]["img_embeddings"]["img_linear"]["kernel"]).any()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, result.params)
    with pytest.raises(FileExistsError):
        convert_checkpoint(src, "bert", str(tmp_path / "bert_ckpt"), num_heads=U.num_heads)
    convert_checkpoint(
        src, "bert", str(tmp_path / "bert_ckpt"), num_heads=U.num_heads, overwrite=True
    )


def test_read_state_dict_unwraps_and_upcasts(tmp_path):
    sd = {
        "a.weight": torch.randn(3, 2).to(torch.bfloat16),
        "b.bias": torch.randn(3).half(),
        "c.position_ids": torch.arange(4),
    }
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "x.pt")
    got = read_state_dict(str(tmp_path / "x.pt"))
    assert sorted(got) == sorted(sd)
    assert got["a.weight"].dtype == np.float32 and got["b.bias"].dtype == np.float32
    np.testing.assert_array_equal(got["a.weight"], sd["a.weight"].float().numpy())
    assert got["c.position_ids"].dtype == np.int64


# ---- config inference -------------------------------------------------------------------------


def test_num_heads_sources(tmp_path):
    sd = make_state_dict("uniter", U, seed=0)
    guessed = convert_state_dict(sd, "uniter")
    assert guessed.config.num_heads == 1  # 32 // 64, floored at one head
    assert any("GUESSED" in n for n in guessed.report.config_notes)
    cfg_json = tmp_path / "uniter-tiny.json"
    cfg_json.write_text(
        json.dumps({"num_attention_heads": 4, "num_hidden_layers": 3, "hidden_size": 32})
    )
    assert infer_config(sd, "uniter", model_config=str(cfg_json)) == U
    cfg_json.write_text(json.dumps({"num_attention_heads": 4, "num_hidden_layers": 12}))
    with pytest.raises(ConversionError, match="num_hidden_layers=12"):
        convert_state_dict(sd, "uniter", model_config=str(cfg_json))
    with pytest.raises(ConversionError, match="not divisible"):
        convert_state_dict(sd, "uniter", num_heads=5)


# ---- refusals ---------------------------------------------------------------------------------


def _refused(sd, fmt, **kw):
    with pytest.raises(ConversionError) as info:
        convert_state_dict(sd, fmt, num_heads=4, **kw)
    return info.value.report, str(info.value)


def test_missing_encoder_key_is_listed_and_nothing_is_written(tmp_path):
    sd = make_state_dict("uniter", U, seed=0)
    del sd["uniter.encoder.layer.1.attention.self.key.weight"]
    report, message = _refused(sd, "uniter")
    assert report.missing == [
        (
            "uniter/encoder/layer_1/attention/self/key/kernel",
            "uniter.encoder.layer.1.attention.self.key.weight",
        )
    ]
    assert "uniter.encoder.layer.1.attention.self.key.weight" in message
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(ConversionError):
        convert_checkpoint(str(tmp_path / "m.pt"), "uniter", str(tmp_path / "out"), num_heads=4)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_wrong_shape_lists_both_shapes(tmp_path):
    sd = make_state_dict("hf_lxmert", L, seed=0)
    sd["lxmert.encoder.r_layers.0.intermediate.dense.weight"] = torch.zeros(36, 32)
    report, message = _refused(sd, "hf_lxmert")
    assert report.mismatched == [
        (
            "lxmert.encoder.r_layers.0.intermediate.dense.weight",
            "lxmert/encoder/r_layers_0/intermediate/dense/kernel",
            (37, 32),
            (36, 32),
        )
    ]
    assert "expected [37, 32], found [36, 32]" in message
    torch.save(sd, tmp_path / "s.pt")
    with pytest.raises(ConversionError):
        convert_checkpoint(str(tmp_path / "s.pt"), "hf_lxmert", str(tmp_path / "out"), num_heads=4)
    assert not (tmp_path / "out").exists()


def test_unexpected_keys_are_listed():
    sd = make_state_dict("lxmert", L, seed=0)
    sd["module.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    sd["bert.pooler.dense.bias"] = torch.zeros(32)  # lacks DataParallel's `module.`
    report, message = _refused(sd, "lxmert")
    assert [k for k, _ in report.unexpected] == [
        "module.bert.encoder.layer.0.attention.self.rotary.weight",
        "bert.pooler.dense.bias",
    ]
    assert "rotary" in message and not report.missing


def test_layer_beyond_a_given_config_is_unexpected():
    sd = make_state_dict("uniter", U, seed=0)
    report, _ = _refused(sd, "uniter", config=UniterConfig.tiny(num_layers=2))
    assert {k.split(".")[3] for k, _ in report.unexpected} == {"2"}


@pytest.mark.parametrize(
    "fmt,cfg,drop,head",
    [
        ("uniter", U, ["region_classifier.net.3.bias"], "mrc"),
        (
            "uniter",
            U,
            [
                "cls.predictions.bias",
                "cls.predictions.transform.dense.weight",
                "cls.predictions.transform.dense.bias",
                "cls.predictions.transform.LayerNorm.weight",
                "cls.predictions.transform.LayerNorm.bias",
            ],
            "mlm",
        ),  # only the tied decoder left
        ("hf_lxmert", L, ["obj_predict_head.transform.dense.weight"], "obj"),
        (
            "hf_lxmert",
            L,
            [
                "obj_predict_head.decoder_dict.obj.weight",
                "obj_predict_head.decoder_dict.obj.bias",
                "obj_predict_head.decoder_dict.attr.weight",
                "obj_predict_head.decoder_dict.attr.bias",
                "obj_predict_head.decoder_dict.feat.weight",
                "obj_predict_head.decoder_dict.feat.bias",
            ],
            "obj/attr/feat",
        ),  # the shared transform with no decoder
    ],
)
def test_partially_present_head_is_refused(fmt, cfg, drop, head):
    sd = make_state_dict(fmt, cfg, seed=0)
    for k in drop:
        del sd[k]
    report, message = _refused(sd, fmt)
    assert head in [h for h, *_ in report.partial_outputs], report.partial_outputs
    assert "PARTIAL OUTPUT HEADS" in message


def test_absent_output_head_is_fine_and_reported():
    sd = make_state_dict("uniter", U, seed=0, outputs=("itm",))
    result = convert_state_dict(sd, "uniter", num_heads=4)
    assert result.outputs == ("itm",) and result.report.outputs_absent == ["mlm", "mrc", "mrfr"]
    with pytest.raises(ValueError, match="no weights for outputs"):
        build_model(result.config, result.outputs).apply(
            {"params": result.params}, value_jax.models.dummy_batch(result.config), outputs=("mlm",)
        )


@pytest.mark.parametrize(
    "fmt,cfg,dup",
    [
        ("uniter", U, "cls.predictions.decoder.weight"),
        ("uniter", U, "feat_regress.weight"),
        ("lxmert", L, "module.cls.predictions.decoder.weight"),
        ("bert", U, "cls.predictions.decoder.bias"),
    ],
)
def test_tied_pair_that_differs_is_refused(fmt, cfg, dup):
    sd = make_state_dict(fmt, cfg, seed=0)
    sd[dup] = sd[dup].clone()
    sd[dup][0] += 1e-6
    report, message = _refused(sd, fmt)
    assert [d for d, _, _, ok in report.tied if not ok] == [dup]
    assert "DIFFER" in message
