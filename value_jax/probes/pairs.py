"""Shared machinery of the pair analyses (coreference: region–phrase; relations: region–region).

Both reduce the same way: per pair and head a max attention in each direction (`kernels.set_max`),
per-class sums of those for the head tables, and per-pair features collected for the trained
probers (Eq. 3 attention features, Eq. 4 layer-wise embeddings).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from value_jax import kernels, names


def gather_rows(states, idx):
    """`states [L, B, S, D]`, `idx [B, P]` → `[B, P, L, D]` (the rows of each item, every layer)."""
    picked = jax.vmap(lambda s: jnp.take_along_axis(s, idx[:, :, None], axis=1))(states)
    return jnp.transpose(picked, (1, 2, 0, 3))


def mean_rows(states, idx, mask):
    """`states [L, B, S, D]`, token sets `idx/mask [B, P, M]` → `[B, P, L, D]` mean embedding
    (VALUE Eq. 4: a phrase's embedding is the mean of its tokens). Empty sets give 0."""
    idx = jnp.where(mask, idx, 0)
    w = mask.astype(states.dtype)

    def one_layer(s):  # s [B, S, D]
        rows = jax.vmap(lambda sb, ib: sb[ib])(s, idx)  # [B, P, M, D]
        total = jnp.einsum("bpmd,bpm->bpd", rows, w)
        return total / jnp.maximum(jnp.sum(w, -1), 1.0)[..., None]

    return jnp.transpose(jax.vmap(one_layer)(states), (1, 2, 0, 3))


def random_region_pairs(seed: int, row_keys, item_offset, region_mask, items: int):
    """A random ordered pair of two distinct real regions per item, for the random baselines.

    `row_keys [B]` (`row.image`), `item_offset [B]` (`row.item_offset`), `region_mask [B, R]`
    -> `(first [B, P], second [B, P])` region indices, uniform over the ordered pairs of the
    row's real regions (the first ones of the region slot). Item p of a row draws from
    `fold_in(fold_in(PRNGKey(seed), row key), item_offset + p)`, so the draws depend on the seed,
    the image and the item's position in its example only: not on batching or on how the
    example was split over rows. Rows with fewer than two regions get (0, 0)."""
    n = jnp.sum(region_mask > 0, axis=1).astype(jnp.int32)
    base = jax.random.PRNGKey(seed)

    def row(key, offset, count):
        row_key = jax.random.fold_in(base, key)

        def item(i):
            k_a, k_b = jax.random.split(jax.random.fold_in(row_key, offset + i))
            a = jax.random.randint(k_a, (), 0, jnp.maximum(count, 1))
            b = jax.random.randint(k_b, (), 0, jnp.maximum(count - 1, 1))
            b = jnp.where(b >= a, b + 1, b)
            ok = count >= 2
            return jnp.where(ok, a, 0), jnp.where(ok, b, 0)

        return jax.vmap(item)(jnp.arange(items, dtype=jnp.int32))

    return jax.vmap(row)(row_keys.astype(jnp.uint32), item_offset.astype(jnp.int32), n)


def class_sums(values, classes, item_mask, num_classes):
    """Per-class sums of `values [L, B, P, H]` over the items where `item_mask [B, P]`:
    returns `(sums [C, L, H], counts [C])`."""
    w = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32) * item_mask[..., None]
    return jnp.einsum("lbph,bpc->clh", values.astype(jnp.float32), w), jnp.sum(w, axis=(0, 1))


def singleton(idx):
    """`[B, P]` indices → `([B, P, 1] indices, [B, P, 1] all-true mask)` for `kernels.set_max`."""
    return idx[..., None], jnp.ones(idx.shape + (1,), bool)


def both_directions(block_ab, block_ba, a_idx, a_mask, b_idx, b_mask):
    """Max attention a→b on `block_ab [L, B, H, A, B']` and b→a on `block_ba`: `[L, B, P, H]` each."""
    ab = kernels.set_max_layers(block_ab, a_idx, a_mask, b_idx, b_mask)
    ba = kernels.set_max_layers(block_ba, b_idx, b_mask, a_idx, a_mask)
    return ab, ba


def head_label(layer_names: list[str], flat_index: int, heads: int) -> str:
    """The label (`names.head_label`) of head `flat_index` of a flattened `[L, H]` array."""
    layer, head = divmod(int(flat_index), heads)
    return names.head_label(layer_names[layer], head)


def best_and_random(means: np.ndarray, rand_means: np.ndarray, layer_names: list[str], c: int):
    """Class `c` of `means` / `rand_means [C, L, H]`: the best head and its value, the best head
    of the random baseline with ITS value (VALUE's "(Rand.)" columns), and the random value at
    the real best head, as a dict."""
    label, flat, value = best_heads(means[c : c + 1], layer_names)[0]
    rand_label, _, rand_value = best_heads(rand_means[c : c + 1], layer_names)[0]
    return {
        "head": label,
        "value": value,
        "rand_head": rand_label,
        "rand_value": rand_value,
        "rand_same_head": float(rand_means[c].reshape(-1)[flat]),
    }


def best_heads(means: np.ndarray, layer_names: list[str]):
    """For `means [C, L, H]`, per class: (label of the best head, its flat index, its value)."""
    c, _, h = means.shape
    flat = means.reshape(c, -1)
    best = np.nanargmax(np.where(np.isnan(flat), -np.inf, flat), axis=1)
    return [(head_label(layer_names, b, h), int(b), float(flat[i, b])) for i, b in enumerate(best)]
