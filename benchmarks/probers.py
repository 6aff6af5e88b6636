"""JAX linear probers for all layers (one `fit_linear` call) vs scikit-learn
LogisticRegression layer by layer.

Default size is that of VALUE's pair probes: 12 layers × 10,000 pairs × 1,536 features (two
768-d embeddings side by side), 8 classes (VCC). Data are synthetic: per layer, class means in a
32-d subspace whose strength rises then falls with depth (as probing curves do), embedded in
correlated (shared low-rank) noise, with anisotropic scales, a few large-scale outlier dimensions
and a non-zero mean (as BERT-like hidden states have). Both sides see the same splits and the
same train-standardised features and minimise the same objective (`l2 = 1 / (C N_train)`); JAX
adds early stopping on dev accuracy. JAX is timed end to end (host arrays in, test accuracy
out), once with compilation and once compiled.

  python benchmarks/probers.py                      # full size, sklearn on every 2nd layer
  python benchmarks/probers.py --sk_every=1         # sklearn on all 12 layers (~6 min, 2 cores)
  python benchmarks/probers.py --optimizer=adam --pairs=4000 --features=768
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from value_jax.probes import classifiers, probing

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 12, "Probes trained together (one per layer).")
flags.DEFINE_integer("pairs", 10_000, "Examples per layer (split 80/10/10).")
flags.DEFINE_integer("features", 1536, "Features per example.")
flags.DEFINE_integer("classes", 8, "Number of classes.")
flags.DEFINE_float("l2", 1e-2, "JAX l2; scikit-learn gets C = 1 / (l2 * N_train).")
flags.DEFINE_enum("optimizer", "lbfgs", ["adam", "lbfgs"], "JAX optimizer.")
flags.DEFINE_float("learning_rate", 0.1, "Adam learning rate (unused by lbfgs).")
flags.DEFINE_integer("max_epochs", 300, "JAX max epochs (full-batch steps).")
flags.DEFINE_integer("patience", 20, "JAX early-stopping patience (epochs).")
flags.DEFINE_integer("sk_max_iter", 1000, "scikit-learn lbfgs max_iter.")
flags.DEFINE_integer(
    "sk_every",
    2,
    "Fit scikit-learn on every k-th layer and scale its time "
    "up to all layers (1 = all; 2 keeps the default run under ~5 minutes on "
    "2 cores).",
)
flags.DEFINE_integer("seed", 0, "Seed for data, split and probes.")


def make_data(layers, n, f, classes, seed):
    """`x [layers, n, f]` float32 and `y [n]`: class signal strength peaks at mid depth."""
    rng = np.random.default_rng(seed)
    prior = rng.dirichlet(np.full(classes, 5.0))
    y = rng.choice(classes, size=n, p=prior)
    basis = np.linalg.qr(rng.normal(size=(f, 32)))[0].T  # [32, f]
    scale = np.exp(rng.normal(size=f) * 0.5)
    scale[rng.choice(f, 8, replace=False)] *= 20.0
    x = np.empty((layers, n, f), np.float32)
    for layer in range(layers):
        depth = layer / max(layers - 1, 1)
        strength = 0.2 + 0.2 * np.sin(np.pi * depth)
        centres = rng.normal(size=(classes, 32)) * strength
        # Shared low-rank noise makes features correlated, so a fitted classifier beats the
        # class-mean direction (as with real hidden states).
        mixing = rng.normal(size=(64, f)) * 0.5
        noise = rng.normal(size=(n, f)) + rng.normal(size=(n, 64)) @ mixing
        x[layer] = ((centres[y] @ basis) + noise) * scale + 3.0
    return x, y


def main(argv):
    del argv
    x, y = make_data(FLAGS.layers, FLAGS.pairs, FLAGS.features, FLAGS.classes, FLAGS.seed)
    train, dev, test = probing.split_indices(FLAGS.pairs, FLAGS.seed)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"data: {FLAGS.layers} layers x {FLAGS.pairs} pairs x {FLAGS.features} features, "
        f"{FLAGS.classes} classes; split {len(train)}/{len(dev)}/{len(test)}"
    )

    classes, key = FLAGS.classes, jax.random.PRNGKey(FLAGS.seed)
    fit = dict(
        l2=FLAGS.l2,
        learning_rate=FLAGS.learning_rate,
        max_epochs=FLAGS.max_epochs,
        patience=FLAGS.patience,
        optimizer=FLAGS.optimizer,
    )

    def run_jax():
        start = time.perf_counter()
        probe = classifiers.fit_linear(
            x[:, train], y[train], x[:, dev], y[dev], classes, key, **fit
        )
        acc = np.asarray(classifiers.evaluate(probe, x[:, test], y[test]))
        return time.perf_counter() - start, probe, acc

    jax_first, _, _ = run_jax()  # includes compilation
    jax_time, probe, jax_acc = run_jax()

    sk_layers = range(0, FLAGS.layers, FLAGS.sk_every)
    sk_acc, sk_iters = np.full(FLAGS.layers, np.nan), []
    start = time.perf_counter()
    for layer in sk_layers:
        scaler = StandardScaler().fit(x[layer, train])
        model = LogisticRegression(C=1.0 / (FLAGS.l2 * len(train)), max_iter=FLAGS.sk_max_iter)
        model.fit(scaler.transform(x[layer, train]), y[train])
        sk_acc[layer] = model.score(scaler.transform(x[layer, test]), y[test])
        sk_iters.append(int(model.n_iter_[0]))
    sk_time = (time.perf_counter() - start) * FLAGS.layers / len(sk_layers)

    print(
        f"jax ({FLAGS.optimizer}, {FLAGS.layers} probes in one call): {jax_time:.2f} s "
        f"(first call with compilation {jax_first:.2f} s); epochs run "
        f"{np.asarray(probe.record.epochs_run).tolist()}"
    )
    scaled = (
        ""
        if FLAGS.sk_every == 1
        else (f", scaled up from layers {[layer + 1 for layer in sk_layers]}")
    )
    print(f"scikit-learn (lbfgs, sequential): {sk_time:.2f} s{scaled}; iterations {sk_iters}")
    print(f"speed-up: {sk_time / jax_time:.1f}x (vs first call {sk_time / jax_first:.1f}x)")
    print("layer  jax_test_acc  sklearn_test_acc  diff_points")
    for layer in sk_layers:
        diff = 100 * (jax_acc[layer] - sk_acc[layer])
        print(f"{layer + 1:5d}  {jax_acc[layer]:12.4f}  {sk_acc[layer]:16.4f}  {diff:+11.2f}")
    diffs = np.abs(100 * (jax_acc - sk_acc))
    print(f"max |diff|: {np.nanmax(diffs):.2f} points; mean |diff|: {np.nanmean(diffs):.2f} points")


if __name__ == "__main__":
    app.run(main)
