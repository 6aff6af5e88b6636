"""Multimodal-fusion probe (VALUE §3.1): jitted `kernels.kmeans2_nmi` against scikit-learn.

Synthetic token representations shaped like the real use: samples × layers × (text + regions) ×
hidden size, text padded to a fixed length, a modality offset that shrinks with depth (so NMI
falls from near 1 to near 0 across layers as in the paper's Table 1), a low-rank per-sample
"content" component that competes with the modality split, isotropic noise, and a large offset
shared by all tokens (BERT-like hidden states are far from zero-mean).

JAX runs as the runner would: one jitted call per batch of samples, all layers at once
(`over_layers`), inputs already on the device (in the runner the hidden states never leave it),
timed after a warm-up as the median of a few repeats. scikit-learn runs
`KMeans(n_clusters=2, n_init=...)` + `normalized_mutual_info_score` per sample and layer, on the
first `--sk_samples` samples (all layers); its time for all samples is extrapolated from them.

    python benchmarks/kmeans_nmi.py [--samples=200 --layers=12 --sk_samples=40 ...]
"""

from __future__ import annotations

import statistics
import time
import warnings
from contextlib import nullcontext

import jax
import numpy as np
from absl import app, flags
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import normalized_mutual_info_score
from threadpoolctl import threadpool_limits

from value_jax import kernels

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 200, "Number of image-text samples.")
flags.DEFINE_integer("layers", 12, "Number of layers per sample.")
flags.DEFINE_integer("text", 20, "Padded text length (real ones drawn in [60%, 100%]).")
flags.DEFINE_integer("regions", 36, "Number of regions (all real).")
flags.DEFINE_integer("dim", 768, "Hidden size.")
flags.DEFINE_integer("rank", 8, "Rank of the per-sample content component.")
flags.DEFINE_float("sep_first", 1.6, "Modality separation at the first layer.")
flags.DEFINE_float("sep_last", 0.8, "Modality separation at the last layer.")
flags.DEFINE_integer("batch_size", 32, "Samples per jitted call (as in the runner).")
flags.DEFINE_integer("num_iters", 20, "Lloyd iterations of kernels.kmeans2.")
flags.DEFINE_integer("repeats", 3, "Timed repeats of the JAX pass (median reported).")
flags.DEFINE_integer("sk_samples", 40, "Samples (× all layers) run with sklearn.")
flags.DEFINE_string("n_init", "10", "scikit-learn KMeans n_init: an int or 'auto'.")
flags.DEFINE_bool(
    "sk_noise_floor",
    True,
    "Run sklearn a second time with other random_states, to show how "
    "much its own mean NMI moves with the seed (doubles the sklearn time).",
)
flags.DEFINE_integer(
    "sk_threads",
    0,
    "Threads for scikit-learn's OpenMP / BLAS pools; 0 = its default (all "
    "cores). On a loaded machine the default's thread barriers slow it 10-20x; 1 thread then "
    "stays near its idle-machine time (and is no slower on an idle 2-core machine).",
)
flags.DEFINE_integer("seed", 0, "numpy Generator seed for the synthetic data.")


def make_data(
    rng: np.random.Generator,
    s: int,
    l: int,
    t: int,
    r: int,
    d: int,
    k: int,
    sep_first: float,
    sep_last: float,
):
    """Returns x `[L, S, N, D]` float32, labels `[S, N]` (0 text, 1 region), mask `[S, N]`, for
    `s` samples, `l` layers, `t` text slots, `r` regions, hidden size `d` and content rank `k`."""
    n = t + r
    text_len = rng.integers(int(0.6 * t), t + 1, size=s)
    mask = np.concatenate([np.arange(t)[None] < text_len[:, None], np.ones((s, r), bool)], 1)
    labels = np.concatenate([np.zeros((s, t), np.int32), np.ones((s, r), np.int32)], 1)
    modality_dir = rng.normal(size=(s, 1, d)).astype(np.float32)
    content = rng.normal(size=(s, n, k)).astype(np.float32)  # token identity
    common = np.zeros(d, np.float32)
    common[rng.choice(d, 4, replace=False)] = 20.0  # outlier dimensions
    sep = np.linspace(sep_first, sep_last, l, dtype=np.float32)
    x = np.empty((l, s, n, d), np.float32)
    side = (labels - 0.5).astype(np.float32)[..., None]
    for layer in range(l):
        mixing = rng.normal(size=(s, k, d)).astype(np.float32) * np.sqrt(2.0 / k)
        x[layer] = (
            sep[layer] * side * modality_dir
            + np.einsum("snk,skd->snd", content, mixing)
            + rng.normal(size=(s, n, d)).astype(np.float32)
            + common
        )
    return x, labels, mask


def run_jax(x, labels, mask, bs: int, num_iters: int, repeats: int):
    """Per-batch jitted calls of `bs` samples; returns (NMI `[L, S]`, list of pass times in
    seconds)."""
    l, s, n, d = x.shape
    pad = (-s) % bs
    x = np.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    labels = np.pad(labels, ((0, pad), (0, 0)))
    mask = np.pad(mask, ((0, pad), (0, 0)))  # empty samples, dropped
    batches = [
        (
            jax.device_put(x[:, i : i + bs]),
            jax.device_put(labels[i : i + bs]),
            jax.device_put(mask[i : i + bs]),
        )
        for i in range(0, s + pad, bs)
    ]
    step = jax.jit(
        kernels.over_layers(lambda xl, lab, m: kernels.kmeans2_nmi(xl, lab, m, num_iters=num_iters))
    )

    def one_pass():
        outs = [step(*b) for b in batches]
        jax.block_until_ready(outs)
        return outs

    outs = one_pass()  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = one_pass()
        times.append(time.perf_counter() - start)
    return np.concatenate([np.asarray(o) for o in outs], axis=1)[:, :s], times


