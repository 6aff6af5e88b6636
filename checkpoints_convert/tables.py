"""Declarative key tables: how each source layout's PyTorch keys land in the Flax params tree.

A table is an ordered list of `Rule`s over *canonical* torch keys (UNITER: `uniter.*`, the output
heads' `cls.*`, `feat_regress.*`, ...; LXMERT: Hugging Face's `lxmert.*`, `cls.*`, `obj_predict_head.*`).
A `Layout` says how a source file spells those keys (prefix renames such as `module.bert.` ->
`lxmert.`, old LayerNorm names `gamma`/`beta`), which keys are tied duplicates, which are known
and deliberately unused, and which Flax leaves have no source at all and are filled with zeros.

Each rule carries both templates, `uniter.encoder.layer.{i}.output.dense.weight` <->
`uniter/encoder/layer_{i}/output/dense/kernel`, so the report can name the torch key that would
have filled any Flax leaf left empty.

Every format's key table is in this one module (about 460 lines), so the formats can be
read side by side.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Iterator

ENCODER = "encoder"


class Transform(enum.Enum):
    IDENTITY = "identity"
    TRANSPOSE = "transpose"  # torch Linear `[out, in]` -> Flax Dense kernel `[in, out]`

    def apply(self, x):
        return x.T if self is Transform.TRANSPOSE else x

    def source_shape(self, flax_shape: tuple) -> tuple:
        """The torch shape that becomes `flax_shape` under this transform."""
        return tuple(reversed(flax_shape)) if self is Transform.TRANSPOSE else tuple(flax_shape)


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        parts.append(rf"(?P<{m.group(1)}>\d+)")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One canonical torch key template <-> one Flax path template (`{i}` = a layer index).

    `outputs` is `("encoder",)` for the required encoder/embeddings/pooler, else the output heads
    that need the key: `("mlm",)`, or `("obj", "attr", "feat")` for a transform they share.
    """

    torch: str
    flax: str
    transform: Transform
    outputs: tuple = (ENCODER,)

    def __post_init__(self):
        object.__setattr__(self, "_torch_re", _template_regex(self.torch))
        object.__setattr__(self, "_flax_re", _template_regex(self.flax))

    def match_torch(self, key: str) -> str | None:
        m = self._torch_re.fullmatch(key)
        return self.flax.format(**m.groupdict()) if m else None

    def match_flax(self, path: str) -> str | None:
        m = self._flax_re.fullmatch(path)
        return self.torch.format(**m.groupdict()) if m else None

    @property
    def required(self) -> bool:
        return self.outputs == (ENCODER,)


@dataclasses.dataclass(frozen=True)
class Tied:
    """`duplicate` holds the same tensor as `kept`; checked equal, then dropped."""

    duplicate: str
    kept: str
    outputs: tuple


