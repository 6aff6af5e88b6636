"""Planted-structure tests of the probers: value_jax.probes.classifiers (Eq. 3 / 4 fits) and
value_jax.probes.probing (splits, control tasks, train_prober)."""

import json

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from value_jax.probes import classifiers as C
from value_jax.probes import probing

KEY = jax.random.PRNGKey(0)
# Tests (a), (d) and (g) share these sizes so that L-BFGS (slow to compile) compiles twice, not 5x.
N, F, K = 5000, 40, 4


def _split(n, seed=0):
    return probing.split_indices(n, seed)


def _linear_accuracy_twin(probe, x, y):
    """Slow numpy twin of `evaluate`: explicit loops over probes and samples."""
    w, b = (np.asarray(a, np.float64) for a in (probe.weights["w"], probe.weights["b"]))
    mean, std = np.asarray(probe.mean, np.float64), np.asarray(probe.std, np.float64)
    y = np.broadcast_to(y, x.shape[:2])
    acc = []
    for p in range(x.shape[0]):
        hits = [
            np.argmax(((x[p, i] - mean[p]) / std[p]) @ w[p] + b[p]) == y[p, i]
            for i in range(x.shape[1])
        ]
        acc.append(np.mean(hits))
    return np.array(acc)


def _bilinear_accuracy_twin(probe, e_i, e_j, y):
    wt = {k: np.asarray(v, np.float64) for k, v in probe.weights.items()}
    y = np.broadcast_to(y, e_i.shape[:2])
    acc = []
    for p in range(e_i.shape[0]):
        hits = []
        for n in range(e_i.shape[1]):
            a = (e_i[p, n] - np.asarray(probe.mean_i[p])) / np.asarray(probe.std_i[p])
            c = (e_j[p, n] - np.asarray(probe.mean_j[p])) / np.asarray(probe.std_j[p])
            scores = [
                wt["w_cls"][p][:, k] @ ((a @ wt["w_i"][p]) * (c @ wt["w_j"][p])) + wt["b"][p][k]
                for k in range(wt["b"].shape[1])
            ]
            hits.append(np.argmax(scores) == y[p, n])
        acc.append(np.mean(hits))
    return np.array(acc)


def test_planted_separable_probe_among_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, N, F)).astype(np.float32)
    y = np.argmax(x[2] @ rng.normal(size=(F, K)), axis=1)  # separable in probe 2 only
    tr, dv, te = _split(N)
    probe = C.fit_linear(x[:, tr], y[tr], x[:, dv], y[dv], K, KEY)
    acc = np.asarray(C.evaluate(probe, x[:, te], y[te]))
    assert acc[2] >= 0.95, acc
    for p in (0, 1):
        assert abs(acc[p] - np.bincount(y[te]).max() / len(te)) < 0.08, acc
    np.testing.assert_allclose(acc, _linear_accuracy_twin(probe, x[:, te], y[te]), atol=1e-6)
    w, b = probe.input_space_weights()  # same classifier on raw features
    raw = np.argmax(np.einsum("pnf,pfc->pnc", x[:, te], np.asarray(w)) + np.asarray(b)[:, None], -1)
    np.testing.assert_allclose((raw == y[te]).mean(axis=1), acc, atol=2 / len(te))


def test_attention_pair_features_is_eq3_layout():
    a_ij = np.arange(24.0).reshape(2, 4, 3)  # [items, layers, heads]
    a_ji = -np.arange(24.0).reshape(2, 4, 3) - 100
    feats = np.asarray(C.attention_pair_features(a_ij, a_ji))
    assert feats.shape == (2, 24)
    for layer in range(4):  # layer-major: [α_ij H | α_ji H] per layer
        np.testing.assert_array_equal(feats[:, 6 * layer : 6 * layer + 3], a_ij[:, layer])
        np.testing.assert_array_equal(feats[:, 6 * layer + 3 : 6 * layer + 6], a_ji[:, layer])
    # eq3_weights reads the same layout back: weights equal to the features give α itself.
    w_ij, w_ji = C.eq3_weights(feats[None, 0, :, None], num_layers=4)
    np.testing.assert_array_equal(np.asarray(w_ij)[0, ..., 0], a_ij[0])
    np.testing.assert_array_equal(np.asarray(w_ji)[0, ..., 0], a_ji[0])
    with pytest.raises(ValueError, match="same shape"):
        C.attention_pair_features(a_ij, a_ji[..., :2])
    with pytest.raises(ValueError, match="layers"):
        C.eq3_weights(feats[None, 0, :, None], num_layers=5)


