"""UNITER (Chen et al. 2020) in Flax: a single-stream BERT over `[CLS] text [SEP] regions`.

Parameter names mirror `UniterForPretraining` (`uniter.embeddings.word_embeddings` ->
`uniter/embeddings/word_embeddings/embedding`, `encoder.layer.3` -> `encoder/layer_3`).

Sown into the `intermediates` collection under the `uniter` scope (`value_jax.names`; 1-based):
  `attention.layer{i}`  `[B, H, N, N]`, N = T + R, the joint softmax over `[text slot | regions]`
  `hidden.embeddings`   `[B, N, D]`, the embedding output (text and region embeddings, concatenated)
  `hidden.layer{i}`     `[B, N, D]`, the output of layer i
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from value_jax.batch import Batch, uniter_position_feature
from value_jax.models.configs import UniterConfig
from value_jax.models.layers import (
    BertLayer,
    MLMHead,
    Pooler,
    check_outputs,
    gelu,
    layer_norm,
    mask_bias,
    sow_trace,
)
from value_jax.names import LayerId

UNITER_OUTPUTS = UniterConfig.outputs


class UniterTextEmbeddings(nn.Module):
    config: UniterConfig

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embed(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embed(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = layer_norm()

    def __call__(self, input_ids):
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(jnp.zeros_like(input_ids))
        )
        return self.LayerNorm(x)

    def image_type_embedding(self):
        """Regions reuse the text token-type table at row 1 (`UniterModel._compute_img_embeddings`)."""
        return self.token_type_embeddings.embedding[1]


class UniterImageEmbeddings(nn.Module):
    config: UniterConfig

    def setup(self):
        c = self.config
        self.img_linear = nn.Dense(c.hidden_size)
        self.img_layer_norm = layer_norm()
        self.pos_linear = nn.Dense(c.hidden_size)
        self.pos_layer_norm = layer_norm()
        self.mask_embedding = nn.Embed(2, c.img_dim)
        self.LayerNorm = layer_norm()

    def __call__(self, feats, boxes, masked, type_embedding):
        # Row 0 of mask_embedding is forced to zero in the original, so only row 1 ever adds.
        feats = feats + masked[..., None].astype(feats.dtype) * self.mask_embedding.embedding[1]
        x = self.img_layer_norm(self.img_linear(feats))
        pos = self.pos_layer_norm(self.pos_linear(uniter_position_feature(boxes)))
        return self.LayerNorm(x + pos + type_embedding)

    def img_linear_kernel(self):
        """`[F, D]`, tied (transposed) to the MRFR output projection."""
        return self.img_linear.variables["params"]["kernel"]


class UniterModel(nn.Module):
    """The UNITER encoder. Returns the joint sequence output `[B, T + R, D]` and pooled `[B, D]`."""

    config: UniterConfig

    def setup(self):
        c = self.config
        self.embeddings = UniterTextEmbeddings(c)
        self.img_embeddings = UniterImageEmbeddings(c)
        self.encoder = UniterEncoder(c)
        self.pooler = Pooler(c.hidden_size)

    def __call__(self, batch: Batch):
        text = self.embeddings(batch.input_ids)
        image = self.img_embeddings(
            batch.region_feats,
            batch.region_boxes,
            batch.region_masked,
            self.embeddings.image_type_embedding(),
        )
        x = jnp.concatenate([text, image], axis=1)
        key_bias = mask_bias(jnp.concatenate([batch.text_mask, batch.region_mask], axis=1))
        hidden, probs = self.encoder(x, key_bias)
        layers = [LayerId("layer", i).name for i in range(1, len(hidden) + 1)]
        sow_trace(
            self,
            dict(zip(layers, probs)),
            {LayerId("layer", 0).name: x, **dict(zip(layers, hidden))},
        )
        return hidden[-1], self.pooler(hidden[-1])

    def word_embedding(self):
        return self.embeddings.word_embeddings.embedding


class UniterEncoder(nn.Module):
    config: UniterConfig

    @nn.compact
    def __call__(self, x, key_bias):
        c = self.config
        hidden, probs = [], []
        for i in range(c.num_layers):
            x, p = BertLayer(
                c.hidden_size,
                c.num_heads,
                c.intermediate_size,
                jnp.dtype(c.dtype),
                name=f"layer_{i}",
            )(x, key_bias)
            hidden.append(x)
            probs.append(p)
        return hidden, probs


class Uniter(nn.Module):
    """`UniterForPretraining`: the encoder plus the output heads later analyses need.

    `__call__(batch, outputs=...)` returns a dict with `sequence_output` `[B, T+R, D]`,
    `pooled_output` `[B, D]` and, per requested output head:
      `mlm`  `[B, T, vocab]` logits over the text slot (decoder tied to the word embeddings)
      `mrc`  `[B, R, 1601]` logits over the region slot (MRC / MRC-kl head, background at 0)
      `mrfr` `[B, R, F]` regressed features (projection tied to `img_linear`, transposed)
      `itm`  `[B, 2]` image-text matching logits from the pooled output
    """

    config: UniterConfig
    available_outputs: tuple = UNITER_OUTPUTS  # output heads whose weights the checkpoint holds

    def setup(self):
        c = self.config
        self.uniter = UniterModel(c)
        self.cls = _UniterMLM(c)
        self.feat_regress = _FeatRegress(c)
        self.region_classifier = _RegionClassifier(c)
        self.itm_output = nn.Dense(2)

    def __call__(self, batch: Batch, outputs: Sequence[str] = ()):
        check_outputs("UNITER", outputs, UNITER_OUTPUTS, self.available_outputs)
        seq, pooled = self.uniter(batch)
        out = {"sequence_output": seq, "pooled_output": pooled}
        t = batch.input_ids.shape[1]
        if "mlm" in outputs:
            out["mlm"] = self.cls(seq[:, :t], self.uniter.word_embedding())
        if "mrc" in outputs:
            out["mrc"] = self.region_classifier(seq[:, t:])
        if "mrfr" in outputs:
            out["mrfr"] = self.feat_regress(
                seq[:, t:], self.uniter.img_embeddings.img_linear_kernel()
            )
        if "itm" in outputs:
            out["itm"] = self.itm_output(pooled)
        return out


class _UniterMLM(nn.Module):
    config: UniterConfig

    @nn.compact
    def __call__(self, x, word_embedding):
        c = self.config
        return MLMHead(c.hidden_size, c.vocab_size, name="predictions")(x, word_embedding)


class _FeatRegress(nn.Module):
    """MRFR `RegionFeatureRegression`: `net` then `h @ img_linear.weight + bias`."""

    config: UniterConfig

    @nn.compact
    def __call__(self, x, img_linear_kernel):
        x = gelu(nn.Dense(self.config.hidden_size, name="net_0")(x))
        x = layer_norm("net_2")(x)
        bias = self.param("bias", nn.initializers.zeros, (self.config.img_dim,))
        return x @ img_linear_kernel.T + bias


class _RegionClassifier(nn.Module):
    """MRC `RegionClassification`: `net.0` Linear, GELU, `net.2` LayerNorm, `net.3` Linear(1601)."""

    config: UniterConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = gelu(nn.Dense(c.hidden_size, name="net_0")(x))
        x = layer_norm("net_2")(x)
        return nn.Dense(c.num_region_labels, name="net_3")(x)
