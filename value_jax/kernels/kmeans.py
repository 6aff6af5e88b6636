"""Multimodal fusion (VALUE §3.1, Table 1): 2-means on one layer's tokens, NMI with modality.

Pure `jax.numpy` over padded `[B, N, D]` tokens with a validity mask, like every kernel. The
clustering works on Gram matrices (centres as weights over the points), runs deterministic
restarts so that its mean NMI agrees with scikit-learn's `KMeans(n_init=10)` (tested), and on CPU
compacts the restarts that still move after a few Lloyd steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32
# Gram matrices feed decisions (cluster assignment), so they must not silently drop to TF32 /
# bf16 passes on accelerators whose default float32 matmul precision is reduced.
_HIGHEST = jax.lax.Precision.HIGHEST
_STEPS_PER_CHECK = 4  # Lloyd steps per k-means loop-exit test off CPU (1 on CPU)
_CPU_STEPS_BEFORE_COMPACTING = 8  # then only the k-means restarts still moving go on (CPU)
_CPU_COMPACT_SHARE = 8  # ... if at most 1/8 of them still move
_PHI1 = (np.sqrt(5.0) - 1.0) / 2.0  # golden ratio − 1
_PHI2 = 1.0 / 1.324717957244746  # 1 / plastic number


def nmi(pred, labels, mask):
    """Normalised mutual information of two binary labelings over the valid tokens.

    pred, labels `[B, N]` int with values in {0, 1} at valid tokens (anything at padding);
    mask `[B, N]` bool. Returns `[B]` float32:
        NMI = MI / ((H(labels) + H(pred)) / 2),  natural log,
    from the 2×2 contingency table — scikit-learn's `normalized_mutual_info_score` with its
    default arithmetic normalisation, including its edge cases: 1.0 when both labelings have the
    same single value or there are no valid tokens (the latter is meaningless: drop such
    samples), 0.0 when exactly one labeling is constant or MI is 0; a perfect match (up to
    swapping the names) is exactly 1.0 and other values are clipped to [0, 1].
    """
    valid = mask.astype(bool)
    p1 = valid & (pred == 1)
    p0 = valid & (pred != 1)
    l1 = valid & (labels == 1)
    l0 = valid & (labels != 1)

    def count(a, b):
        return jnp.sum(a & b, axis=-1).astype(_F32)

    table = jnp.stack(
        [
            jnp.stack([count(l0, p0), count(l0, p1)], -1),
            jnp.stack([count(l1, p0), count(l1, p1)], -1),
        ],
        -2,
    )  # [B, 2, 2]
    n = jnp.sum(table, axis=(-2, -1))  # [B]
    rows = jnp.sum(table, axis=-1)  # [B, 2] labels
    cols = jnp.sum(table, axis=-2)  # [B, 2] pred
    outer = rows[:, :, None] * cols[:, None, :]  # [B, 2, 2]
    # Counts are exact integers in float32, so n·n_ij − a_i·b_j is exact; log1p of the ratio
    # keeps near-independent tables (MI ≈ 0) accurate where log(n·n_ij / (a_i·b_j)) is not.
    nz = table > 0
    safe_outer = jnp.where(nz, outer, 1.0)
    log_ratio = jnp.log1p((n[:, None, None] * table - outer) / safe_outer)
    safe_n = jnp.maximum(n, 1.0)
    mi = jnp.sum(jnp.where(nz, table * log_ratio, 0.0), axis=(-2, -1)) / safe_n
    mi = jnp.maximum(mi, 0.0)

    def entropy(marg):
        p = marg / safe_n[:, None]
        return -jnp.sum(jnp.where(marg > 0, p * jnp.log(jnp.where(marg > 0, p, 1.0)), 0.0), -1)

    h_sum = entropy(rows) + entropy(cols)
    k_labels = jnp.sum(rows > 0, axis=-1)
    k_pred = jnp.sum(cols > 0, axis=-1)
    both_trivial = (k_labels == k_pred) & (k_labels <= 1)
    one_trivial = (jnp.minimum(k_labels, k_pred) <= 1) & ~both_trivial
    # Two filled cells with both labelings split = the same partition: exactly 1, not 1 ± ulp.
    perfect = (k_labels == 2) & (k_pred == 2) & (jnp.sum(nz, axis=(-2, -1)) == 2)
    score = jnp.clip(jnp.where(mi > 0, mi / jnp.maximum(h_sum / 2.0, 1e-30), 0.0), 0.0, 1.0)
    score = jnp.where(perfect, 1.0, score)
    return jnp.where(both_trivial, 1.0, jnp.where(one_trivial, 0.0, score)).astype(_F32)


def _gram_one(x, mask):
    """Gram matrix `[N, N]` of one sample's valid points centred on their mean (zero at padding).

    Lloyd's k-means needs only inner products between points and centres, and every centre is a
    weighted mean of points, so all distances follow from G = X_c X_cᵀ. With N ≈ 20–100 tokens
    and D = 768 this reads the hidden states once (one matmul) and makes each step O(N²) per
    centre instead of O(N·D).
    The points are first shifted by the first valid token, not by their mean: hidden states sit
    far from the origin, the shift brings them to the scale of their spread before the
    expanded products, and bitwise-identical tokens then give exact zeros, so they tie exactly
    (a float32 mean of identical values need not equal them). The mean is then removed in
    Gram space (double centring), where all magnitudes are already spread-sized.
    """
    x = x.astype(_F32)
    origin = x[jnp.argmax(mask)]
    shifted = jnp.where(mask[:, None], x - origin, 0.0)
    gram = jnp.dot(shifted, shifted.T, precision=_HIGHEST)
    count = jnp.maximum(jnp.sum(mask), 1).astype(_F32)
    row_mean = jnp.sum(gram, axis=-1) / count  # padding adds 0
    grand_mean = jnp.sum(row_mean) / count
    centred = gram - row_mean[:, None] - row_mean[None, :] + grand_mean
    return jnp.where(mask[:, None] & mask[None, :], centred, 0.0)


def _gram(x, mask):
    """`_gram_one` for every sample: x `[B, N, D]`, mask `[B, N]` -> `[B, N, N]`.

    XLA:CPU runs a batched matmul of many small matrices about 2.5x slower than the same
    matrices one after another (`lax.map`); accelerators want the batched matmul.
    """
    if _on_cpu():
        return jax.lax.map(lambda xm: _gram_one(*xm), (x, mask))
    return jax.vmap(_gram_one)(x, mask)


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _bmm(gram, w):
    """`[B, N, N] × [B, C, N] -> [B, C, N]`: inner products of every point with C centres."""
    if _on_cpu() and w.shape[1] > 1:
        # Broadcast-multiply-sum over the Gram matrix's leading axis (it is symmetric): XLA:CPU
        # vectorises this along the contiguous axis, about 2x faster than its batched matmul
        # of [C, N] × [N, N] blocks. For C = 1 (a batched matrix-vector product) the opposite
        # holds, by about 30x.
        # The barrier keeps XLA from sharing one materialised [B, C, N, N] broadcast of the
        # Gram matrices between calls (measured: 50x slower than fusing it into each sum).
        gram, w = jax.lax.optimization_barrier((gram, w))
        return jnp.sum(gram[:, None, :, :] * w[:, :, :, None], axis=-2)
    return jnp.einsum("bnm,bcm->bcn", gram, w, precision=_HIGHEST)


def _group_means(in1, valid, w0, w1):
    """Centre weights (centre = Σ_i w_i x_i) of the two groups; an empty group keeps w."""
    in0 = valid & ~in1
    n0 = jnp.sum(in0, axis=-1, keepdims=True).astype(_F32)
    n1 = jnp.sum(in1, axis=-1, keepdims=True).astype(_F32)
    w0 = jnp.where(n0 > 0, in0.astype(_F32) / jnp.maximum(n0, 1.0), w0)
    w1 = jnp.where(n1 > 0, in1.astype(_F32) / jnp.maximum(n1, 1.0), w1)
    return w0, w1


def _steps_per_check() -> int:
    return 1 if _on_cpu() else _STEPS_PER_CHECK


def _lloyd(gram, valid, w0, w1, num_iters):
    """Lloyd steps for C candidate centre pairs at once, centres held as point weights.

    gram `[B, N, N]`, valid `[B, 1, N]`, w0 / w1 `[B, C, N]`. Returns the final cluster-1 masks
    `[B, C, N]` and the k-means objective of each final partition `[B, C]`.
    """
    if num_iters > 0:
        first = _assign(gram, valid, w0, w1)
        w0, w1 = _group_means(first, valid, w0, w1)
        if _on_cpu() and num_iters > _CPU_STEPS_BEFORE_COMPACTING:
            w0, w1, prev, moving = _lloyd_steps(
                gram, valid, w0, w1, first, 1, _CPU_STEPS_BEFORE_COMPACTING
            )
            w0, w1 = _finish_moving(gram, valid, w0, w1, prev, moving, num_iters)
        else:
            w0, w1, _, _ = _lloyd_steps(gram, valid, w0, w1, first, 1, num_iters)
    in1 = _assign(gram, valid, w0, w1)
    # Objective of the partition with its own means: Σ||x_i||² − Σ_j |S_j|·||mean(S_j)||².
    m0, m1 = _group_means(in1, valid, jnp.zeros_like(w0), jnp.zeros_like(w1))
    sq_norm = jnp.diagonal(gram, axis1=-2, axis2=-1)[:, None, :]
    n0 = jnp.sum(valid & ~in1, axis=-1).astype(_F32)
    n1 = jnp.sum(in1, axis=-1).astype(_F32)
    c0_sq = jnp.sum(m0 * _bmm(gram, m0), axis=-1)
    c1_sq = jnp.sum(m1 * _bmm(gram, m1), axis=-1)
    # One sum of the two groups' terms, so a partition and its mirror image score identically.
    inertia = jnp.sum(jnp.where(valid, sq_norm, 0.0), axis=-1) - (n0 * c0_sq + n1 * c1_sq)
    return in1, inertia


def _assign(gram, valid, w0, w1):
    """Cluster-1 mask `[B, C, N]`: points strictly nearer centre 1 (a tie stays with 0)."""
    # ||x−c0||² − ||x−c1||² = 2·x·(c1−c0) − (c1+c0)·(c1−c0); with c = Σ w_i x_i, x·c = (G w)
    # and c·c' = wᵀ G w'.
    diff = _bmm(gram, w1 - w0)
    offset = jnp.sum((w1 + w0) * diff, axis=-1, keepdims=True)
    return (2.0 * diff - offset > 0.0) & valid


def _lloyd_steps(gram, valid, w0, w1, prev, done, stop):
    """Lloyd steps done + 1 .. stop (Python ints) after `prev`, the assignment of step `done`.

    Returns the centre weights, the last assignment and which pairs `[B, C]` it changed (all
    False if the loop stopped because nothing changed).
    Once no assignment changes, the means and so every later step are unchanged: stopping
    there returns exactly what all steps would, usually after far fewer. The loop body takes
    `_STEPS_PER_CHECK` steps on accelerators (each a no-op past `stop`), so the stop test, a
    device-to-host round trip per iteration on GPUs, runs a few times per call, not 20. On CPU
    the test is free and the extra steps are not: one step per test.
    """

    def not_done(carry):
        i, changed = carry[:2]
        return (i < stop) & changed

    def step(carry):
        i, _, w0, w1, prev, moving = carry
        changed = jnp.asarray(False)
        for _ in range(_steps_per_check()):
            in1 = _assign(gram, valid, w0, w1)
            n0, n1 = _group_means(in1, valid, w0, w1)
            live = i < stop
            moved = jnp.any(in1 != prev, axis=-1)
            changed = changed | (live & jnp.any(moved))
            moving = jnp.where(live, moved, moving)
            w0, w1 = jnp.where(live, n0, w0), jnp.where(live, n1, w1)
            prev, i = jnp.where(live, in1, prev), i + live
        return i, changed, w0, w1, prev, moving

    init = (jnp.asarray(done), jnp.asarray(True), w0, w1, prev, jnp.ones(w0.shape[:2], bool))
    _, _, w0, w1, prev, moving = jax.lax.while_loop(not_done, step, init)
    return w0, w1, prev, moving


def _finish_moving(gram, valid, w0, w1, prev, moving, num_iters):
    """Steps `_CPU_STEPS_BEFORE_COMPACTING` + 1 .. num_iters for the pairs still `moving`.

    Most pairs settle within a few steps, a few need 15 or more; a batch's loop runs until the
    last one settles. When at most 1/`_CPU_COMPACT_SHARE` of the pairs still move, they are
    gathered (with their Gram matrices) and finish on their own, then scattered back; pairs
    that settled are fixed points, so taking a few of them along changes nothing. Otherwise
    all pairs go on together. Either way the result is that of the uncompacted loop.
    """
    batch, pairs, n_tok = w0.shape
    size = max(1, batch * pairs // _CPU_COMPACT_SHARE)
    start = _CPU_STEPS_BEFORE_COMPACTING

    def compacted(args):
        w0, w1, prev = (a.reshape(batch * pairs, 1, n_tok) for a in args)
        _, idx = jax.lax.top_k(moving.reshape(-1).astype(_F32), size)  # moving ones first
        sample = idx // pairs
        sub = _lloyd_steps(
            gram[sample], valid[sample], w0[idx], w1[idx], prev[idx], start, num_iters
        )
        return tuple(
            a.at[idx].set(b).reshape(batch, pairs, n_tok) for a, b in zip((w0, w1, prev), sub[:3])
        )

    def together(args):
        return _lloyd_steps(gram, valid, *args, start, num_iters)[:3]

    w0, w1, _ = jax.lax.cond(jnp.sum(moving) <= size, compacted, together, (w0, w1, prev))
    return w0, w1


def restart_draws(num_starts: int) -> np.ndarray:
    """The fixed numbers in [0, 1) that stand in for k-means++'s D²-weighted random draws.

    Returns `[S, 2]` float64: restart r (0-based) draws u₁ = frac((r + ½)·φ₁) and
    u₂ = frac((r + ½)·φ₂), a rank-1 lattice with the golden and plastic ratios (evenly spread,
    and the two columns not lined up with each other or with the first centres' ranks).
    """
    r = np.arange(num_starts) + 0.5
    return np.stack([(r * _PHI1) % 1.0, (r * _PHI2) % 1.0], axis=1)


def kmeans2(x, mask, num_iters=20, num_starts=10):
    """Batched Lloyd k-means with k = 2 on the valid tokens of each sample (VALUE §3.1).

    x `[B, N, D]` token representations (any float dtype; computed in float32), mask `[B, N]`
    bool. Returns assignments `[B, N]` int32 in {0, 1}, cluster 0 being the one that holds the
    first valid token; padded tokens get -1.

    scikit-learn's `KMeans(n_clusters=2, n_init=num_starts)` with its random numbers replaced
    by fixed ones, so a sample's result depends on nothing but its tokens (not on its batch).
    Each of the `num_starts` restarts, run side by side, seeds as greedy k-means++ does for
    k = 2, over the n valid tokens in index order:
      * first centre: the valid token of rank ⌊(2r + 1)·n / 2S⌋ for restart r = 0..S−1 (0-based,
        S = num_starts): evenly spread over the tokens, as S uniform draws would be on average;
      * two trial partners drawn with probability ∝ D² (squared distance to the first centre):
        for u = u₁, u₂ (`restart_draws`), the first valid token whose running sum of D²
        reaches u·ΣD² (scikit-learn's `searchsorted`); the second centre is the trial whose
        pair leaves the smaller potential Σ min(D², D²_trial), ties to u₁.
    Then `num_iters` (a Python int) Lloyd steps — assign each point to the nearer centre, ties
    to centre 0; move each centre to its points' mean; a centre left without points stays put —
    and a final assignment. The loop stops once no assignment changes, which gives the same
    result as running all steps. The final partition with the lowest k-means objective (sum of
    squared distances to its two means) is kept, ties to the earlier restart.

    Why scikit-learn's seeding rather than a better optimiser: in the regime of the paper's
    Table 1 (NMI 0.2–0.8) the 2-means objective has many local optima and scikit-learn's 10
    restarts often miss the best one. On `benchmarks/kmeans_nmi.py`'s data a more thorough
    search (a greedy k-means++ pair from every token) finds lower objectives and a mean NMI
    0.025 above scikit-learn's, while cheap deterministic starts (the farthest pair, the
    principal-axis split) stop in poor optima and fall 0.15–0.25 below it. Table 1's numbers
    come from scikit-learn's procedure; this one reproduces its statistics (restarts and
    seeding as there, only the draws fixed).

    If all valid points coincide, every distance ties and all points land in cluster 0
    (scikit-learn likewise returns a single cluster, with a warning).
    Distances come from the Gram matrix of the mean-centred points in float32 (see `_gram`).
    Cost per sample: the Gram matrix, O(N²·D), then O(N²) per restart and Lloyd step.
    """
    valid = mask.astype(bool)
    gram = _gram(x, valid)  # [B, N, N]
    sq_norm = jnp.diagonal(gram, axis1=-2, axis2=-1)  # [B, N] = ||x_i − mean||²
    n_tok = mask.shape[-1]
    draws = jnp.asarray(restart_draws(num_starts), _F32)  # [S, 2]

    def sq_dist(idx):  # idx [B, S] -> [B, S, N]: ||x_idx − x_n||², 0 at padding
        g_rows = jnp.take_along_axis(gram, idx[:, :, None], axis=1)
        d = sq_norm[:, None, :] - 2.0 * g_rows + jnp.take_along_axis(sq_norm, idx, 1)[:, :, None]
        return jnp.where(valid[:, None, :], jnp.maximum(d, 0.0), 0.0)

    def first_valid_where(cond):  # cond [B, S, N] -> [B, S] index of its first valid True
        return jnp.argmax(cond & valid[:, None, :], axis=-1)

    count = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.int32)  # [B, 1]
    rank = (2 * jnp.arange(num_starts) + 1) * count // (2 * num_starts)  # [B, S], in integers
    running = jnp.cumsum(valid, axis=-1)  # valid tokens up to n
    first = first_valid_where(running[:, None, :] > rank[:, :, None])
    d_first = sq_dist(first)
    cum = jnp.cumsum(d_first, axis=-1)
    total = cum[:, :, -1:]
    trials = [first_valid_where(cum >= draws[:, t, None] * total) for t in (0, 1)]
    potential = [jnp.sum(jnp.minimum(d_first, sq_dist(t)), axis=-1) for t in trials]
    second = jnp.where(potential[1] < potential[0], trials[1], trials[0])

    w0 = jax.nn.one_hot(first, n_tok, dtype=_F32)  # [B, S, N]
    w1 = jax.nn.one_hot(second, n_tok, dtype=_F32)
    in1, inertia = _lloyd(gram, valid[:, None, :], w0, w1, num_iters)
    best = jnp.argmin(inertia, axis=-1)  # first minimum wins
    in1 = jnp.take_along_axis(in1, best[:, None, None], axis=1)[:, 0]
    # Canonical names: cluster 0 holds the first valid token.
    first_token = jnp.argmax(valid, axis=-1)
    in1 = in1 != jnp.take_along_axis(in1, first_token[:, None], axis=1)
    return jnp.where(valid, in1.astype(jnp.int32), -1)


def kmeans2_nmi(x, labels, mask, num_iters=20, num_starts=10):
    """VALUE §3.1 multimodal fusion degree for one layer: NMI(2-means clusters, true modality).

    x `[B, N, D]` token representations, labels `[B, N]` int (0 = text, 1 = region, say; only
    the partition matters), mask `[B, N]` bool. Returns `[B]` float32; smaller = more fused.
    See `kmeans2` for the initialisation and `nmi` for edge cases. Table 1 is the mean over
    samples of this value, per layer (`over_layers(kmeans2_nmi)` for `[L, B, N, D]`).
    """
    return nmi(kmeans2(x, mask, num_iters, num_starts), labels, mask)