def test_planted_eq3_prober_weights_name_the_planted_head():
    """A label carried by one head's α_ji only: the fitted input-space weights, read through
    eq3_weights, are largest at that head and direction."""
    rng = np.random.default_rng(3)
    n, layers, heads = 3000, 3, 4
    a_ij, a_ji = rng.random((2, n, layers, heads)).astype(np.float32) * 0.1
    y = rng.integers(0, 2, n)
    a_ji[:, 2, 1] += 0.5 * y  # layer 3, head 2, direction j→i
    x = np.asarray(C.attention_pair_features(a_ij, a_ji))[None]
    tr, dv, te = _split(n)
    probe = C.fit_linear(x[:, tr], y[tr], x[:, dv], y[dv], 2, KEY)
    assert float(np.asarray(C.evaluate(probe, x[:, te], y[te]))[0]) > 0.95
    w, _ = probe.input_space_weights()
    w_ij, w_ji = (np.asarray(v)[0] for v in C.eq3_weights(w, layers))  # [L, H, C]
    margin_ij, margin_ji = (np.abs(v[..., 1] - v[..., 0]) for v in (w_ij, w_ji))
    assert np.unravel_index(np.argmax(margin_ji), margin_ji.shape) == (2, 1)
    assert margin_ji[2, 1] > 5 * max(margin_ij.max(), np.sort(margin_ji, axis=None)[-2])


def test_bilinear_recovers_planted_rule_and_shuffled_stays_at_chance():
    rng = np.random.default_rng(1)
    n, d = 6000, 8
    e_i, e_j = rng.normal(size=(2, n, d)).astype(np.float32)
    a, b = rng.normal(size=(2, d, d))
    y = (np.sum((e_i @ a.T) * (e_j @ b.T), axis=1) > 0).astype(np.int32)
    y_shuffled = rng.permutation(y)
    labels = np.stack([y, y_shuffled])  # probe 0: planted rule; probe 1: shuffled labels
    e_i2, e_j2 = np.stack([e_i, e_i]), np.stack([e_j, e_j])
    tr, dv, te = _split(n)
    probe = C.fit_bilinear(
        e_i2[:, tr],
        e_j2[:, tr],
        labels[:, tr],
        e_i2[:, dv],
        e_j2[:, dv],
        labels[:, dv],
        2,
        KEY,
        learning_rate=3e-3,
        max_epochs=40,
        patience=8,
        batch_size=128,
    )
    acc = np.asarray(C.evaluate_bilinear(probe, e_i2[:, te], e_j2[:, te], labels[:, te]))
    assert acc[0] >= 0.85, acc
    assert abs(acc[1] - 0.5) < 0.07, acc
    twin = _bilinear_accuracy_twin(probe, e_i2[:, te[:200]], e_j2[:, te[:200]], labels[:, te[:200]])
    np.testing.assert_allclose(
        C.evaluate_bilinear(probe, e_i2[:, te[:200]], e_j2[:, te[:200]], labels[:, te[:200]]),
        twin,
        atol=1e-6,
    )
    # The rule is invisible to a linear prober on [e_i, e_j]: it is the product that carries it.
    pairs = np.concatenate([e_i, e_j], axis=1)[None]
    linear = C.fit_linear(pairs[:, tr], y[tr], pairs[:, dv], y[dv], 2, KEY, optimizer="adam")
    assert abs(float(C.evaluate(linear, pairs[:, te], y[te])[0]) - 0.5) < 0.07