@dataclasses.dataclass(frozen=True)
class Unused:
    """Keys a layout is known to carry that no analysis here needs (regex on canonical keys)."""

    pattern: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one source format spells the canonical keys.

    prefixes: `(source prefix, canonical prefix)` pairs, first match wins.
    prefixes_required: every source key must start with one of `prefixes`.
    renames: `(old suffix, new suffix)` pairs for the last key component (`.gamma` -> `.weight`).
    detect: the layout applies to a state dict with any key starting with this.
    zero_fill: Flax path prefixes with no counterpart in the source: filled with zeros.
    """

    name: str
    model_type: str
    rules: tuple
    tied: tuple = ()
    unused: tuple = ()
    prefixes: tuple = ()
    prefixes_required: bool = False
    renames: tuple = ()
    detect: str = ""
    zero_fill: tuple = ()

    def canonical(self, key: str) -> str | None:
        """The canonical spelling of a source key; None if it lacks a required prefix."""
        for src, dst in self.prefixes:
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        else:
            if self.prefixes_required:
                return None
        for old, new in self.renames:
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        return key

    def source_spelling(self, canonical: str) -> str:
        """Inverse of `canonical` for display: how this layout would spell the key."""
        for src, dst in self.prefixes:
            if dst and canonical.startswith(dst):  # an optional bare `module.` stays implicit
                return src + canonical[len(dst) :]
        return canonical

    def rule_for(self, canonical: str):
        """`(rule, flax_path)` of the first rule matching `canonical`, else `(None, None)`."""
        for rule in self.rules:
            path = rule.match_torch(canonical)
            if path is not None:
                return rule, path
        return None, None

    def unused_reason(self, canonical: str) -> str | None:
        for u in self.unused:
            if re.fullmatch(u.pattern, canonical):
                return u.reason
        return None

    @property
    def text_only(self) -> bool:
        return bool(self.zero_fill)


# ---- building blocks (torch prefix, Flax prefix) -------------------------------------------


def _dense(t: str, f: str, outputs=(ENCODER,), bias: bool = True) -> Iterator[Rule]:
    yield Rule(f"{t}.weight", f"{f}/kernel", Transform.TRANSPOSE, outputs)
    if bias:
        yield Rule(f"{t}.bias", f"{f}/bias", Transform.IDENTITY, outputs)


def _layer_norm(t: str, f: str, outputs=(ENCODER,)) -> Iterator[Rule]:
    yield Rule(f"{t}.weight", f"{f}/scale", Transform.IDENTITY, outputs)
    yield Rule(f"{t}.bias", f"{f}/bias", Transform.IDENTITY, outputs)


def _embed(t: str, f: str, outputs=(ENCODER,)) -> Iterator[Rule]:
    yield Rule(f"{t}.weight", f"{f}/embedding", Transform.IDENTITY, outputs)


def _attention(t: str, f: str, core: str) -> Iterator[Rule]:
    """`BertSelfattLayer` / `BertCrossattLayer` / `BertAttention`: `{core}.{q,k,v}` + `output`."""
    for proj in ("query", "key", "value"):
        yield from _dense(f"{t}.{core}.{proj}", f"{f}/{core}/{proj}")
    yield from _dense(f"{t}.output.dense", f"{f}/output/dense")
    yield from _layer_norm(f"{t}.output.LayerNorm", f"{f}/output/LayerNorm")


def _ffn(t_inter: str, f_inter: str, t_out: str, f_out: str) -> Iterator[Rule]:
    yield from _dense(f"{t_inter}.dense", f"{f_inter}/dense")
    yield from _dense(f"{t_out}.dense", f"{f_out}/dense")
    yield from _layer_norm(f"{t_out}.LayerNorm", f"{f_out}/LayerNorm")


def _bert_layer(t: str, f: str) -> Iterator[Rule]:
    yield from _attention(f"{t}.attention", f"{f}/attention", "self")
    yield from _ffn(f"{t}.intermediate", f"{f}/intermediate", f"{t}.output", f"{f}/output")


def _text_embeddings(t: str, f: str) -> Iterator[Rule]:
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        yield from _embed(f"{t}.{name}", f"{f}/{name}")
    yield from _layer_norm(f"{t}.LayerNorm", f"{f}/LayerNorm")


def _prediction_transform(t: str, f: str, outputs) -> Iterator[Rule]:
    yield from _dense(f"{t}.dense", f"{f}/dense", outputs)
    yield from _layer_norm(f"{t}.LayerNorm", f"{f}/LayerNorm", outputs)


def _mlm(outputs=("mlm",)) -> Iterator[Rule]:
    yield Rule("cls.predictions.bias", "cls/predictions/bias", Transform.IDENTITY, outputs)
    yield from _prediction_transform(
        "cls.predictions.transform", "cls/predictions/transform", outputs
    )


# ---- UNITER (canonical = `UniterForPretraining.state_dict()`) --------------------------------


def _uniter_encoder() -> Iterator[Rule]:
    yield from _text_embeddings("uniter.embeddings", "uniter/embeddings")
    img_t, img_f = "uniter.img_embeddings", "uniter/img_embeddings"
    yield from _dense(f"{img_t}.img_linear", f"{img_f}/img_linear")
    yield from _layer_norm(f"{img_t}.img_layer_norm", f"{img_f}/img_layer_norm")
    yield from _dense(f"{img_t}.pos_linear", f"{img_f}/pos_linear")
    yield from _layer_norm(f"{img_t}.pos_layer_norm", f"{img_f}/pos_layer_norm")
    yield from _embed(f"{img_t}.mask_embedding", f"{img_f}/mask_embedding")
    yield from _layer_norm(f"{img_t}.LayerNorm", f"{img_f}/LayerNorm")
    yield from _bert_layer("uniter.encoder.layer.{i}", "uniter/encoder/layer_{i}")
    yield from _dense("uniter.pooler.dense", "uniter/pooler/dense")


def _uniter_heads() -> Iterator[Rule]:
    yield from _mlm()
    yield from _dense("region_classifier.net.0", "region_classifier/net_0", ("mrc",))
    yield from _layer_norm("region_classifier.net.2", "region_classifier/net_2", ("mrc",))
    yield from _dense("region_classifier.net.3", "region_classifier/net_3", ("mrc",))
    yield from _dense("feat_regress.net.0", "feat_regress/net_0", ("mrfr",))
    yield from _layer_norm("feat_regress.net.2", "feat_regress/net_2", ("mrfr",))
    yield Rule("feat_regress.bias", "feat_regress/bias", Transform.IDENTITY, ("mrfr",))
    yield from _dense("itm_output", "itm_output", ("itm",))


UNITER_RULES = tuple(_uniter_encoder()) + tuple(_uniter_heads())
UNITER_TIED = (
    Tied("cls.predictions.decoder.weight", "uniter.embeddings.word_embeddings.weight", ("mlm",)),
    # RegionFeatureRegression keeps `img_linear.weight` itself and applies it transposed.
    Tied("feat_regress.weight", "uniter.img_embeddings.img_linear.weight", ("mrfr",)),
)
_OLD_LAYER_NORM = ((".gamma", ".weight"), (".beta", ".bias"))
_BUFFERS = Unused(r".*\.(position_ids|token_type_ids)", "non-learned index buffer")

# ---- LXMERT (canonical = HF `LxmertForPreTraining.state_dict()`) -----------------------------


def _lxmert_encoder() -> Iterator[Rule]:
    yield from _text_embeddings("lxmert.embeddings", "lxmert/embeddings")
    vt, vf = "lxmert.encoder.visn_fc", "lxmert/encoder/visn_fc"
    yield from _dense(f"{vt}.visn_fc", f"{vf}/visn_fc")
    yield from _layer_norm(f"{vt}.visn_layer_norm", f"{vf}/visn_layer_norm")
    yield from _dense(f"{vt}.box_fc", f"{vf}/box_fc")
    yield from _layer_norm(f"{vt}.box_layer_norm", f"{vf}/box_layer_norm")
    yield from _bert_layer("lxmert.encoder.layer.{i}", "lxmert/encoder/layer_{i}")
    yield from _bert_layer("lxmert.encoder.r_layers.{i}", "lxmert/encoder/r_layers_{i}")
    xt, xf = "lxmert.encoder.x_layers.{i}", "lxmert/encoder/x_layers_{i}"
    yield from _attention(f"{xt}.visual_attention", f"{xf}/visual_attention", "att")
    yield from _attention(f"{xt}.lang_self_att", f"{xf}/lang_self_att", "self")
    yield from _attention(f"{xt}.visn_self_att", f"{xf}/visn_self_att", "self")
    yield from _ffn(
        f"{xt}.lang_inter", f"{xf}/lang_inter", f"{xt}.lang_output", f"{xf}/lang_output"
    )
    yield from _ffn(
        f"{xt}.visn_inter", f"{xf}/visn_inter", f"{xt}.visn_output", f"{xf}/visn_output"
    )
    yield from _dense("lxmert.pooler.dense", "lxmert/pooler/dense")


def _lxmert_heads() -> Iterator[Rule]:
    yield from _mlm()
    yield from _dense("cls.seq_relationship", "cls/seq_relationship", ("itm",))
    yield from _prediction_transform(
        "obj_predict_head.transform", "obj_predict_head/transform", ("obj", "attr", "feat")
    )
    for head in ("obj", "attr", "feat"):
        yield from _dense(
            f"obj_predict_head.decoder_dict.{head}",
            f"obj_predict_head/decoder_dict_{head}",
            (head,),
        )


LXMERT_RULES = tuple(_lxmert_encoder()) + tuple(_lxmert_heads())
LXMERT_TIED = (
    Tied("cls.predictions.decoder.weight", "lxmert.embeddings.word_embeddings.weight", ("mlm",)),
)
_ANSWER_HEAD = Unused(r"answer_head\..*", "VQA answer head (not modelled; no analysis uses it)")

# ---- BERT into UNITER's text path ------------------------------------------------------------

# BERT has no region embedding: UNITER's `img_embeddings` are zeros and the result is text-only.
BERT_RULES = tuple(
    r
    for r in UNITER_RULES
    if r.outputs in ((ENCODER,), ("mlm",)) and not r.torch.startswith("uniter.img_")
)
BERT_TIED = UNITER_TIED[:1] + (
    Tied("cls.predictions.decoder.bias", "cls.predictions.bias", ("mlm",)),
)
_NSP = Unused(
    r"cls\.seq_relationship\..*",
    "BERT next-sentence head (UNITER's ITM head `itm_output` is a different layer)",
)
_BARE = (
    ("embeddings.", "uniter.embeddings."),
    ("encoder.", "uniter.encoder."),
    ("pooler.", "uniter.pooler."),
)

LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "uniter": (
        Layout(
            "UniterForPretraining",
            "uniter",
            UNITER_RULES,
            UNITER_TIED,
            (_BUFFERS,),
            prefixes=(("module.", ""),),
            renames=_OLD_LAYER_NORM,
        ),
    ),
    "lxmert": (
        Layout(
            "LXRTPretraining (DataParallel `module.`)",
            "lxmert",
            LXMERT_RULES,
            LXMERT_TIED,
            (_ANSWER_HEAD, _BUFFERS),
            prefixes=(
                ("module.bert.", "lxmert."),
                ("module.cls.", "cls."),
                ("module.obj_predict_head.", "obj_predict_head."),
                ("module.answer_head.", "answer_head."),
            ),
            prefixes_required=True,
            renames=_OLD_LAYER_NORM,
        ),
    ),
    "hf_lxmert": (
        Layout(
            "LxmertForPreTraining",
            "lxmert",
            LXMERT_RULES,
            LXMERT_TIED,
            (_ANSWER_HEAD, _BUFFERS),
            detect="lxmert.",
        ),
        Layout(
            "LxmertModel",
            "lxmert",
            tuple(r for r in LXMERT_RULES if r.required),
            (),
            (_BUFFERS,),
            prefixes=(
                ("embeddings.", "lxmert.embeddings."),
                ("encoder.", "lxmert.encoder."),
                ("pooler.", "lxmert.pooler."),
            ),
            prefixes_required=True,
            detect="embeddings.",
        ),
    ),
    "bert": (
        Layout(
            "BertForPreTraining / BertModel (`bert.`)",
            "uniter",
            BERT_RULES,
            BERT_TIED,
            (_NSP, _BUFFERS),
            prefixes=(("bert.", "uniter."),),
            renames=_OLD_LAYER_NORM,
            detect="bert.",
            zero_fill=("uniter/img_embeddings/",),
        ),
        Layout(
            "BertModel (bare)",
            "uniter",
            BERT_RULES,
            BERT_TIED,
            (_NSP, _BUFFERS),
            prefixes=_BARE,
            renames=_OLD_LAYER_NORM,
            detect="embeddings.",
            zero_fill=("uniter/img_embeddings/",),
        ),
    ),
}
FORMATS = tuple(LAYOUTS)

# ---- config sizes (keys in canonical spelling) -----------------------------------------------

# model_config JSON key -> our config field (UNITER / HF BERT / HF LXMERT spellings).
CONFIG_FROM_JSON = {
    "uniter": {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_hidden_layers": "num_layers",
        "intermediate_size": "intermediate_size",
        "max_position_embeddings": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
    },
    "lxmert": {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "max_position_embeddings": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
        "l_layers": "l_layers",
        "r_layers": "r_layers",
        "x_layers": "x_layers",
        "visual_feat_dim": "visual_feat_dim",
        "visual_pos_dim": "visual_pos_dim",
        "num_object_labels": "num_object_labels",
        "num_attr_labels": "num_attr_labels",
    },
}

# field -> (canonical key, axis) whose shape gives it; axis None: count the `{i}` layers.
CONFIG_FROM_SHAPES = {
    "uniter": {
        "vocab_size": ("uniter.embeddings.word_embeddings.weight", 0),
        "hidden_size": ("uniter.embeddings.word_embeddings.weight", 1),
        "max_position_embeddings": ("uniter.embeddings.position_embeddings.weight", 0),
        "type_vocab_size": ("uniter.embeddings.token_type_embeddings.weight", 0),
        "intermediate_size": ("uniter.encoder.layer.0.intermediate.dense.weight", 0),
        "num_layers": ("uniter.encoder.layer.{i}", None),
        "img_dim": ("uniter.img_embeddings.img_linear.weight", 1),
        "pos_dim": ("uniter.img_embeddings.pos_linear.weight", 1),
        "num_region_labels": ("region_classifier.net.3.weight", 0),
    },
    "lxmert": {
        "vocab_size": ("lxmert.embeddings.word_embeddings.weight", 0),
        "hidden_size": ("lxmert.embeddings.word_embeddings.weight", 1),
        "max_position_embeddings": ("lxmert.embeddings.position_embeddings.weight", 0),
        "type_vocab_size": ("lxmert.embeddings.token_type_embeddings.weight", 0),
        "intermediate_size": ("lxmert.encoder.layer.0.intermediate.dense.weight", 0),
        "l_layers": ("lxmert.encoder.layer.{i}", None),
        "r_layers": ("lxmert.encoder.r_layers.{i}", None),
        "x_layers": ("lxmert.encoder.x_layers.{i}", None),
        "visual_feat_dim": ("lxmert.encoder.visn_fc.visn_fc.weight", 1),
        "visual_pos_dim": ("lxmert.encoder.visn_fc.box_fc.weight", 1),
        "num_object_labels": ("obj_predict_head.decoder_dict.obj.weight", 0),
        "num_attr_labels": ("obj_predict_head.decoder_dict.attr.weight", 0),
    },
}


def select_layout(fmt: str, keys) -> Layout:
    """The layout of `fmt` whose `detect` prefix some key carries (else the first one)."""
    if fmt not in LAYOUTS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    layouts = LAYOUTS[fmt]
    keys = list(keys)
    for layout in layouts:
        if layout.detect and any(k.startswith(layout.detect) for k in keys):
            return layout
    return layouts[0]
