"""BERT building blocks shared by UNITER and LXMERT, named as the PyTorch modules are.

Every attention module returns its probabilities `[B, H, Q, K]` (float32) alongside its output;
the top-level encoder module of each model sows them, with the hidden states, through `sow_trace`
under the names of `value_jax.names`. Two traps of these models are
handled here once: LayerNorm epsilon is 1e-12 (Flax's default is 1e-6) and GELU is the exact erf
form (`jax.nn.gelu` defaults to the tanh approximation). LayerNorm also takes torch's two-pass
variance: Flax's default E[x²] − E[x]² cancels catastrophically when a vector's mean is large next
to its spread (error 6e-3 at mean/std = 100, against torch's 1.5e-5).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from value_jax import names as N

LN_EPS = 1e-12
MASK_BIAS = -10000.0  # the originals' additive mask, `(1 - m) * -10000`


def gelu(x):
    """Exact (erf) GELU, as in UNITER `layer.py: gelu` and LXMERT `modeling.py: gelu`."""
    return jax.nn.gelu(x, approximate=False)


def mask_bias(mask: jnp.ndarray) -> jnp.ndarray:
    """`[B, K]` 0/1 key mask -> `[B, 1, 1, K]` additive float32 bias."""
    return ((1.0 - mask.astype(jnp.float32)) * MASK_BIAS)[:, None, None, :]


def check_outputs(model: str, requested, known, available) -> None:
    """Refuses unknown output heads, and output heads whose weights the loaded checkpoint does
    not hold."""
    unknown = sorted(set(requested) - set(known))
    if unknown:
        raise ValueError(f"unknown {model} outputs {unknown}; known outputs: {list(known)}")
    missing = sorted(set(requested) - set(available))
    if missing:
        raise ValueError(
            f"{model} checkpoint has no weights for outputs {missing}; it holds {list(available)}"
        )


def sow_trace(module: nn.Module, attention: dict[str, Any], hidden: dict[str, Any]) -> None:
    """Sows every attention map and hidden state, keyed by layer name (`value_jax.names`), into
    `module`'s `intermediates` collection: what `Trace.from_intermediates` reads."""
    for name, probs in attention.items():
        module.sow("intermediates", N.sown(N.ATTENTION, name), probs)
    for name, states in hidden.items():
        module.sow("intermediates", N.sown(N.HIDDEN, name), states)


def layer_norm(name: str | None = None) -> nn.LayerNorm:
    # Normalisation always in float32: a bf16 forward keeps its reductions in float32.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, use_fast_variance=False, name=name)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with `query`, `key`, `value` projections.

    PyTorch: `BertSelfAttention` (UNITER, HF) / `BertAttention` (original LXMERT, where `ctx_dim`
    lets the keys come from the other stream). Returns `(context [B, Q, D], probs [B, H, Q, K])`.
    """

    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, key_bias):
        head_dim = self.hidden_size // self.num_heads
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)

        def split(x):
            return x.reshape(x.shape[:2] + (self.num_heads, head_dim))

        q = split(dense("query")(queries))
        k = split(dense("key")(keys))
        v = split(dense("value")(keys))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(head_dim) + key_bias
        probs = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        return context.reshape(context.shape[:2] + (self.hidden_size,)), probs


class AttentionOutput(nn.Module):
    """`dense` then `LayerNorm(x + residual)` (PyTorch `BertSelfOutput` / `BertAttOutput`)."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual):
        x = nn.Dense(self.hidden_size, dtype=self.dtype, name="dense")(x)
        return layer_norm("LayerNorm")(x + residual)


class AttentionBlock(nn.Module):
    """Attention + output sub-layer. `core_name` is `self` (BERT, LXMERT self-attention) or `att`
    (LXMERT's cross-attention `visual_attention`)."""

    hidden_size: int
    num_heads: int
    core_name: str = "self"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, key_bias):
        context, probs = MultiHeadAttention(
            self.hidden_size, self.num_heads, self.dtype, name=self.core_name
        )(queries, keys, key_bias)
        return AttentionOutput(self.hidden_size, self.dtype, name="output")(context, queries), probs


class Intermediate(nn.Module):
    """`dense` + GELU (PyTorch `BertIntermediate`)."""

    intermediate_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return gelu(nn.Dense(self.intermediate_size, dtype=self.dtype, name="dense")(x))


class BertLayer(nn.Module):
    """A transformer layer: `attention.{self,output}`, `intermediate`, `output`.

    Returns `(hidden [B, S, D], probs [B, H, S, S])`.
    """

    hidden_size: int
    num_heads: int
    intermediate_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_bias):
        x, probs = AttentionBlock(
            self.hidden_size, self.num_heads, "self", self.dtype, name="attention"
        )(x, x, key_bias)
        h = Intermediate(self.intermediate_size, self.dtype, name="intermediate")(x)
        return AttentionOutput(self.hidden_size, self.dtype, name="output")(h, x), probs


class PredictionTransform(nn.Module):
    """`dense` + GELU + `LayerNorm` (PyTorch `BertPredictionHeadTransform`)."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = gelu(nn.Dense(self.hidden_size, dtype=self.dtype, name="dense")(x))
        return layer_norm("LayerNorm")(x)


class MLMHead(nn.Module):
    """`cls.predictions`: transform, then the decoder tied to the word embeddings, plus `bias`."""

    hidden_size: int
    vocab_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, word_embedding):
        x = PredictionTransform(self.hidden_size, self.dtype, name="transform")(x)
        bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,))
        logits = jnp.einsum(
            "...d,vd->...v", x, word_embedding.astype(x.dtype), preferred_element_type=jnp.float32
        )
        return logits + bias


class Pooler(nn.Module):
    """`tanh(dense(h[:, 0]))`."""

    hidden_size: int

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.hidden_size, name="dense")(x[:, 0]))
