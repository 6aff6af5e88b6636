"""Deterministic fake checkpoints in each source layout, for the demo and the tests.

No real weights ship with this project. These state dicts spell every key and shape as the
original PyTorch module trees do (`UniterForPretraining`, DataParallel-wrapped `LXRTPretraining`,
HF `LxmertForPreTraining` / `LxmertModel`, HF `BertForPreTraining` / `BertModel`), written out
here independently of `tables.py` so that a wrong rule cannot hide behind a matching fake.

Values follow a BERT init (weights and embeddings ~ N(0, 0.02), LayerNorm weight ~ 1), except
that biases and LayerNorm offsets are small non-zero numbers too, so a bias mapped to the wrong
leaf changes the output.
"""

from __future__ import annotations

import dataclasses

import torch

from value_jax.models import LXMERT_OUTPUTS, UNITER_OUTPUTS

FAKE_FORMATS = ("uniter", "lxmert", "hf_lxmert", "bert")


@dataclasses.dataclass
class _Spec:
    """An ordered list of `(key, shape, kind)`; kind `w`, `qk`, `b`, `ln`, `zero_row0`, `=other`."""

    old_layer_norm_names: bool = False
    entries: list = dataclasses.field(default_factory=list)

    def param(self, key, shape, kind="w"):
        self.entries.append((key, tuple(shape), kind))

    def linear(self, key, out_dim, in_dim, bias=True, kind="w"):
        self.param(f"{key}.weight", (out_dim, in_dim), kind)
        if bias:
            self.param(f"{key}.bias", (out_dim,), "b")

    def layer_norm(self, key, dim):
        w, b = ("gamma", "beta") if self.old_layer_norm_names else ("weight", "bias")
        self.param(f"{key}.{w}", (dim,), "ln")
        self.param(f"{key}.{b}", (dim,), "b")

    def embedding(self, key, n, dim):
        self.param(f"{key}.weight", (n, dim))

    def tie(self, key, target):
        self.entries.append((key, None, f"={target}"))

    # -- BERT pieces (the same in UNITER, LXMERT and BERT) -----------------------------------
    def text_embeddings(self, p, vocab, hidden, max_pos, type_vocab):
        self.embedding(f"{p}.word_embeddings", vocab, hidden)
        self.embedding(f"{p}.position_embeddings", max_pos, hidden)
        self.embedding(f"{p}.token_type_embeddings", type_vocab, hidden)
        self.layer_norm(f"{p}.LayerNorm", hidden)

    def attention(self, p, core, hidden):
        for proj, kind in (("query", "qk"), ("key", "qk"), ("value", "w")):
            self.linear(f"{p}.{core}.{proj}", hidden, hidden, kind=kind)
        self.linear(f"{p}.output.dense", hidden, hidden)
        self.layer_norm(f"{p}.output.LayerNorm", hidden)

    def ffn(self, inter, out, hidden, inner):
        self.linear(f"{inter}.dense", inner, hidden)
        self.linear(f"{out}.dense", hidden, inner)
        self.layer_norm(f"{out}.LayerNorm", hidden)

    def bert_layer(self, p, hidden, inner):
        self.attention(f"{p}.attention", "self", hidden)
        self.ffn(f"{p}.intermediate", f"{p}.output", hidden, inner)

    def mlm(self, p, embedding_key, vocab, hidden, decoder_bias=False):
        self.param(f"{p}.bias", (vocab,), "b")
        self.linear(f"{p}.transform.dense", hidden, hidden)
        self.layer_norm(f"{p}.transform.LayerNorm", hidden)
        self.tie(f"{p}.decoder.weight", embedding_key)
        if decoder_bias:  # HF BERT: `decoder.bias` is the same Parameter as `predictions.bias`
            self.tie(f"{p}.decoder.bias", f"{p}.bias")


