"""LXMERT (Tan & Bansal 2019) in Flax: language, relational (vision) and cross-modality encoders.

Parameter names mirror the original `LXRTPretraining` / HF `LxmertForPreTraining`
(`bert.encoder.x_layers.2.visual_attention.att.query` -> `lxmert/encoder/x_layers_2/visual_attention/att/query`).

Each cross layer runs, in this order: the shared cross-attention `visual_attention` language→vision
(with the vision mask) and vision→language (with the language mask), both on the layer's *inputs*;
then `lang_self_att` / `visn_self_att`; then the two feed-forward blocks.

Sown into `intermediates` under the `lxmert` scope (`value_jax.names`; 1-based; T text slot,
R regions):
  `attention.lang{i}`          `[B, H, T, T]`  language self-attention, i = 1..l_layers
  `attention.visn{i}`          `[B, H, R, R]`  relational (vision) self-attention, i = 1..r_layers
  `attention.cross{j}.l2v`     `[B, H, T, R]`  cross layer j, language queries → vision keys
  `attention.cross{j}.v2l`     `[B, H, R, T]`  cross layer j, vision queries → language keys
  `attention.cross{j}.lang_self` `[B, H, T, T]`, `attention.cross{j}.visn_self` `[B, H, R, R]`
  `hidden.lang.embeddings` `[B, T, D]`, `hidden.lang{i}`, `hidden.cross{j}.lang`
  `hidden.visn.embeddings` `[B, R, D]` (the `visn_fc` output), `hidden.visn{i}`, `hidden.cross{j}.visn`
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from value_jax.batch import Batch
from value_jax.models.configs import LxmertConfig
from value_jax.models.layers import (
    AttentionBlock,
    AttentionOutput,
    BertLayer,
    Intermediate,
    MLMHead,
    Pooler,
    PredictionTransform,
    check_outputs,
    layer_norm,
    mask_bias,
    sow_trace,
)
from value_jax.names import LayerId

LXMERT_OUTPUTS = LxmertConfig.outputs


class LxmertEmbeddings(nn.Module):
    """word + position + token type (0), then LayerNorm."""

    config: LxmertConfig

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(
                positions
            )
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                jnp.zeros_like(input_ids)
            )
        )
        return layer_norm("LayerNorm")(x)


class VisualFeatEncoder(nn.Module):
    """`visn_fc`: `(LN(visn_fc(feat)) + LN(box_fc(box4))) / 2`; box4 = normalised x1,y1,x2,y2."""

    config: LxmertConfig

    @nn.compact
    def __call__(self, feats, boxes):
        h = self.config.hidden_size
        x = layer_norm("visn_layer_norm")(nn.Dense(h, name="visn_fc")(feats))
        y = layer_norm("box_layer_norm")(nn.Dense(h, name="box_fc")(boxes))
        return (x + y) / 2


class CrossLayer(nn.Module):
    """`LXRTXLayer`. Returns `(lang, visn, probs)` with probs keyed `l2v, v2l, lang_self, visn_self`."""

    config: LxmertConfig

    @nn.compact
    def __call__(self, lang, visn, lang_bias, visn_bias):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        # One module, called twice: LXMERT shares the cross-attention weights between directions.
        cross = AttentionBlock(c.hidden_size, c.num_heads, "att", dtype, name="visual_attention")
        lang_x, l2v = cross(lang, visn, visn_bias)
        visn_x, v2l = cross(visn, lang, lang_bias)
        lang_x, lang_self = AttentionBlock(
            c.hidden_size, c.num_heads, "self", dtype, name="lang_self_att"
        )(lang_x, lang_x, lang_bias)
        visn_x, visn_self = AttentionBlock(
            c.hidden_size, c.num_heads, "self", dtype, name="visn_self_att"
        )(visn_x, visn_x, visn_bias)
        lang_out = AttentionOutput(c.hidden_size, dtype, name="lang_output")(
            Intermediate(c.intermediate_size, dtype, name="lang_inter")(lang_x), lang_x
        )
        visn_out = AttentionOutput(c.hidden_size, dtype, name="visn_output")(
            Intermediate(c.intermediate_size, dtype, name="visn_inter")(visn_x), visn_x
        )
        probs = {"l2v": l2v, "v2l": v2l, "lang_self": lang_self, "visn_self": visn_self}
        return lang_out, visn_out, probs


class LxmertEncoder(nn.Module):
    """Returns `(lang, visn, attention, hidden)`: the last states and every map / state by name."""

    config: LxmertConfig

    @nn.compact
    def __call__(self, lang, feats, boxes, lang_bias, visn_bias):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        attention, hidden = {}, {}
        visn = VisualFeatEncoder(c, name="visn_fc")(feats, boxes)
        hidden[LayerId("visn", 0).name] = visn
        for i in range(c.l_layers):
            lang, p = BertLayer(
                c.hidden_size, c.num_heads, c.intermediate_size, dtype, name=f"layer_{i}"
            )(lang, lang_bias)
            attention[LayerId("lang", i + 1).name] = p
            hidden[LayerId("lang", i + 1).name] = lang
        for i in range(c.r_layers):
            visn, p = BertLayer(
                c.hidden_size, c.num_heads, c.intermediate_size, dtype, name=f"r_layers_{i}"
            )(visn, visn_bias)
            attention[LayerId("visn", i + 1).name] = p
            hidden[LayerId("visn", i + 1).name] = visn
        for j in range(c.x_layers):
            lang, visn, probs = CrossLayer(c, name=f"x_layers_{j}")(
                lang, visn, lang_bias, visn_bias
            )
            for part, p in probs.items():
                attention[LayerId("cross", j + 1, part).name] = p
            hidden[LayerId("cross", j + 1, "lang").name] = lang
            hidden[LayerId("cross", j + 1, "visn").name] = visn
        return lang, visn, attention, hidden


class LxmertModel(nn.Module):
    """The LXMERT encoder. Returns `(lang [B, T, D], visn [B, R, D], pooled [B, D])`."""

    config: LxmertConfig

    @nn.compact
    def __call__(self, batch: Batch):
        c = self.config
        embedded = LxmertEmbeddings(c, name="embeddings")(batch.input_ids)
        lang, visn, attention, hidden = LxmertEncoder(c, name="encoder")(
            embedded,
            batch.region_feats,
            batch.region_boxes,
            mask_bias(batch.text_mask),
            mask_bias(batch.region_mask),
        )
        sow_trace(self, attention, {LayerId("lang", 0).name: embedded, **hidden})
        return lang, visn, Pooler(c.hidden_size, name="pooler")(lang)


class Lxmert(nn.Module):
    """`LXRTPretraining` / HF `LxmertForPreTraining` minus the VQA answer head.

    `__call__(batch, outputs=...)` returns a dict with `lang_output` `[B, T, D]`, `visn_output`
    `[B, R, D]`, `pooled_output` `[B, D]` and, per requested output head:
      `mlm`  `[B, T, vocab]` (decoder tied to the word embeddings)
      `obj`  `[B, R, 1600]` object logits (0-based over the VG classes, no background)
      `attr` `[B, R, 400]`, `feat` `[B, R, 2048]` (the `obj_predict_head` decoders)
      `itm`  `[B, 2]` (`cls.seq_relationship` on the pooled output)
    """

    config: LxmertConfig
    available_outputs: tuple = LXMERT_OUTPUTS  # output heads whose weights the checkpoint holds

    @nn.compact
    def __call__(self, batch: Batch, outputs: Sequence[str] = ()):
        check_outputs("LXMERT", outputs, LXMERT_OUTPUTS, self.available_outputs)
        c = self.config
        model = LxmertModel(c, name="lxmert")
        lang, visn, pooled = model(batch)
        out = {"lang_output": lang, "visn_output": visn, "pooled_output": pooled}
        wanted = tuple(h for h in LXMERT_OUTPUTS if h in outputs)
        if "mlm" in wanted or "itm" in wanted:
            word_embedding = model.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
            out.update(_LxmertCls(c, wanted, name="cls")(lang, pooled, word_embedding))
        if {"obj", "attr", "feat"} & set(wanted):
            out.update(_ObjPredictHead(c, wanted, name="obj_predict_head")(visn))
        return out


class _LxmertCls(nn.Module):
    """`cls.predictions` (MLM) and `cls.seq_relationship` (ITM); only the requested ones run."""

    config: LxmertConfig
    outputs: tuple

    @nn.compact
    def __call__(self, lang, pooled, word_embedding):
        c = self.config
        out = {}
        if "mlm" in self.outputs:
            out["mlm"] = MLMHead(c.hidden_size, c.vocab_size, name="predictions")(
                lang, word_embedding
            )
        if "itm" in self.outputs:
            out["itm"] = nn.Dense(2, name="seq_relationship")(pooled)
        return out


class _ObjPredictHead(nn.Module):
    """`obj_predict_head`: a shared transform, then `decoder_dict.{obj, attr, feat}`."""

    config: LxmertConfig
    outputs: tuple

    @nn.compact
    def __call__(self, visn):
        c = self.config
        x = PredictionTransform(c.hidden_size, name="transform")(visn)
        sizes = {"obj": c.num_object_labels, "attr": c.num_attr_labels, "feat": c.visual_feat_dim}
        return {
            k: nn.Dense(n, name=f"decoder_dict_{k}")(x)
            for k, n in sizes.items()
            if k in self.outputs
        }
