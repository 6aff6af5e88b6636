"""Forward-pass benchmark: Flax forward with the FULL trace vs HF PyTorch with output_attentions.

    python benchmarks/forward.py                       # both models, batch 32 x (20 + 36), 2 threads
    python benchmarks/forward.py --model=lxmert --repeats=7

Same batch, same base-size random weights. UNITER has no HF implementation; its reference is HF
`BertModel` over the same joint sequence length (T + R tokens), which does the same encoder work.
Also measures the float32 matmul peak of this machine (numpy and jax), and prints GFLOP/s of each
forward, the Flax/HF speed ratio (target >= 1.0) and Flax's fraction of the matmul peak (target
>= 0.9). Timings are medians of alternated runs after warm-up; only ratios from one run compare.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_enum("model", "both", ["uniter", "lxmert", "both"], "Which model(s).")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("text", 20, "Text tokens per example ([CLS] ... [SEP]).")
flags.DEFINE_integer("regions", 36, "Regions per example.")
flags.DEFINE_integer("threads", 2, "CPU threads for both frameworks.")
flags.DEFINE_integer("repeats", 5, "Timed runs per framework (median reported).")
flags.DEFINE_boolean("hf", True, "Also time the HF PyTorch reference.")
FLAGS = flags.FLAGS


def _configure_threads(n: int) -> None:
    # Must happen before jax / torch initialise their thread pools.
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}"
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def encoder_flops(hidden, inter, layers_tokens, attn_pairs):
    """2·MACs of the dense layers (Q,K,V,O + FFN per token per layer) plus attention (QKᵀ, AV)."""
    dense = sum(n * (4 * hidden * hidden + 2 * hidden * inter) for n in layers_tokens)
    attention = sum(2 * q * k * hidden for q, k in attn_pairs)
    return 2 * (dense + attention)


def uniter_flops(c, b, t, r):
    n = t + r
    f = encoder_flops(
        c.hidden_size, c.intermediate_size, [n] * c.num_layers, [(n, n)] * c.num_layers
    )
    return b * (f + 2 * r * (c.feature_dim * c.hidden_size + 7 * c.hidden_size))


def lxmert_flops(c, b, t, r):
    h, i = c.hidden_size, c.intermediate_size
    f = encoder_flops(
        h, i, [t] * c.l_layers + [r] * c.r_layers, [(t, t)] * c.l_layers + [(r, r)] * c.r_layers
    )
    # Cross layer: cross-attention both ways + self-attention both streams (4 attention blocks:
    # QKVO on each stream twice) and one FFN per stream.
    per_x = 2 * (2 * (t + r) * 4 * h * h + (t + r) * 2 * h * i) + 2 * 2 * h * (
        2 * t * r + t * t + r * r
    )
    return b * (f + c.x_layers * per_x + 2 * r * (c.feature_dim * h + 4 * h))


FLOPS = {"uniter": uniter_flops, "lxmert": lxmert_flops}  # per architecture


def _median_time(fn, repeats):
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


class MatmulPeak:
    """float32 GFLOP/s of a 2048³ matmul in numpy and jax; sampled between the forward runs so
    that load on the machine affects the peak and the forwards alike."""

    def __init__(self):
        import jax
        import jax.numpy as jnp
        import numpy as np

        n = 2048
        self.flop = 2 * n**3
        self.a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        self.ja = jnp.asarray(self.a)
        self.mm = jax.jit(lambda x: x @ x)
        self.mm(self.ja).block_until_ready()
        self.numpy, self.jax = [], []

    def sample(self):
        self.numpy.append(self.flop / _median_time(lambda: self.a @ self.a, 3) / 1e9)
        self.jax.append(
            self.flop / _median_time(lambda: self.mm(self.ja).block_until_ready(), 3) / 1e9
        )

    def best(self, backend):
        import numpy as np

        np_peak, jax_peak = float(np.median(self.numpy)), float(np.median(self.jax))
        return (max(np_peak, jax_peak) if backend == "cpu" else jax_peak), np_peak, jax_peak


def main(argv):
    del argv
    import jax
    import numpy as np

    import value_jax
    from value_jax.models import build_model, init_params
    from value_jax.models.configs import CONFIGS

    b, t, r = FLAGS.batch, FLAGS.text, FLAGS.regions
    backend = jax.default_backend()
    print(f"backend {backend}, devices {jax.devices()}, threads {FLAGS.threads}")
    peaks = MatmulPeak()
    models = ["uniter", "lxmert"] if FLAGS.model == "both" else [FLAGS.model]
    rng = np.random.default_rng(0)
    for name in models:
        cfg = CONFIGS[name]()
        feat = cfg.feature_dim
        flop = FLOPS[name](cfg, b, t, r)
        model = build_model(cfg)
        params = init_params(model, jax.random.PRNGKey(0))
        x1y1 = rng.uniform(0, 0.5, (b, r, 2))
        batch = value_jax.Batch.create(
            rng.integers(1000, 20000, (b, t)),
            np.ones((b, t)),
            rng.random((b, r, feat)),
            np.concatenate([x1y1, x1y1 + 0.3], -1),
        )
        params = jax.device_put(params)
        batch = jax.device_put(batch)

        def flax_forward(model=model, params=params, batch=batch):
            trace = value_jax.run(model, params, batch)
            jax.block_until_ready((trace.attention, trace.hidden))

        flax_forward()
        hf_forward = _hf_forward(name, cfg, batch, FLAGS.threads) if FLAGS.hf else None
        if hf_forward:
            hf_forward()
        flax_times, hf_times = [], []
        for _ in range(FLAGS.repeats):  # alternate, so drift hits all alike
            peaks.sample()
            flax_times.append(_median_time(flax_forward, 1))
            if hf_forward:
                hf_times.append(_median_time(hf_forward, 1))
        ft = float(np.median(flax_times))
        peak, np_peak, jax_peak = peaks.best(backend)
        print(
            f"\nfloat32 matmul peak (2048^3, sampled between runs): numpy {np_peak:.1f}, "
            f"jax {jax_peak:.1f} GFLOP/s"
        )
        print(f"{name}: {flop / 1e9:.0f} GFLOP per forward (batch {b} x ({t} text + {r} regions))")
        print(
            f"  flax (full trace: {len(value_jax.run(model, params, batch).attention)} attention maps "
            f"+ hidden states): {ft:.3f} s, {flop / ft / 1e9:.1f} GFLOP/s, "
            f"{flop / ft / 1e9 / peak:.2f} of matmul peak"
        )
        if hf_forward:
            ht = float(np.median(hf_times))
            print(
                f"  HF PyTorch (output_attentions=True): {ht:.3f} s, {flop / ht / 1e9:.1f} GFLOP/s"
            )
            print(f"  ratio flax speed / HF speed: {ht / ft:.2f}x (target >= 1.0)")


def _hf_forward(name, cfg, batch, threads):
    import numpy as np

    try:
        import torch
        import transformers
    except ImportError:
        print("torch/transformers not installed: skipping the HF reference (pip install .[test])")
        return None
    torch.set_num_threads(threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tt = lambda x: torch.from_numpy(np.array(x)).to(dev)
    if name == "uniter":
        hf = (
            transformers.BertModel(
                transformers.BertConfig(
                    vocab_size=cfg.vocab_size,
                    hidden_size=cfg.hidden_size,
                    num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads,
                    intermediate_size=cfg.intermediate_size,
                    attn_implementation="eager",
                )
            )
            .eval()
            .to(dev)
        )
        ids = np.concatenate(
            [
                np.asarray(batch.input_ids),
                np.asarray(batch.input_ids)[:, :1].repeat(batch.num_regions, 1),
            ],
            1,
        )
        kw = dict(
            input_ids=tt(ids.astype(np.int64)), output_attentions=True, output_hidden_states=True
        )
    else:
        hf = (
            transformers.LxmertModel(transformers.LxmertConfig(attn_implementation="eager"))
            .eval()
            .to(dev)
        )
        kw = dict(
            input_ids=tt(np.asarray(batch.input_ids).astype(np.int64)),
            visual_feats=tt(batch.region_feats),
            visual_pos=tt(batch.region_boxes),
            output_attentions=True,
            output_hidden_states=True,
        )

    def forward():
        with torch.no_grad():
            hf(**kw)
        if dev == "cuda":
            torch.cuda.synchronize()

    return forward


if __name__ == "__main__":
    _configure_threads(
        int(next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), 2))
    )
    app.run(main)