def _uniter(c, outputs, spec: _Spec, prefix: str):
    u = f"{prefix}uniter"
    spec.text_embeddings(
        f"{u}.embeddings", c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size
    )
    img = f"{u}.img_embeddings"
    spec.linear(f"{img}.img_linear", c.hidden_size, c.img_dim)
    spec.layer_norm(f"{img}.img_layer_norm", c.hidden_size)
    spec.layer_norm(f"{img}.pos_layer_norm", c.hidden_size)
    spec.linear(f"{img}.pos_linear", c.hidden_size, 7)
    spec.param(f"{img}.mask_embedding.weight", (2, c.img_dim), "zero_row0")
    spec.layer_norm(f"{img}.LayerNorm", c.hidden_size)
    for i in range(c.num_layers):
        spec.bert_layer(f"{u}.encoder.layer.{i}", c.hidden_size, c.intermediate_size)
    spec.linear(f"{u}.pooler.dense", c.hidden_size, c.hidden_size)
    if "mlm" in outputs:
        spec.mlm(
            f"{prefix}cls.predictions",
            f"{u}.embeddings.word_embeddings.weight",
            c.vocab_size,
            c.hidden_size,
        )
    if "mrfr" in outputs:
        spec.tie(f"{prefix}feat_regress.weight", f"{img}.img_linear.weight")
        spec.param(f"{prefix}feat_regress.bias", (c.img_dim,), "b")
        spec.linear(f"{prefix}feat_regress.net.0", c.hidden_size, c.hidden_size)
        spec.layer_norm(f"{prefix}feat_regress.net.2", c.hidden_size)
    if "mrc" in outputs:
        spec.linear(f"{prefix}region_classifier.net.0", c.hidden_size, c.hidden_size)
        spec.layer_norm(f"{prefix}region_classifier.net.2", c.hidden_size)
        spec.linear(f"{prefix}region_classifier.net.3", c.num_region_labels, c.hidden_size)
    if "itm" in outputs:
        spec.linear(f"{prefix}itm_output", 2, c.hidden_size)


def _lxmert(c, outputs, spec: _Spec, base: str, head_prefix: str, answer_labels: int):
    """`base` = `module.bert` (original), `lxmert` (HF) or `` (bare `LxmertModel`)."""
    b = f"{base}." if base else ""
    h, inner = c.hidden_size, c.intermediate_size
    spec.text_embeddings(
        f"{b}embeddings", c.vocab_size, h, c.max_position_embeddings, c.type_vocab_size
    )
    v = f"{b}encoder.visn_fc"
    spec.linear(f"{v}.visn_fc", h, c.visual_feat_dim)
    spec.layer_norm(f"{v}.visn_layer_norm", h)
    spec.linear(f"{v}.box_fc", h, c.visual_pos_dim)
    spec.layer_norm(f"{v}.box_layer_norm", h)
    for i in range(c.l_layers):
        spec.bert_layer(f"{b}encoder.layer.{i}", h, inner)
    for j in range(c.x_layers):
        x = f"{b}encoder.x_layers.{j}"
        spec.attention(f"{x}.visual_attention", "att", h)
        spec.attention(f"{x}.lang_self_att", "self", h)
        spec.attention(f"{x}.visn_self_att", "self", h)
        spec.ffn(f"{x}.lang_inter", f"{x}.lang_output", h, inner)
        spec.ffn(f"{x}.visn_inter", f"{x}.visn_output", h, inner)
    for i in range(c.r_layers):
        spec.bert_layer(f"{b}encoder.r_layers.{i}", h, inner)
    spec.linear(f"{b}pooler.dense", h, h)
    if "mlm" in outputs:
        spec.mlm(
            f"{head_prefix}cls.predictions",
            f"{b}embeddings.word_embeddings.weight",
            c.vocab_size,
            h,
        )
    if "itm" in outputs:
        spec.linear(f"{head_prefix}cls.seq_relationship", 2, h)
    visual = [k for k in ("obj", "attr", "feat") if k in outputs]
    if visual:
        o = f"{head_prefix}obj_predict_head"
        spec.linear(f"{o}.transform.dense", h, h)
        spec.layer_norm(f"{o}.transform.LayerNorm", h)
        sizes = {"obj": c.num_object_labels, "attr": c.num_attr_labels, "feat": c.visual_feat_dim}
        for k in visual:
            spec.linear(f"{o}.decoder_dict.{k}", sizes[k], h)
    if answer_labels:
        a = f"{head_prefix}answer_head.logit_fc"
        spec.linear(f"{a}.0", 2 * h, h)
        spec.layer_norm(f"{a}.2", 2 * h)
        spec.linear(f"{a}.3", answer_labels, 2 * h)


def _bert(c, outputs, spec: _Spec, bare: bool, nsp: bool):
    b = "" if bare else "bert."
    spec.text_embeddings(
        f"{b}embeddings", c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size
    )
    for i in range(c.num_layers):
        spec.bert_layer(f"{b}encoder.layer.{i}", c.hidden_size, c.intermediate_size)
    spec.linear(f"{b}pooler.dense", c.hidden_size, c.hidden_size)
    if "mlm" in outputs:
        spec.mlm(
            "cls.predictions",
            f"{b}embeddings.word_embeddings.weight",
            c.vocab_size,
            c.hidden_size,
            decoder_bias=True,
        )
    if nsp:
        spec.linear("cls.seq_relationship", 2, c.hidden_size)


