"""Reductions over attention blocks and hidden states: the numeric core of every probe.

Pure `jax.numpy` over padded arrays plus index / mask arrays. Shapes are static and padding is
handled by masks, so one compiled step serves every batch of a bucket; nothing loops over samples
in Python; every reduction runs in float32 whatever the input dtype (a bfloat16 forward included).

Attention is written query→key: `attn[b, h, q, k]` is how much query `q` attends to key `k`, and
`v2t` is visual queries attending to text keys (VALUE's "V→T"). Each function takes one layer;
`over_layers(fn)` maps a kernel over a leading layer axis `[L, ...]` of its first argument.

The attention reductions live here; the multimodal-fusion clustering (2-means and NMI, VALUE
§3.1) lives in `value_jax.kernels.kmeans` and is re-exported: `kernels.kmeans2_nmi`, ...

Paper references: VALUE = Cao et al. 2020, "Behind the Scene: Revealing the Secrets of
Pre-trained Vision-and-Language Models" (§3.1 fusion, Eq. 1 modality importance, Eq. 2
image-to-text heads, §3.3.2 coreference, §3.4 relations); VL-InterpreT = Aflalo et al. 2022
(head-summary block means, `app/database/db_analyzer.py`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def over_layers(fn: Callable) -> Callable:
    """Applies a kernel to a leading layer axis of its first argument; other arguments shared.

    `over_layers(set_max)(attn_layers [L, B, H, Q, K], q_idx, ...) -> [L, B, P, H]`.
    Every kernel here treats samples independently, so the layer axis is folded into the batch
    (`[L·B, ...]`, the shared arrays repeated L times) rather than vmapped: on CPU this runs the
    k-means about twice as fast as `jax.vmap`, whose batching of its inner loops moves the big
    operand around. Array arguments must have the batch axis first (true for every kernel here);
    scalars and other Python values pass through unchanged.
    """

    @functools.wraps(fn)
    def mapped(first, *args, **kwargs):
        layers, batch = first.shape[:2]

        def repeat(a):
            if not isinstance(a, (jax.Array, np.ndarray)) or a.ndim == 0:
                return a
            if a.shape[0] != batch:
                raise ValueError(
                    f"over_layers({fn.__name__}): shared argument of shape "
                    f"{a.shape} should start with the batch axis ({batch})"
                )
            return jnp.broadcast_to(a[None], (layers, *a.shape)).reshape(
                layers * batch, *a.shape[1:]
            )

        out = fn(
            first.reshape(layers * batch, *first.shape[2:]),
            *(repeat(a) for a in args),
            **{k: repeat(v) for k, v in kwargs.items()},
        )
        return jax.tree_util.tree_map(lambda o: o.reshape(layers, batch, *o.shape[1:]), out)

    return mapped


# --------------------------------------------------------------------------------------------
# Attention-block statistics.
# --------------------------------------------------------------------------------------------


def set_max(attn, q_idx, q_mask, k_idx, k_mask):
    """Per item and head, the largest attention from any of its queries to any of its keys.

    attn `[B, H, Q, K]` (one attention block of one layer); q_idx `[B, P, M]` int: the query
    positions (within this block's query axis) of item p, q_mask `[B, P, M]` bool which of those
    slots are real; k_idx `[B, P, N]`, k_mask `[B, P, N]` likewise for keys.
    Returns `[B, P, H]` float32: `max_{m, n valid} attn[b, h, q_idx[b,p,m], k_idx[b,p,n]]`.

    An item with no valid query or no valid key (a padded item) returns 0; callers keep their own
    item mask for averaging. Indices in masked slots are ignored whatever they hold; indices in
    valid slots must lie inside the block (out-of-range ones are clamped, as jnp gathers are).

    VALUE §3.3.2 (Table 2) coreference: V→T = max_{t∈p} α_{v→t} with q = {region v}, k = the
    phrase's tokens, on the v2t block; T→V = max_{t∈p} α_{t→v} with q = the phrase's tokens,
    k = {region v}, on the t2v block. VALUE §3.4 (Table 4) relations: q = {subject}, k = {object}
    and the reverse, on the v2v block (also the phrase-max features of Eq. 3's prober).
    """
    q_idx = jnp.where(q_mask, q_idx, 0)
    k_idx = jnp.where(k_mask, k_idx, 0)

    def one_sample(a, qi, ki):  # a [H, Q, K], qi [P, M], ki [P, N] -> [H, P, M, N]
        return a[:, qi[:, :, None], ki[:, None, :]]

    vals = jax.vmap(one_sample)(attn, q_idx, k_idx).astype(_F32)  # [B, H, P, M, N]
    pair = q_mask[:, :, :, None] & k_mask[:, :, None, :]  # [B, P, M, N]
    vals = jnp.where(pair[:, None], vals, -jnp.inf)
    best = jnp.max(vals, axis=(-2, -1))  # [B, H, P]
    best = jnp.where(jnp.any(pair, axis=(-2, -1))[:, None], best, 0.0)
    return jnp.swapaxes(best, 1, 2)  # [B, P, H]


def set_max_layers(attn_layers, q_idx, q_mask, k_idx, k_mask):
    """`set_max` on every layer: attn_layers `[L, B, H, Q, K]` -> `[L, B, P, H]` float32.

    The index and mask arrays are shared by all layers (shapes as in `set_max`).
    """
    return over_layers(set_max)(attn_layers, q_idx, q_mask, k_idx, k_mask)


def cls_modality_sums(attn, text_key_mask, region_key_mask):
    """VALUE Eq. 1, modality importance: I_{M,j} = Σ_{i∈M} α^j_{CLS→i}, for M = T and M = V.

    attn `[B, H, N, N]`: the joint single-stream attention of one layer, row 0 = [CLS] query.
    text_key_mask, region_key_mask `[B, N]` bool: the keys counted as text (t1..tm) and as
    regions (v1..vn); callers leave [CLS], [SEP] and padding out, so I_T + I_V ≤ 1.
    Returns `(I_T [B, H], I_V [B, H])` float32.
    """
    cls_row = attn[:, :, 0, :].astype(_F32)  # [B, H, N]
    i_t = jnp.sum(jnp.where(text_key_mask[:, None, :], cls_row, 0.0), axis=-1)
    i_v = jnp.sum(jnp.where(region_key_mask[:, None, :], cls_row, 0.0), axis=-1)
    return i_t, i_v


def image_to_text_indicator(v2t, region_query_mask, text_key_mask, threshold=0.5):
    """VALUE Eq. 2: head j is an image-to-text head iff ∃ v∈V: Σ_{t∈T} α^j_{v→t} > threshold.

    v2t `[B, H, R, T]`: region queries attending to text keys (for a single-stream model a slice
    of the joint softmax, so rows need not sum to 1). region_query_mask `[B, R]` bool (real
    regions), text_key_mask `[B, T]` bool (the text tokens counted in T).
    Returns `[B, H]` bool. A sample without real regions is False for every head.
    """
    text_mass = jnp.sum(
        jnp.where(text_key_mask[:, None, None, :], v2t.astype(_F32), 0.0), axis=-1
    )  # [B, H, R]
    hit = (text_mass > threshold) & region_query_mask[:, None, :]
    return jnp.any(hit, axis=-1)


def block_mean(attn, q_mask, k_mask, band=None, band_counts_as_zero=False):
    """Mean attention over the masked query×key block (VL-InterpreT's head-summary statistics).

    attn `[B, H, Q, K]`; q_mask `[B, Q]`, k_mask `[B, K]` bool. Returns `[B, H]` float32;
    an empty block gives 0.

    band=k (a Python int): entries with |q − k| ≤ k (block positions) are left out — with k=1
    this is VL-InterpreT's "image-to-image attention without self" (diagonal and ±1
    off-diagonals), for which the query and key axes must list the same tokens in the same
    order. By default the band is excluded from the mean altogether (a mean over the off-band
    entries). VL-InterpreT instead zeroes the band and still divides by the full block size;
    band_counts_as_zero=True reproduces that.
    """
    keep = q_mask[:, :, None] & k_mask[:, None, :]  # [B, Q, K]
    count_mask = keep
    if band is not None:
        q_pos = jnp.arange(attn.shape[-2])[:, None]
        k_pos = jnp.arange(attn.shape[-1])[None, :]
        off_band = jnp.abs(q_pos - k_pos) > band
        keep = keep & off_band
        if not band_counts_as_zero:
            count_mask = keep
    total = jnp.sum(jnp.where(keep[:, None], attn.astype(_F32), 0.0), axis=(-2, -1))
    count = jnp.sum(count_mask, axis=(-2, -1)).astype(_F32)  # [B]
    return jnp.where(count[:, None] > 0, total / jnp.maximum(count, 1.0)[:, None], 0.0)


from value_jax.kernels.kmeans import kmeans2, kmeans2_nmi, nmi, restart_draws  # noqa: E402

__all__ = [
    "over_layers",
    "set_max",
    "set_max_layers",
    "cls_modality_sums",
    "image_to_text_indicator",
    "block_mean",
    "nmi",
    "kmeans2",
    "kmeans2_nmi",
    "restart_draws",
]