def test_early_stopping_restores_best_dev_params():
    # The first Adam step weights every standardised feature alike; dev accuracy is then high
    # from 20 weak features, and falls as training loads the strong feature x0, whose sign is
    # flipped on dev.
    rng = np.random.default_rng(2)

    def sample(n, flip):
        s = rng.integers(0, 2, n) * 2 - 1
        x = np.concatenate(
            [(-s if flip else s)[:, None] * 3.0, 0.3 * s[:, None] * np.ones((1, 20))], axis=1
        ) + rng.normal(size=(n, 21))
        return x[None].astype(np.float32), (s > 0).astype(np.int32)

    x_tr, y_tr = sample(2000, flip=False)
    x_dv, y_dv = sample(1000, flip=True)
    max_epochs, patience = 300, 15
    probe = C.fit_linear(
        x_tr, y_tr, x_dv, y_dv, 2, KEY, optimizer="adam", max_epochs=max_epochs, patience=patience
    )
    rec = jax.tree.map(np.asarray, probe.record)
    history = rec.dev_acc_history[0]
    seen = history[~np.isnan(history)]
    best, run = int(rec.best_epoch[0]), int(rec.epochs_run[0])
    assert run == best + patience + 1 < max_epochs  # stopped by patience, not by max_epochs
    assert np.all(np.isnan(history[run:]))
    assert seen[-1] < seen.max() - 0.05  # dev accuracy really fell after the peak
    assert history[best] == seen.max() == rec.best_dev_acc[0]
    assert float(C.evaluate(probe, x_dv, y_dv)[0]) == pytest.approx(seen.max(), abs=1e-6)


def _lockstep(monkeypatch):
    """Makes `classifiers` train its probes together, as it does on an accelerator."""
    monkeypatch.setattr(C.jax, "default_backend", lambda: "gpu")


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_vmapped_probes_equal_probes_trained_alone(optimizer, monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, N, F)).astype(np.float32)
    y = np.stack(
        [
            np.argmax(x[p] @ rng.normal(size=(F, K)) + 2 * rng.normal(size=(N, K)), axis=1)
            for p in range(3)
        ]
    )  # a different noisy task per probe
    tr, dv, te = _split(N)
    with monkeypatch.context() as m:
        _lockstep(m)
        together = C.fit_linear(x[:, tr], y[:, tr], x[:, dv], y[:, dv], K, KEY, optimizer=optimizer)
    acc = np.asarray(C.evaluate(together, x[:, te], y[:, te]))
    for p in range(3):
        alone = C.fit_linear(
            x[p : p + 1, tr],
            y[p : p + 1, tr],
            x[p : p + 1, dv],
            y[p : p + 1, dv],
            K,
            KEY,
            optimizer=optimizer,
        )
        assert int(alone.record.best_epoch[0]) == int(together.record.best_epoch[p])
        np.testing.assert_allclose(alone.weights["w"][0], together.weights["w"][p], atol=1e-4)
        np.testing.assert_allclose(alone.weights["b"][0], together.weights["b"][p], atol=1e-4)
        assert float(C.evaluate(alone, x[p : p + 1, te], y[p, te])[0]) == pytest.approx(acc[p])


def test_bilinear_probes_one_at_a_time_equal_lockstep(monkeypatch):
    # Three layers whose probes stop at different epochs: on CPU each is trained alone (no
    # steps after it stopped); in lockstep (accelerators) all run until the last one stops.
    rng = np.random.default_rng(5)
    n, d = 1200, 6
    e_i, e_j = rng.normal(size=(2, 3, n, d)).astype(np.float32)
    a = rng.normal(size=(d, d))
    y = (np.einsum("nd,de,ne->n", e_i[0], a, e_j[0]) > 0).astype(np.int32)
    tr, dv, _ = _split(n)
    args = (e_i[:, tr], e_j[:, tr], y[tr], e_i[:, dv], e_j[:, dv], y[dv], 2, KEY)
    kw = dict(learning_rate=3e-3, max_epochs=30, patience=3, batch_size=100)
    alone = C.fit_bilinear(*args, **kw)
    with monkeypatch.context() as m:
        _lockstep(m)
        together = C.fit_bilinear(*args, **kw)
    runs = np.asarray(alone.record.epochs_run)
    assert len(set(runs.tolist())) > 1, runs  # the probes really stop at different epochs
    for field in ("best_epoch", "epochs_run", "best_dev_acc"):
        np.testing.assert_array_equal(
            getattr(alone.record, field), getattr(together.record, field), err_msg=field
        )
    for k in alone.weights:
        np.testing.assert_allclose(alone.weights[k], together.weights[k], atol=1e-4, err_msg=k)


