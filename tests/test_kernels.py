"""value_jax.kernels against slow, obviously-correct numpy twins (plain loops, float64).

Inputs are padded: random lengths, and padded index slots / padded tokens hold garbage that must
not change any result. Every kernel is run under jit, several also under vmap / over_layers.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import normalized_mutual_info_score

from value_jax import kernels
from value_jax.kernels import kmeans

# Jitted once per shape: eager control flow (while_loop, lax.map) would recompile on every call.
KMEANS2 = jax.jit(kernels.kmeans2, static_argnames=("num_iters", "num_starts"))
KMEANS2_NMI = jax.jit(kernels.kmeans2_nmi, static_argnames=("num_iters",))


def _softmax(a, axis=-1):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _random_attn(rng, *shape):
    return _softmax(rng.normal(scale=2.0, size=shape)).astype(np.float32)


def _prefix_mask(rng, batch, length, low=0):
    lengths = rng.integers(low, length + 1, size=batch)
    return np.arange(length)[None, :] < lengths[:, None]


# ---------------------------------------------------------------------------------------------
# Twins.
# ---------------------------------------------------------------------------------------------


def set_max_twin(attn, q_idx, q_mask, k_idx, k_mask):
    b_, h_ = attn.shape[:2]
    p_ = q_idx.shape[1]
    out = np.zeros((b_, p_, h_))
    for b in range(b_):
        for p in range(p_):
            qs = [q for q, ok in zip(q_idx[b, p], q_mask[b, p]) if ok]
            ks = [k for k, ok in zip(k_idx[b, p], k_mask[b, p]) if ok]
            for h in range(h_):
                vals = [attn[b, h, q, k] for q in qs for k in ks]
                out[b, p, h] = max(vals) if vals else 0.0
    return out


def cls_sums_twin(attn, text_mask, region_mask):
    b_, h_, n_, _ = attn.shape
    i_t, i_v = np.zeros((b_, h_)), np.zeros((b_, h_))
    for b in range(b_):
        for h in range(h_):
            for i in range(n_):
                if text_mask[b, i]:
                    i_t[b, h] += attn[b, h, 0, i]
                if region_mask[b, i]:
                    i_v[b, h] += attn[b, h, 0, i]
    return i_t, i_v


def i2t_twin(v2t, region_mask, text_mask, threshold):
    b_, h_, r_, t_ = v2t.shape
    out = np.zeros((b_, h_), bool)
    for b in range(b_):
        for h in range(h_):
            for v in range(r_):
                mass = sum(float(v2t[b, h, v, t]) for t in range(t_) if text_mask[b, t])
                if region_mask[b, v] and mass > threshold:
                    out[b, h] = True
    return out


def block_mean_twin(attn, q_mask, k_mask, band=None, band_counts_as_zero=False):
    b_, h_, q_, k_ = attn.shape
    out = np.zeros((b_, h_))
    for b in range(b_):
        for h in range(h_):
            total, count = 0.0, 0
            for q in range(q_):
                for k in range(k_):
                    if not (q_mask[b, q] and k_mask[b, k]):
                        continue
                    if band is not None and abs(q - k) <= band:
                        count += band_counts_as_zero
                        continue
                    total += attn[b, h, q, k]
                    count += 1
            out[b, h] = total / count if count else 0.0
    return out


def vl_interpret_without_self(attn_block):
    """VL-InterpreT `img2img_mean_attn_without_self` on one unpadded `[H, R, R]` block."""
    block = attn_block.copy()
    n = block.shape[-1]
    for i in range(n):
        for j in range(n):
            if i == j or i == j + 1 or j == i + 1:
                block[:, i, j] = 0
    return block.mean(axis=(1, 2))


def kmeans2_twin(x, mask, num_iters=20, num_starts=10):
    """The documented algorithm, float64, direct distances, one restart at a time."""
    golden, plastic = (np.sqrt(5) - 1) / 2, 1 / 1.324717957244746
    out = np.full(mask.shape, -1)
    for b in range(x.shape[0]):
        idx = np.flatnonzero(mask[b])
        n = idx.size
        if n == 0:
            continue
        pts = x[b, idx].astype(np.float64)
        pts = pts - pts.mean(axis=0)
        dist = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(axis=-1)
        best, best_obj = None, np.inf
        for r in range(num_starts):
            first = (2 * r + 1) * n // (2 * num_starts)
            running = np.cumsum(dist[first])
            trials = [
                int(np.searchsorted(running, u * running[-1]))  # first reaching u·Σ
                for u in ((r + 0.5) * golden % 1, (r + 0.5) * plastic % 1)
            ]
            potential = [np.minimum(dist[first], dist[t]).sum() for t in trials]
            second = trials[1] if potential[1] < potential[0] else trials[0]
            c0, c1 = pts[first], pts[second]
            for _ in range(num_iters):
                in1 = ((pts - c1) ** 2).sum(1) < ((pts - c0) ** 2).sum(1)
                if in1.any():
                    c1 = pts[in1].mean(axis=0)
                if (~in1).any():
                    c0 = pts[~in1].mean(axis=0)
            in1 = ((pts - c1) ** 2).sum(1) < ((pts - c0) ** 2).sum(1)
            obj = _objective(pts, in1)
            if obj < best_obj:
                best, best_obj = in1, obj
        out[b, idx] = (best != best[0]).astype(int)  # cluster 0 holds the first token
    return out


def _objective(pts, in1):
    return sum(((pts[g] - pts[g].mean(axis=0)) ** 2).sum() for g in (in1, ~in1) if g.any())


# ---------------------------------------------------------------------------------------------
# Attention-block kernels.
# ---------------------------------------------------------------------------------------------


def _set_max_inputs(rng, b=5, h=3, q=7, k=9, p=6, m=3, n=4):
    attn = _random_attn(rng, b, h, q, k)
    q_idx = rng.integers(0, q, size=(b, p, m))
    k_idx = rng.integers(0, k, size=(b, p, n))
    q_mask = rng.random((b, p, m)) < 0.6
    k_mask = rng.random((b, p, n)) < 0.6
    q_mask[:, -1] = False  # a padded item: 0 expected
    # Garbage in padded slots, out of range both ways.
    q_idx = np.where(q_mask, q_idx, rng.integers(-50, 50, size=q_idx.shape))
    k_idx = np.where(k_mask, k_idx, rng.integers(-50, 50, size=k_idx.shape))
    return attn, q_idx, q_mask, k_idx, k_mask


def test_set_max_matches_twin():
    args = _set_max_inputs(np.random.default_rng(0))
    got = np.asarray(jax.jit(kernels.set_max)(*args))
    assert got.shape == (5, 6, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, set_max_twin(*args).astype(np.float32))
    assert (got[:, -1] == 0).all()


def test_set_max_layers_and_vmap():
    rng = np.random.default_rng(1)
    attn, q_idx, q_mask, k_idx, k_mask = _set_max_inputs(rng)
    layers = np.stack([attn, _random_attn(rng, *attn.shape), _random_attn(rng, *attn.shape)])
    got = np.asarray(jax.jit(kernels.set_max_layers)(layers, q_idx, q_mask, k_idx, k_mask))
    assert got.shape == (3, 5, 6, 3)
    for layer in range(3):
        np.testing.assert_array_equal(
            got[layer], set_max_twin(layers[layer], q_idx, q_mask, k_idx, k_mask)
        )
    vmapped = jax.jit(jax.vmap(kernels.set_max, in_axes=(0, None, None, None, None)))
    np.testing.assert_array_equal(np.asarray(vmapped(layers, q_idx, q_mask, k_idx, k_mask)), got)


def test_set_max_bfloat16_input_returns_float32():
    attn, *rest = _set_max_inputs(np.random.default_rng(2))
    got = jax.jit(kernels.set_max)(jnp.asarray(attn, jnp.bfloat16), *rest)
    assert got.dtype == jnp.float32


def test_cls_modality_sums_matches_twin():
    rng = np.random.default_rng(3)
    b, h, n = 4, 3, 12
    attn = _random_attn(rng, b, h, n, n)
    text_len = rng.integers(1, 5, size=b)
    real = _prefix_mask(rng, b, n, low=7)
    pos = np.arange(n)[None, :]
    text = (pos >= 1) & (pos <= text_len[:, None]) & real  # [CLS] t1..tm [SEP] v...
    region = (pos > text_len[:, None] + 1) & real
    i_t, i_v = jax.jit(kernels.cls_modality_sums)(attn, text, region)
    assert i_t.shape == i_v.shape == (b, h)
    want_t, want_v = cls_sums_twin(attn, text, region)
    np.testing.assert_allclose(np.asarray(i_t), want_t, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(i_v), want_v, rtol=1e-6, atol=1e-7)
    assert (np.asarray(i_t + i_v) < 1.0).all()  # [CLS]/[SEP] keys left out


def test_image_to_text_indicator_matches_twin():
    rng = np.random.default_rng(4)
    b, h, r, t = 6, 4, 5, 7
    # Slices of a joint softmax: rows sum to less than 1; scale a few heads' text mass up.
    v2t = _random_attn(rng, b, h, r, t) * rng.uniform(0.2, 1.0, size=(b, h, r, 1))
    v2t = v2t.astype(np.float32)
    region = _prefix_mask(rng, b, r, low=1)
    region[0] = False  # no real region: all False
    text = _prefix_mask(rng, b, t, low=2)
    for threshold in (0.5, 0.3):
        got = np.asarray(jax.jit(kernels.image_to_text_indicator)(v2t, region, text, threshold))
        assert got.shape == (b, h) and got.dtype == bool
        np.testing.assert_array_equal(got, i2t_twin(v2t, region, text, threshold))
        assert not got[0].any()
    assert 0 < np.asarray(kernels.image_to_text_indicator(v2t, region, text)).mean() < 1


def test_image_to_text_indicator_is_strict():
    v2t = np.zeros((1, 1, 2, 2), np.float32)
    v2t[0, 0, 0] = [0.25, 0.25]  # exactly 0.5: not a hit
    ones = np.ones((1, 2), bool)
    assert not kernels.image_to_text_indicator(v2t, ones, ones)[0, 0]
    v2t[0, 0, 1] = [0.5, 0.125]
    assert kernels.image_to_text_indicator(v2t, ones, ones)[0, 0]


@pytest.mark.parametrize("band,zero", [(None, False), (1, False), (0, False), (1, True)])
def test_block_mean_matches_twin(band, zero):
    rng = np.random.default_rng(5)
    b, h, q, k = 5, 3, 8, 8
    attn = _random_attn(rng, b, h, q, k)
    q_mask = _prefix_mask(rng, b, q)
    q_mask[0] = False  # empty block -> 0
    k_mask = q_mask.copy() if band is not None else _prefix_mask(rng, b, k)
    fn = jax.jit(functools.partial(kernels.block_mean, band=band, band_counts_as_zero=zero))
    got = np.asarray(fn(attn, q_mask, k_mask))
    assert got.shape == (b, h)
    np.testing.assert_allclose(
        got, block_mean_twin(attn, q_mask, k_mask, band, zero), rtol=1e-6, atol=1e-8
    )
    assert (got[0] == 0).all()


def test_block_mean_band_counts_as_zero_is_vl_interpret():
    rng = np.random.default_rng(6)
    b, h, r = 4, 3, 9
    attn = _random_attn(rng, b, h, r, r)
    mask = _prefix_mask(rng, b, r, low=3)
    got = np.asarray(kernels.block_mean(attn, mask, mask, band=1, band_counts_as_zero=True))
    for i in range(b):
        n = mask[i].sum()
        np.testing.assert_allclose(got[i], vl_interpret_without_self(attn[i, :, :n, :n]), rtol=1e-6)


def test_block_mean_vmap():
    rng = np.random.default_rng(7)
    attn = _random_attn(rng, 3, 4, 2, 6, 6)
    mask = _prefix_mask(rng, 4, 6)
    vmapped = jax.jit(jax.vmap(lambda a: kernels.block_mean(a, mask, mask, band=1)))
    got = np.asarray(vmapped(attn))
    for layer in range(3):
        np.testing.assert_allclose(
            got[layer], block_mean_twin(attn[layer], mask, mask, 1), rtol=1e-6
        )


# ---------------------------------------------------------------------------------------------
# NMI.
# ---------------------------------------------------------------------------------------------


def test_nmi_equals_sklearn_including_degenerate_cases():
    rng = np.random.default_rng(8)
    n = 40
    preds, labels, masks = [], [], []

    def add(pred, label):
        m = len(pred)
        preds.append(np.r_[pred, rng.integers(-1, 3, size=n - m)])  # garbage at padding
        labels.append(np.r_[label, rng.integers(-1, 3, size=n - m)])
        masks.append(np.arange(n) < m)

    add([], [])  # no tokens: sklearn says 1.0
    add([1], [0])  # one token each: 1.0
    add([0] * 7, [0] * 7)  # both constant, same value: 1.0
    add([1] * 7, [0] * 7)  # both constant, different values: 1.0
    add([0] * 7, [0, 1, 0, 1, 1, 0, 0])  # one constant: 0.0
    add([0, 1, 0, 1, 1, 0, 0], [1] * 7)
    add([0, 0, 1, 1], [0, 1, 0, 1])  # independent: MI = 0
    add([0, 0, 1, 1, 1], [1, 1, 0, 0, 0])  # perfect, swapped: 1.0
    add([0] * 20 + [1], [0] * 19 + [1, 1])  # near-constant, small entropies
    for _ in range(60):
        m = int(rng.integers(2, n + 1))
        pred = rng.integers(0, 2, size=m)
        label = (
            rng.integers(0, 2, size=m)
            if rng.random() < 0.5
            else (pred ^ (rng.random(m) < rng.uniform(0, 0.5)))
        )
        add(pred, label)
    pred, label, mask = (np.stack(a) for a in (preds, labels, masks))
    got = np.asarray(jax.jit(kernels.nmi)(pred, label, mask))
    assert got.shape == (len(preds),) and got.dtype == np.float32
    want = [
        normalized_mutual_info_score(label[i][mask[i]], pred[i][mask[i]]) for i in range(len(preds))
    ]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[:8], [1, 1, 1, 1, 0, 0, 0, 1])


def test_nmi_vmap():
    rng = np.random.default_rng(9)
    pred = rng.integers(0, 2, size=(3, 4, 15))
    label = rng.integers(0, 2, size=(3, 4, 15))
    mask = rng.random((3, 4, 15)) < 0.8
    got = np.asarray(jax.jit(jax.vmap(kernels.nmi))(pred, label, mask))
    for a in range(3):
        np.testing.assert_allclose(got[a], kernels.nmi(pred[a], label[a], mask[a]), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# k-means. One shape, [B, N, D] = [40, 10 + 14, 16], so each jitted program compiles once.
# ---------------------------------------------------------------------------------------------

B, N_TEXT, N_REGIONS, D = 40, 10, 14, 16


def _modality_data(rng, sep, b=B):
    """Text tokens then regions, text padded to N_TEXT; garbage at padding."""
    n = N_TEXT + N_REGIONS
    text_len = rng.integers(2, N_TEXT + 1, size=b)
    mask = np.concatenate(
        [np.arange(N_TEXT)[None] < text_len[:, None], np.ones((b, N_REGIONS), bool)], axis=1
    )
    labels = np.concatenate(
        [np.zeros((b, N_TEXT), np.int32), np.ones((b, N_REGIONS), np.int32)], axis=1
    )
    direction = rng.normal(size=(b, 1, D))
    x = rng.normal(size=(b, n, D)) + sep * (labels[..., None] - 0.5) * direction
    x = x + 50.0 * rng.normal(size=(b, 1, D))  # far from the origin
    x = np.where(mask[..., None], x, 1e4 * rng.normal(size=(b, n, D)))
    return x.astype(np.float32), labels, mask


def _sklearn_nmi(x, labels, mask, n_init=10):
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for i in range(x.shape[0]):
            pred = KMeans(n_clusters=2, n_init=n_init, random_state=i).fit_predict(x[i][mask[i]])
            out.append(normalized_mutual_info_score(labels[i][mask[i]], pred))
    return np.array(out)


@pytest.mark.parametrize("num_starts", [10, 3, 1])
def test_kmeans2_matches_twin(num_starts):
    rng = np.random.default_rng(10)
    x, _, mask = _modality_data(rng, sep=1.0)
    mask[0] = False  # empty sample: all -1
    mask[1, 1:] = False  # a single token
    mask[2, 1:N_TEXT] = False  # a single text token
    x[3, 1:] = x[3, 0]  # all tokens identical
    got = np.asarray(KMEANS2(x, mask, num_starts=num_starts))
    assert got.shape == mask.shape and got.dtype == np.int32
    np.testing.assert_array_equal(got == -1, ~mask)
    np.testing.assert_array_equal(got[1][mask[1]], [0])
    np.testing.assert_array_equal(got[3][mask[3]], 0)
    want = kmeans2_twin(x, mask, num_starts=num_starts)
    # float32 against float64 may pick another D² draw or restart in a near-tie, rarely.
    same = sum((got[i] == want[i]).all() for i in range(B))
    assert same >= B - 1, same


def test_restart_draws_are_fixed_fractions():
    draws = kernels.restart_draws(10)
    assert draws.shape == (10, 2) and ((draws >= 0) & (draws < 1)).all()
    assert len(np.unique(draws)) == 20
    np.testing.assert_array_equal(kernels.restart_draws(10), draws)


def test_kmeans2_counts_lloyd_steps_like_twin():
    # One step stops restarts short of convergence, so the step count must match.
    x, _, mask = _modality_data(np.random.default_rng(16), sep=0.5)
    got = np.asarray(KMEANS2(x, mask, num_iters=1))
    want = kmeans2_twin(x, mask, num_iters=1)
    assert sum((got[i] == want[i]).all() for i in range(B)) >= B - 1
    assert (got != np.asarray(KMEANS2(x, mask))).any()


@pytest.mark.parametrize("num_iters", [2, 3, 20])
def test_kmeans2_several_steps_per_loop_test_change_nothing(monkeypatch, num_iters):
    """Accelerators take 4 Lloyd steps per loop-exit test; the result must equal one step per
    test, including when num_iters is no multiple of 4 (steps past it must be no-ops)."""
    x, _, mask = _modality_data(np.random.default_rng(18), sep=0.5)
    # A fresh function per call: jit would otherwise reuse the trace made before the patch.
    solve = lambda n: np.asarray(jax.jit(lambda a, m: kernels.kmeans2(a, m, n))(x, mask))
    one = solve(num_iters)
    if num_iters < 20:  # the data must be able to tell extra steps apart
        assert (one != solve(20)).any()
    monkeypatch.setattr(kmeans, "_steps_per_check", lambda: 4)
    four = solve(num_iters)
    np.testing.assert_array_equal(four, one)


@pytest.mark.parametrize("before,share", [(2, 2), (3, 4), (2, 1000)])
def test_kmeans2_compacted_stragglers_change_nothing(monkeypatch, before, share):
    """On CPU the restarts still moving after a few steps finish on their own (or all go on
    together when too many move): the same partitions as one loop over every restart."""
    x, _, mask = _modality_data(np.random.default_rng(20), sep=0.5)
    solve = lambda: np.asarray(jax.jit(kernels.kmeans2)(x, mask))
    monkeypatch.setattr(kmeans, "_CPU_STEPS_BEFORE_COMPACTING", 100)
    plain = solve()
    monkeypatch.setattr(kmeans, "_CPU_STEPS_BEFORE_COMPACTING", before)
    monkeypatch.setattr(kmeans, "_CPU_COMPACT_SHARE", share)
    np.testing.assert_array_equal(solve(), plain)


def test_kmeans2_accelerator_formulation_agrees(monkeypatch):
    """Off CPU the Gram matrices are one batched matmul and each Lloyd step a batched matmul,
    4 steps per loop test; the partitions must be those of the CPU formulation."""
    x, _, mask = _modality_data(np.random.default_rng(19), sep=0.5)
    solve = lambda: np.asarray(jax.jit(kernels.kmeans2)(x, mask))
    cpu = solve()
    monkeypatch.setattr(kmeans, "_on_cpu", lambda: False)
    other = solve()
    # Summation order differs, so an exact near-tie may go the other way.
    assert sum((cpu[i] == other[i]).all() for i in range(B)) >= B - 1


def test_kmeans2_padding_garbage_and_batch_neighbours_do_not_matter():
    rng = np.random.default_rng(11)
    x, _, mask = _modality_data(rng, sep=1.0)
    full = np.asarray(KMEANS2(x, mask))
    other = np.where(mask[..., None], x, rng.normal(size=x.shape).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(KMEANS2(other, mask)), full)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(kernels.kmeans2)(x[5:9], mask[5:9])), full[5:9]
    )


def test_kmeans2_nmi_separated_is_exactly_one_like_sklearn():
    x, labels, mask = _modality_data(np.random.default_rng(12), sep=8.0)
    got = np.asarray(KMEANS2_NMI(x, labels, mask))
    assert got.shape == (B,) and got.dtype == np.float32
    np.testing.assert_array_equal(got, 1.0)
    np.testing.assert_array_equal(_sklearn_nmi(x, labels, mask), 1.0)


@pytest.mark.parametrize("sep", [0.0, 0.8])
def test_kmeans2_nmi_overlapping_close_to_sklearn(sep):
    x, labels, mask = _modality_data(np.random.default_rng(13), sep=sep)
    got = np.asarray(KMEANS2_NMI(x, labels, mask))
    want = _sklearn_nmi(x, labels, mask)
    assert abs(got.mean() - want.mean()) <= 0.05, (got.mean(), want.mean())


def test_kmeans2_collapsed_modalities_give_zero_nmi():
    # Fully fused: every text and region token of a sample is the same vector. All distances
    # tie, so k-means puts every token in cluster 0 and the clusters say nothing of modality.
    rng = np.random.default_rng(14)
    garbage, labels, mask = _modality_data(rng, sep=0.0)
    points = (rng.normal(size=(B, 1, D)) * 30 + 0.1).astype(np.float32)
    x = np.where(mask[..., None], points, garbage)
    np.testing.assert_array_equal(np.asarray(KMEANS2(x, mask))[mask], 0)
    np.testing.assert_array_equal(np.asarray(KMEANS2_NMI(x, labels, mask)), 0.0)
    np.testing.assert_array_equal(_sklearn_nmi(x[:4], labels[:4], mask[:4]), 0.0)


def test_kmeans2_nmi_over_layers_and_vmap():
    x, labels, mask = _modality_data(np.random.default_rng(15), sep=1.0)
    separated, _, _ = _modality_data(np.random.default_rng(15), sep=8.0)
    layers = np.stack([separated, x])  # [L, B, N, D]
    got = np.asarray(jax.jit(kernels.over_layers(kernels.kmeans2_nmi))(layers, labels, mask))
    assert got.shape == (2, B)
    per_layer = np.stack([np.asarray(KMEANS2_NMI(layer, labels, mask)) for layer in layers])
    # Same partitions; the NMI arithmetic may fuse differently in each program.
    np.testing.assert_allclose(got, per_layer, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[0], 1.0)
    vmapped = jax.jit(jax.vmap(kernels.kmeans2_nmi, in_axes=(0, None, None)))
    np.testing.assert_allclose(np.asarray(vmapped(layers, labels, mask)), got, rtol=0, atol=1e-6)


def test_over_layers_rejects_unbatched_shared_argument():
    attn = np.zeros((2, 3, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="batch axis"):
        kernels.over_layers(kernels.block_mean)(attn, np.ones((5, 4), bool), np.ones((3, 4), bool))