def _spec(
    fmt, config, outputs, answer_labels, old_layer_norm_names, module_prefix, bare, nsp
) -> _Spec:
    spec = _Spec(old_layer_norm_names)
    if fmt == "uniter":
        _uniter(
            config,
            UNITER_OUTPUTS if outputs is None else outputs,
            spec,
            "module." if module_prefix else "",
        )
    elif fmt in ("lxmert", "hf_lxmert"):
        outputs = LXMERT_OUTPUTS if outputs is None else outputs
        if fmt == "lxmert":
            _lxmert(config, outputs, spec, "module.bert", "module.", answer_labels)
        elif bare:
            _lxmert(config, (), spec, "", "", 0)
        else:
            _lxmert(config, outputs, spec, "lxmert", "", answer_labels)
    elif fmt == "bert":
        _bert(
            config,
            () if bare else (("mlm",) if outputs is None else outputs),
            spec,
            bare,
            nsp and not bare,
        )
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(FAKE_FORMATS)}")
    return spec


def state_dict_shapes(
    fmt: str,
    config,
    outputs=None,
    *,
    answer_labels: int = 0,
    old_layer_norm_names: bool = False,
    module_prefix: bool = False,
    bare: bool = False,
    nsp: bool = True,
) -> dict[str, tuple]:
    """The keys and torch shapes `make_state_dict` would produce, without allocating anything
    (cheap at full size)."""
    spec = _spec(
        fmt, config, outputs, answer_labels, old_layer_norm_names, module_prefix, bare, nsp
    )
    shapes = {}
    for key, shape, kind in spec.entries:
        shapes[key] = shapes[kind[1:]] if kind.startswith("=") else shape
    return shapes


def make_state_dict(
    fmt: str,
    config,
    seed: int = 0,
    outputs=None,
    *,
    answer_labels: int = 0,
    old_layer_norm_names: bool = False,
    dtype=torch.float32,
    module_prefix: bool = False,
    bare: bool = False,
    nsp: bool = True,
    attention_score_std: float | None = None,
) -> dict[str, torch.Tensor]:
    """A fake state dict of `fmt` for `config` (UniterConfig for uniter/bert, else LxmertConfig).

    outputs: pre-training outputs to include (default all the format has; bert: `("mlm",)`).
    answer_labels: > 0 adds LXMERT's `answer_head` with that many answers.
    old_layer_norm_names: LayerNorms as `gamma`/`beta` (old UNITER/BERT files).
    dtype: e.g. `torch.float16`, as UNITER's fp16 training saved.
    module_prefix: UNITER keys under `module.` (a DataParallel save).
    bare: hf_lxmert as `LxmertModel`, bert as `BertModel`, with no prefix and no outputs.
    nsp: bert only, include `cls.seq_relationship`.
    attention_score_std: query/key weights ~ N(0, s / hidden) so that attention logits have
      std about `s` at any size (a BERT init gives near-uniform maps, most of all at tiny
      sizes; s ~ 1-2 gives peaked, demo-worthy maps). Default: the BERT init for them too.
    Tied keys hold the *same* tensor as their source, as `model.state_dict()` does.
    """
    spec = _spec(
        fmt, config, outputs, answer_labels, old_layer_norm_names, module_prefix, bare, nsp
    )
    # Logit = q.k / sqrt(d_head) with q, k ~ N(0, hidden * std^2) per unit: std (hidden std^2).
    qk_std = (
        0.02 if attention_score_std is None else (attention_score_std / config.hidden_size) ** 0.5
    )
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape, kind in spec.entries:
        if kind.startswith("="):
            out[key] = out[kind[1:]]
            continue
        x = torch.randn(shape, generator=gen, dtype=torch.float32) * (
            qk_std if kind == "qk" else 0.02
        )
        if kind == "ln":
            x = x + 1.0
        elif kind == "zero_row0":  # UNITER zeroes row 0 of mask_embedding before every use
            x[0] = 0.0
        out[key] = x
    if dtype != torch.float32:
        cast = {}  # id(float32 tensor) -> cast tensor, so tied keys stay one tensor
        out = {k: cast.setdefault(id(x), x.to(dtype)) for k, x in out.items()}
    return out


def write_fake_checkpoint(
    path: str, fmt: str, config, seed: int = 0, *, wrap: str | None = None, **kw
) -> str:
    """Writes `make_state_dict(fmt, config, seed, **kw)` to `path` and returns `path`.

    `.safetensors` paths are written with safetensors (tied tensors as separate copies, since it
    refuses shared storage), anything else with `torch.save`, optionally wrapped as
    `{wrap: state_dict}` (`wrap="state_dict"` or `"model"`, as training scripts save).
    """
    sd = make_state_dict(fmt, config, seed, **kw)
    if path.endswith(".safetensors"):
        if wrap:
            raise ValueError("safetensors files hold a flat dict; wrap applies to torch.save only")
        from safetensors.torch import save_file

        save_file({k: v.clone().contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({wrap: sd} if wrap else sd, path)
    return path