@pytest.mark.parametrize("epoch_items, steps", [(64, 1), (256, 4), (None, 16)])
def test_bilinear_epoch_is_capped_at_epoch_items(epoch_items, steps):
    # Labels 85% class 1: every minibatch pushes the (zero-initialised) bias the same way, and
    # Adam moves it by ~learning_rate per step. One epoch kept (max_epochs=1) then shows the
    # steps an epoch took: 1024 train items in batches of 64 are 16 steps, fewer when capped.
    rng = np.random.default_rng(6)
    n, d, lr = 1024, 4, 1e-3
    e_i, e_j = rng.normal(size=(2, 1, n, d)).astype(np.float32)
    y = (rng.random(n) < 0.85).astype(np.int32)
    probe = C.fit_bilinear(
        e_i, e_j, y, e_i[:, :200], e_j[:, :200], y[:200], 2, KEY,
        learning_rate=lr, max_epochs=1, batch_size=64, epoch_items=epoch_items,
    )  # fmt: skip
    moved = float(np.max(np.abs(np.asarray(probe.weights["b"]))))
    assert moved == pytest.approx(steps * lr, rel=0.1), (moved, steps * lr)


def test_capped_epochs_walk_one_permutation():
    # 512 train items, epoch_items=128: four capped epochs take the four quarters of the
    # permutation one uncapped epoch would use, then the next four those of the next epoch's,
    # so after 8 capped epochs the weights are those of 2 uncapped ones. A planted rule and a
    # small step make every epoch the best so far.
    rng = np.random.default_rng(8)
    n, d = 512, 4
    e_i, e_j = rng.normal(size=(2, 1, n + 200, d)).astype(np.float32)
    y = (np.sum(e_i[0] * e_j[0], axis=1) > 0).astype(np.int32)
    args = (e_i[:, :n], e_j[:, :n], y[:n], e_i[:, n:], e_j[:, n:], y[n:], 2, KEY)
    kw = dict(learning_rate=1e-3, batch_size=32, patience=10)
    for passes in (1, 2):
        capped = C.fit_bilinear(*args, max_epochs=4 * passes, epoch_items=128, **kw)
        whole = C.fit_bilinear(*args, max_epochs=passes, epoch_items=None, **kw)
        assert int(capped.record.best_epoch[0]) == 4 * passes - 1  # else nothing is compared
        assert int(whole.record.best_epoch[0]) == passes - 1
        for k in whole.weights:
            np.testing.assert_allclose(capped.weights[k], whole.weights[k], atol=1e-6, err_msg=k)


def test_bilinear_early_stopping_scores_a_dev_subset():
    # 500 dev items, stopping_dev_items=7: every dev accuracy in the history is k/7; the
    # whole dev set (None) gives accuracies that are not.
    rng = np.random.default_rng(7)
    n, d = 600, 4
    e_i, e_j = rng.normal(size=(2, 1, n, d)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int32)
    kw = dict(max_epochs=4, patience=10, batch_size=50)
    args = (e_i[:, :100], e_j[:, :100], y[:100], e_i[:, 100:], e_j[:, 100:], y[100:], 2, KEY)
    history = [
        np.asarray(C.fit_bilinear(*args, stopping_dev_items=m, **kw).record.dev_acc_history)[0]
        for m in (7, None)
    ]
    np.testing.assert_allclose(history[0] * 7, np.round(history[0] * 7), atol=1e-5)
    assert not np.allclose(history[1] * 7, np.round(history[1] * 7), atol=1e-5)


