"""Numerical parity with independent PyTorch references, tiny AND base sizes, float32, ≤ 1e-5.

LXMERT: HF `LxmertModel` on every hidden state and the attentions HF returns (language, vision,
cross language→vision) — and on the maps HF drops (vision→language, the cross layers' language
and vision self-attention), recomputed by re-calling HF's own attention modules on the inputs
that forward hooks captured. UNITER's text path: HF `BertModel`.
The tiny-size converter round trips through every source layout live in test_convert.py.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import value_jax  # noqa: E402
from checkpoints_convert import convert_state_dict  # noqa: E402
from value_jax.models import LxmertConfig, UniterConfig, build_model  # noqa: E402
from torch_refs import perturb, random_inputs  # noqa: E402

TOL = 1e-5


class _Recorder:
    """Captures the inputs of each call of an HF `LxmertAttention` and recomputes its probs."""

    def __init__(self, module):
        self.module, self.calls = module, []
        module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        names = ["hidden_states", "context", "attention_mask"]
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        self.calls.append(bound)

    def probs(self, i):
        c = self.calls[i]
        with torch.no_grad():
            out = self.module(c["hidden_states"], c["context"], c.get("attention_mask"),
                              output_attentions=True)
        return out[1]


def _diff(ours, theirs, what, worst):
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    d = float(np.max(np.abs(ours - theirs)))
    worst[what] = d
    assert d <= TOL, f"{what}: max |diff| {d:.2e} > {TOL}"


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_lxmert_every_attention_map_and_hidden_state(size):
    cfg = LxmertConfig.tiny() if size == "tiny" else LxmertConfig()
    torch.manual_seed(0)
    hf_cfg = transformers.LxmertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, l_layers=cfg.l_layers, r_layers=cfg.r_layers,
        x_layers=cfg.x_layers, visual_feat_dim=cfg.visual_feat_dim, hidden_act="gelu",
        attn_implementation="eager")
    hf = perturb(transformers.LxmertModel(hf_cfg), 1)
    recorders = [{k: _Recorder(m) for k, m in (("cross", x.visual_attention.att),
                                                ("lang_self", x.lang_self_att.self),
                                                ("visn_self", x.visn_self_att.self))}
                 for x in hf.encoder.x_layers]
    b, t, r = (2, 7, 5) if size == "tiny" else (2, 20, 36)
    ids, tm, feats, boxes, rm = random_inputs(cfg.visual_feat_dim, cfg.vocab_size, b, t, r)
    tt = lambda x: torch.from_numpy(np.asarray(x))
    with torch.no_grad():
        out = hf(input_ids=tt(ids), attention_mask=tt(tm), visual_feats=tt(feats),
                 visual_pos=tt(boxes), visual_attention_mask=tt(rm).float(),
                 output_hidden_states=True, output_attentions=True)
    result = convert_state_dict(hf.state_dict(), "hf_lxmert", num_heads=cfg.num_heads)
    trace = value_jax.run(build_model(result.config, result.heads), result.params,
                          value_jax.Batch.create(ids, tm, feats, boxes, rm))
    worst = {}
    lang = [f"lang{i}" for i in range(1, cfg.l_layers + 1)] + [f"cross{j}.lang" for j in range(1, cfg.x_layers + 1)]
    visn = [f"visn{i}" for i in range(1, cfg.r_layers + 1)] + [f"cross{j}.visn" for j in range(1, cfg.x_layers + 1)]
    for name, h in zip(lang, out.language_hidden_states, strict=True):
        _diff(trace.hidden[name], h, name, worst)
    for name, h in zip(visn, out.vision_hidden_states, strict=True):
        _diff(trace.hidden[name], h, name, worst)
    for i, a in enumerate(out.language_attentions, 1):
        _diff(trace.attention[f"lang{i}"], a, f"lang{i}", worst)
    for i, a in enumerate(out.vision_attentions, 1):
        _diff(trace.attention[f"visn{i}"], a, f"visn{i}", worst)
    for j, (a, rec) in enumerate(zip(out.cross_encoder_attentions, recorders, strict=True), 1):
        _diff(trace.attention[f"cross{j}.l2v"], a, f"cross{j}.l2v", worst)
        # The shared module's first call is language→vision, the second vision→language.
        _diff(trace.attention[f"cross{j}.l2v"], rec["cross"].probs(0), f"cross{j}.l2v (hook)", worst)
        _diff(trace.attention[f"cross{j}.v2l"], rec["cross"].probs(1), f"cross{j}.v2l", worst)
        _diff(trace.attention[f"cross{j}.lang_self"], rec["lang_self"].probs(0), f"cross{j}.lang_self", worst)
        _diff(trace.attention[f"cross{j}.visn_self"], rec["visn_self"].probs(0), f"cross{j}.visn_self", worst)
    _diff(trace.outputs["pooled_output"], out.pooled_output, "pooled", worst)
    print(f"lxmert {size}: max |diff| {max(worst.values()):.2e} over {len(worst)} tensors")


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_uniter_text_path_matches_bert(size):
    cfg = UniterConfig.tiny() if size == "tiny" else UniterConfig()
    torch.manual_seed(2)
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        hidden_act="gelu", attn_implementation="eager")
    hf = perturb(transformers.BertModel(hf_cfg), 3)
    b, t = (2, 7) if size == "tiny" else (2, 20)
    ids, tm, *_ = random_inputs(8, cfg.vocab_size, b, t, 1)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(tm),
                 output_hidden_states=True, output_attentions=True)
    result = convert_state_dict(hf.state_dict(), "bert", num_heads=cfg.num_heads)
    batch = value_jax.Batch.create(ids, tm, np.zeros((b, 0, result.config.img_dim), np.float32),
                                   np.zeros((b, 0, 4), np.float32))
    trace = value_jax.run(build_model(result.config, result.heads), result.params, batch)
    worst = {}
    names = ["embeddings"] + [f"layer{i}" for i in range(1, cfg.num_layers + 1)]
    for name, h in zip(names, out.hidden_states, strict=True):
        _diff(trace.hidden[name], h, name, worst)
    for i, a in enumerate(out.attentions, 1):
        _diff(trace.attention[f"layer{i}"], a, f"layer{i}", worst)
    _diff(trace.outputs["pooled_output"], out.pooler_output, "pooled", worst)
    print(f"uniter text path {size}: max |diff| {max(worst.values()):.2e} over {len(worst)} tensors")