def run_sklearn(x, labels, mask, num_samples, n_init, sk_threads: int, seed_offset=0):
    """sklearn on the first `num_samples` samples; `sk_threads` 0: its default thread pools."""
    out = np.zeros((x.shape[0], num_samples))
    start = time.perf_counter()
    limits = threadpool_limits(sk_threads) if sk_threads else nullcontext()
    with warnings.catch_warnings(), limits:
        # Collapsed layers legitimately yield fewer than 2 distinct clusters.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for layer in range(x.shape[0]):
            for i in range(num_samples):
                pts, lab = x[layer, i][mask[i]], labels[i][mask[i]]
                km = KMeans(n_clusters=2, n_init=n_init, random_state=seed_offset + i)
                pred = km.fit_predict(pts)
                out[layer, i] = normalized_mutual_info_score(lab, pred)
    return out, time.perf_counter() - start


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    x, labels, mask = make_data(
        rng,
        FLAGS.samples,
        FLAGS.layers,
        FLAGS.text,
        FLAGS.regions,
        FLAGS.dim,
        FLAGS.rank,
        FLAGS.sep_first,
        FLAGS.sep_last,
    )
    n_init = FLAGS.n_init if FLAGS.n_init == "auto" else int(FLAGS.n_init)
    l, s, n, d = x.shape
    print(
        f"data: {s} samples x {l} layers x {n} tokens ({FLAGS.text} text slots, "
        f"{FLAGS.regions} regions) x {d}; backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind})"
    )

    nmi_jax, times = run_jax(x, labels, mask, FLAGS.batch_size, FLAGS.num_iters, FLAGS.repeats)
    t_jax = statistics.median(times)
    k = min(FLAGS.sk_samples, s)
    nmi_sk, t_sk_subset = run_sklearn(x, labels, mask, k, n_init, FLAGS.sk_threads)
    t_sk = t_sk_subset * s / k

    print(
        f"\nJAX kmeans2_nmi (jit, batch {FLAGS.batch_size}, num_iters {FLAGS.num_iters}): "
        f"{t_jax:.3f} s for all {s * l} problems (median of {len(times)}: "
        + ", ".join(f"{t:.3f}" for t in times)
        + ")"
    )
    print(
        f"sklearn KMeans(n_init={FLAGS.n_init}) + NMI: {t_sk_subset:.2f} s for {k * l} "
        f"problems ({k} samples x {l} layers)"
        + (f", extrapolated to {t_sk:.1f} s for all {s * l}" if k < s else "")
    )
    print(
        f"per problem: JAX {t_jax / (s * l) * 1e3:.3f} ms, sklearn {t_sk / (s * l) * 1e3:.2f} ms "
        f"({'default threads' if not FLAGS.sk_threads else f'{FLAGS.sk_threads} thread(s)'})"
    )
    print(f"speed-up: {t_sk / t_jax:.0f}x")

    sub = nmi_jax[:, :k]
    print(
        f"\nmean NMI on the {k * l} problems both ran: JAX {sub.mean():.4f}, sklearn "
        f"{nmi_sk.mean():.4f}, difference {sub.mean() - nmi_sk.mean():+.4f}; "
        f"|per-problem difference| > 0.01 on {np.mean(np.abs(sub - nmi_sk) > 0.01):.1%}"
    )
    nmi_sk2 = None
    if FLAGS.sk_noise_floor:
        nmi_sk2, _ = run_sklearn(x, labels, mask, k, n_init, FLAGS.sk_threads, seed_offset=10_000)
        print(
            f"sklearn against itself, other random_states: mean NMI {nmi_sk2.mean():.4f}, "
            f"difference {nmi_sk2.mean() - nmi_sk.mean():+.4f}; |per-problem difference| "
            f"> 0.01 on {np.mean(np.abs(nmi_sk2 - nmi_sk) > 0.01):.1%}"
        )
    print(f"mean NMI over all {s} samples (JAX): {nmi_jax.mean():.4f}")

    header = "layer (1-based)  JAX (all)  JAX (subset)  sklearn (subset)  JAX-sklearn"
    print("\n" + header + ("  sklearn(other seeds)-sklearn" if nmi_sk2 is not None else ""))
    for layer in range(l):
        row = (
            f"{layer + 1:>15}  {nmi_jax[layer].mean():>9.4f}  {sub[layer].mean():>12.4f}  "
            f"{nmi_sk[layer].mean():>16.4f}  {sub[layer].mean() - nmi_sk[layer].mean():>+11.4f}"
        )
        if nmi_sk2 is not None:
            row += f"  {nmi_sk2[layer].mean() - nmi_sk[layer].mean():>+28.4f}"
        print(row)


if __name__ == "__main__":
    app.run(main)