@pytest.mark.parametrize(
    "layer, epoch_items, stream_rows", [(1, 800, 128), (None, 800, 300), (1, None, 300)]
)
def test_streamed_bilinear_fit_trains_as_the_in_memory_one(
    layer, epoch_items, stream_rows, monkeypatch
):
    # Rows read on demand from a collected [N, L, D] (or [N, D]) array, `stream_rows` at a
    # time (1 or 3 minibatches of 100 per read) for the training, the statistics and the
    # scores: capped epochs walking 3 passes of the permutation or whole passes, a dev subset
    # for early stopping. Same epochs, dev history, weights and scores as the in-memory fit,
    # up to the float rounding of the standardisation statistics (float64 chunks there).
    monkeypatch.setattr(C, "STREAM_ROWS", stream_rows)
    rng = np.random.default_rng(5)
    n, d = 3000, 6
    scale = np.array([1.0, 3.0])[:, None]  # layers of different spread, off-centre
    e_i, e_j = (rng.normal(size=(2, n, 2, d)) * scale + 5.0).astype(np.float32)
    a = rng.normal(size=(d, d))
    y = (np.einsum("nd,de,ne->n", e_i[:, 1] - 5, a, e_j[:, 1] - 5) > 0).astype(np.int32)
    if layer is None:
        e_i, e_j = e_i[:, 1], e_j[:, 1]
    tr, dv, te = _split(n)
    kw = dict(
        learning_rate=3e-3 if epoch_items else 1e-2,  # whole passes: stop by patience too
        max_epochs=40, patience=4, batch_size=100, epoch_items=epoch_items, stopping_dev_items=250,
    )  # fmt: skip
    at = lambda e, idx: (e[idx] if layer is None else e[idx, layer])[None]
    mem = C.fit_bilinear(
        at(e_i, tr), at(e_j, tr), y[tr], at(e_i, dv), at(e_j, dv), y[dv], 2, KEY, **kw
    )
    rows = lambda e, idx: C.CollectedRows(e, idx, layer)
    st = C.fit_bilinear(
        rows(e_i, tr), rows(e_j, tr), y[tr], rows(e_i, dv), rows(e_j, dv), y[dv], 2, KEY, **kw
    )
    assert 4 < int(mem.record.epochs_run[0]) < kw["max_epochs"]  # stopped by patience
    for field in ("best_epoch", "epochs_run"):
        np.testing.assert_array_equal(getattr(st.record, field), getattr(mem.record, field))
    np.testing.assert_allclose(st.record.dev_acc_history, mem.record.dev_acc_history, atol=1e-6)
    for k in ("mean_i", "std_i", "mean_j", "std_j"):
        # One float32 ulp apart here; the in-memory sum order is the CPU's (XLA).
        np.testing.assert_allclose(getattr(st, k), getattr(mem, k), rtol=1e-5, err_msg=k)
    for k in mem.weights:
        np.testing.assert_allclose(st.weights[k], mem.weights[k], atol=1e-4, err_msg=k)
    acc_mem = float(C.evaluate_bilinear(mem, at(e_i, te), at(e_j, te), y[te])[0])
    acc_st = float(C.evaluate_bilinear(st, rows(e_i, te), rows(e_j, te), y[te])[0])
    assert acc_mem > 0.8 and acc_st == pytest.approx(acc_mem, abs=1.5 / len(te))
    # Sides whose rows lie in other orders on disk (e_j stored shuffled) pair up the same.
    stored = rng.permutation(len(e_j))
    shuffled = C.CollectedRows(e_j[stored], np.argsort(stored)[te], layer)
    assert float(C.evaluate_bilinear(st, rows(e_i, te), shuffled, y[te])[0]) == acc_st
    # The same probe scored in chunks or in memory: the same count of correct items.
    assert float(C.evaluate_bilinear(mem, rows(e_i, te), rows(e_j, te), y[te])[0]) == pytest.approx(
        acc_mem, abs=1e-7
    )


def test_collected_rows_read_what_they_index():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 3, 4)).astype(np.float32)
    rows = C.CollectedRows(base, [7, 3, 3, 40, 0], 2)
    assert rows.shape == (1, 5, 4) and len(rows) == 5
    np.testing.assert_array_equal(rows.take([4, 0, 2]), base[[0, 7, 3], 2])
    np.testing.assert_array_equal(rows.subset([3, 1]).take([0, 1]), base[[40, 3], 2])
    got, order = rows.read([4, 0, 2])  # in row order: rows 0, 3, 7
    np.testing.assert_array_equal(got, base[[0, 3, 7], 2])
    np.testing.assert_array_equal(got, rows.take([4, 0, 2])[order])
    seen = []
    for positions, x in rows.chunks(2):
        np.testing.assert_array_equal(x, base[np.asarray([7, 3, 3, 40, 0])[positions], 2])
        seen += positions.tolist()
    assert sorted(seen) == [0, 1, 2, 3, 4]
    # Into a reused buffer: the same rows, in the buffer's first rows, each chunk overwriting
    # the one before.
    buffer = C._read_buffers([rows], 3)[0]
    got_b, order_b = rows.read([4, 0, 2], buffer)
    assert np.shares_memory(got_b, buffer) and got_b.ctypes.data % 64 == 0
    np.testing.assert_array_equal(got_b, got)
    np.testing.assert_array_equal(order_b, order)
    for positions, x in rows.chunks(2, buffer):
        assert np.shares_memory(x, buffer)
        np.testing.assert_array_equal(x, base[np.asarray([7, 3, 3, 40, 0])[positions], 2])
    with pytest.raises(ValueError, match="holds 2 rows, 3 asked"):
        rows.read([4, 0, 2], buffer[:2])
    with pytest.raises(ValueError, match="float32"):
        rows.read([4, 0, 2], buffer.astype(np.float64))
    with pytest.raises(ValueError, match="layer"):
        C.CollectedRows(base, [0], None)


def test_control_labels_one_label_per_type_and_marginals():
    rng = np.random.default_rng(4)
    labels = rng.choice(4, size=20000, p=[0.55, 0.25, 0.15, 0.05])
    types = rng.integers(0, 400, size=20000)
    control = probing.control_labels(types, labels, 4, np.random.default_rng(7))
    assert control.shape == labels.shape
    for t in np.unique(types):
        assert np.unique(control[types == t]).size == 1
    per_type = np.array([control[types == t][0] for t in np.unique(types)])
    np.testing.assert_allclose(
        np.bincount(per_type, minlength=4) / per_type.size, [0.55, 0.25, 0.15, 0.05], atol=0.07
    )
    np.testing.assert_array_equal(
        control, probing.control_labels(types, labels, 4, np.random.default_rng(7))
    )
    assert np.any(control != probing.control_labels(types, labels, 4, np.random.default_rng(8)))
    np.testing.assert_allclose(probing.selectivity([0.9, 0.5], [0.6, 0.5]), [0.3, 0.0])
    with pytest.raises(ValueError, match="num_classes|\\[0, 4\\)"):
        probing.control_labels(types[:3], np.array([0, 1, 4]), 4, np.random.default_rng(0))


def test_split_indices_partition_seed_and_groups():
    parts = probing.split_indices(1000, seed=5)
    assert [len(p) for p in parts] == [800, 100, 100]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    again = probing.split_indices(1000, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[1], probing.split_indices(1000, seed=6)[1])

    groups = np.random.default_rng(0).integers(0, 150, size=3000)  # e.g. image ids
    parts = probing.split_indices(3000, seed=5, groups=groups)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(3000))
    owners = [set(groups[p]) for p in parts]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    np.testing.assert_allclose([len(p) / 3000 for p in parts], [0.8, 0.1, 0.1], atol=0.03)
    # Five equal images: the middle-sample rule alone leaves dev empty; no split may be.
    few = np.repeat(np.arange(5), 24)
    for seed in range(5):
        parts = probing.split_indices(len(few), seed=seed, groups=few)
        owners = [set(few[p]) for p in parts]
        assert [len(o) for o in owners] == [3, 1, 1], (seed, owners)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(few)))
    with pytest.raises(ValueError, match="summing to 1"):
        probing.split_indices(10, 0, fractions=(0.5, 0.2))


# Early-stopped Adam ends less converged than L-BFGS: up to ~2.5 points off across seeds.
@pytest.mark.parametrize("optimizer,tolerance", [("lbfgs", 0.02), ("adam", 0.03)])
def test_linear_prober_matches_sklearn(optimizer, tolerance):
    rng = np.random.default_rng(6)
    y = rng.integers(0, K, N)
    # Correlated noise: the fitted optimum beats the class-mean direction, so matching
    # scikit-learn needs a converged fit, not just a first step.
    noise = rng.normal(size=(N, F)) + rng.normal(size=(N, 8)) @ rng.normal(size=(8, F))
    x = ((rng.normal(size=(K, F)) * 0.3)[y] + noise) * np.exp(rng.normal(size=F))
    tr, dv, te = _split(N)
    l2 = 1e-2
    probe = C.fit_linear(x[None, tr], y[tr], x[None, dv], y[dv], K, KEY, l2=l2, optimizer=optimizer)
    ours = float(C.evaluate(probe, x[None, te], y[te])[0])
    scaler = StandardScaler().fit(x[tr])
    ref = LogisticRegression(C=1 / (l2 * len(tr)), max_iter=1000).fit(
        scaler.transform(x[tr]), y[tr]
    )
    theirs = ref.score(scaler.transform(x[te]), y[te])
    assert 0.5 < theirs < 0.95  # moderately hard
    assert abs(ours - theirs) <= tolerance, (ours, theirs)


def test_run_probe_end_to_end_with_control_task():
    rng = np.random.default_rng(7)
    n, num_types = 2400, 60
    types = rng.integers(0, num_types, n)
    signal = rng.normal(size=n)
    labels = (signal > 0).astype(np.int32)
    one_hot = np.eye(num_types)[types]
    # Layer 0 sees the signal (and the types); layer 1 sees only the types.
    feats = np.stack(
        [
            np.concatenate([signal[:, None], one_hot], 1),
            np.concatenate([rng.normal(size=(n, 1)), one_hot], 1),
        ]
    )
    images = rng.integers(0, 300, n)
    result = probing.train_prober(
        feats, labels, seed=3, groups=images, control_type_ids=types, names=["layer 1", "layer 12"]
    )
    assert result.names == ["layer 1", "layer 12"]
    assert result.num_train + result.num_dev + result.num_test == n
    assert result.test_acc[0] > 0.9 and abs(result.test_acc[1] - 0.5) < 0.12
    assert min(result.control_test_acc) > 0.85  # types memorised from the one-hot features
    np.testing.assert_allclose(
        result.selectivity, np.subtract(result.test_acc, result.control_test_acc)
    )
    assert json.loads(json.dumps(result.to_dict()))["names"] == ["layer 1", "layer 12"]
    pairs = probing.train_prober((feats[0, :, :4], feats[0, :, 4:8]), labels, seed=3, max_epochs=2)
    assert len(pairs.test_acc) == 1 and pairs.control_test_acc is None


def test_errors_name_the_argument():
    x = np.zeros((2, 10, 3), np.float32)
    with pytest.raises(ValueError, match="x_train must be \\[P, N, F\\]"):
        C.fit_linear(x[0], np.zeros(10, int), x, np.zeros(10, int), 2, KEY)
    with pytest.raises(ValueError, match="y_dev"):
        C.fit_linear(x, np.zeros(10, int), x, np.full(10, 5), 2, KEY)
    y = np.zeros(10, int)
    for name in ("epoch_items", "stopping_dev_items"):
        with pytest.raises(ValueError, match=f"{name} must be None"):
            C.fit_bilinear(x, x, y, x, x, y, 2, KEY, **{name: 0})
    rows = C.CollectedRows(x[0], np.arange(10))
    for fit, args in (
        (C.fit_linear, (x, y, x, y)),
        (C.fit_bilinear, (x, x, y, x, x, y)),
        (C.fit_bilinear, (rows, rows, y, rows, rows, y)),
    ):
        with pytest.raises(ValueError, match="max_epochs must be >= 1, got 0"):
            fit(*args, 2, KEY, max_epochs=0)
