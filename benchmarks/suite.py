"""The attention suite in one jitted pass vs a bare forward, and vs an HF PyTorch + numpy pipeline.

    python benchmarks/suite.py                    # UNITER-base, batch 32 x (20 text + 36 regions)
    python benchmarks/suite.py --model=lxmert --batches=3

Three timings per batch, on the same data and base-size random weights:
  bare   — the jitted forward alone (no intermediates kept);
  suite  — `runner.make_step`: forward + Trace + fusion k-means/NMI, modality importance,
           image-to-text heads, coreference phrase max (+ random baselines), head summary;
           only the small statistics leave the device;
  HF     — what one script per analysis does with PyTorch: HF forward with output_attentions /
           output_hidden_states, copy to numpy, compute that analysis (scikit-learn KMeans +
           normalized_mutual_info_score for fusion), repeated for each analysis.
Targets: suite / bare ≤ 1.15, HF / suite ≥ 3. Medians over --batches after a warm-up.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

flags.DEFINE_enum("model", "uniter", ["uniter", "lxmert"], "Which model.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("text", 20, "Text tokens per example.")
flags.DEFINE_integer("regions", 36, "Regions per example.")
flags.DEFINE_integer("links", 8, "Coreference links per example.")
flags.DEFINE_integer("batches", 3, "Timed batches (median reported).")
flags.DEFINE_integer("threads", 2, "CPU threads for both frameworks.")
flags.DEFINE_boolean("hf", True, "Time the HF PyTorch + numpy pipeline.")
FLAGS = flags.FLAGS


def make_inputs(cfg, seed, b, t, r, p):
    """A batch of `b` examples of `t` text tokens and `r` regions, `p` coreference links each."""
    import numpy as np

    import value_jax

    rng = np.random.default_rng(seed)
    feat = cfg.feature_dim
    x1y1 = rng.uniform(0, 0.5, (b, r, 2))
    batch = value_jax.Batch.create(
        rng.integers(1000, 20000, (b, t)),
        np.ones((b, t)),
        rng.random((b, r, feat)),
        np.concatenate([x1y1, x1y1 + 0.3], -1),
    )
    starts = rng.integers(1, t - 4, (b, p))
    tokens = starts[..., None] + np.arange(3)
    targets = {
        "coref.region": rng.integers(0, r, (b, p)).astype(np.int32),
        "coref.tokens": tokens.astype(np.int32),
        "coref.token_mask": np.ones((b, p, 3), bool),
        "coref.type": rng.integers(0, 8, (b, p)).astype(np.int32),
        "coref.linked": np.ones((b, p), bool),
        "coref.mask": np.ones((b, p), bool),
        "coref.rand_region": rng.integers(0, r, (b, p)).astype(np.int32),
        "coref.rand_tokens": np.roll(tokens, 1, axis=1).astype(np.int32),
        "coref.rand_token_mask": np.ones((b, p, 3), bool),
    }
    return batch, targets


def probes(config):
    from value_jax.probes.coref import CorefProbe
    from value_jax.probes.fusion import FusionProbe
    from value_jax.probes.head_summary import HeadSummaryProbe
    from value_jax.probes.modality import ImageToTextProbe, ModalityProbe

    ps = [FusionProbe(), CorefProbe(collect_features=False), HeadSummaryProbe()]
    if config.single_stream:
        ps += [ModalityProbe(), ImageToTextProbe()]
    return ps


def numpy_pipeline(config, hf_forward, batch, targets):
    """One HF forward + numpy computation per analysis, as separate analysis scripts do."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    t = batch.text_len
    tm = np.asarray(batch.text_mask)
    words = tm.copy()
    words[:, 0] = 0
    words[np.arange(len(tm)), tm.sum(1) - 1] = 0

    def blocks(att, direction):  # att: list of [B, H, N, N] (UNITER) or dict (LXMERT)
        if config.single_stream:
            q = slice(0, t) if direction[0] == "t" else slice(t, None)
            k = slice(0, t) if direction[2] == "t" else slice(t, None)
            return [a[:, :, q, k] for a in att]
        return att[direction]

    # fusion
    out = hf_forward()
    for tx, im in out["paired_states"]:
        for i in range(tx.shape[0]):
            x = np.concatenate([tx[i][words[i] > 0], im[i]])
            y = np.r_[np.zeros((words[i] > 0).sum()), np.ones(len(im[i]))]
            pred = KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(x)
            normalized_mutual_info_score(y, pred)
    # coreference (phrase max, both directions, random baselines)
    out = hf_forward()
    reg, tok = targets["coref.region"], targets["coref.tokens"]
    for v2t, t2v in zip(blocks(out["attention"], "v2t"), blocks(out["attention"], "t2v")):
        for bi in range(v2t.shape[0]):
            for p in range(reg.shape[1]):
                v2t[bi, :, reg[bi, p], tok[bi, p]].max(-1)
                t2v[bi, :, tok[bi, p], reg[bi, p]].max(-1)
                v2t[bi, :, reg[bi, p], targets["coref.rand_tokens"][bi, p]].max(-1)
                t2v[bi, :, tok[bi, p], targets["coref.rand_region"][bi, p]].max(-1)
    # head summary
    out = hf_forward()
    for d in ("t2t", "t2v", "v2t", "v2v"):
        for a in blocks(out["attention"], d):
            a.mean(axis=(2, 3))
    if config.single_stream:
        # modality importance
        out = hf_forward()
        for a in out["attention"]:
            (a[:, :, 0, :t] * words[:, None]).sum(-1)
            a[:, :, 0, t:].sum(-1)
        # image-to-text heads
        out = hf_forward()
        for a in blocks(out["attention"], "v2t"):
            ((a * words[:, None, None]).sum(-1) > 0.5).any(-1)


def hf_model(model_type, batch, threads):
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tt = lambda x: torch.from_numpy(np.array(x)).to(dev)
    if model_type == "uniter":
        hf = (
            transformers.BertModel(transformers.BertConfig(attn_implementation="eager"))
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
        kw = dict(input_ids=tt(ids.astype(np.int64)))
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
        )
    t = batch.text_len

    def forward():
        with torch.no_grad():
            o = hf(**kw, output_attentions=True, output_hidden_states=True)
            o = {k: ([h.cpu() for h in v] if isinstance(v, tuple) else v) for k, v in o.items()}
            o = type("Out", (), o)
        if model_type == "uniter":
            att = [a.numpy() for a in o.attentions]
            states = [h.numpy() for h in o.hidden_states[1:]]
            return {"attention": att, "paired_states": [(h[:, :t], h[:, t:]) for h in states]}
        lang = [a.numpy() for a in o.language_attentions]
        visn = [a.numpy() for a in o.vision_attentions]
        cross = [a.numpy() for a in o.cross_encoder_attentions]
        x = batch.num_regions
        l_states = [h.numpy() for h in o.language_hidden_states[-5:]]
        v_states = [h.numpy() for h in o.vision_hidden_states[-5:]]
        # HF returns neither vision→language nor the cross self-attention: the numpy pipeline
        # gets language→vision transposed-shaped stand-ins, which makes it do the same work.
        v2t = [np.swapaxes(a, 2, 3) for a in cross]
        return {
            "attention": {"t2t": lang, "v2v": visn, "t2v": cross, "v2t": v2t},
            "paired_states": list(zip(l_states, v_states)),
            "regions": x,
        }

    return forward


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv):
    del argv
    import jax
    import numpy as np

    from value_jax.models import build_model, init_params
    from value_jax.models.configs import CONFIGS
    from value_jax.runner import make_step
    from value_jax.trace import Layout

    cfg = CONFIGS[FLAGS.model]()
    model = build_model(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    batch, targets = make_inputs(cfg, 0, FLAGS.batch, FLAGS.text, FLAGS.regions, FLAGS.links)
    batch, targets, params = jax.device_put((batch, targets, params))
    bare = jax.jit(lambda p, b: model.apply({"params": p}, b))
    suite_probes = probes(cfg)
    for p in suite_probes:  # layer names from the config, as run_probes does before a pass
        p.bind(Layout.from_config(cfg))
    suite = make_step(model, suite_probes)
    run_bare = lambda: jax.block_until_ready(bare(params, batch))
    run_suite = lambda: jax.device_get(suite(params, batch, targets))
    run_bare(), run_suite()
    hf_forward = hf_model(cfg.model_type, batch, FLAGS.threads) if FLAGS.hf else None
    np_batch, np_targets = jax.device_get((batch, targets))
    run_hf = (lambda: numpy_pipeline(cfg, hf_forward, np_batch, np_targets)) if hf_forward else None
    times = {"bare": [], "suite": [], "hf": []}
    for _ in range(FLAGS.batches):  # alternate, so drift hits all alike
        times["bare"].append(_time(run_bare))
        times["suite"].append(_time(run_suite))
        if run_hf:
            times["hf"].append(_time(run_hf))
    med = {k: float(np.median(v)) for k, v in times.items() if v}
    n_analyses = len(probes(cfg))
    print(
        f"backend {jax.default_backend()}; {cfg.model_type}-base, batch {FLAGS.batch} x "
        f"({FLAGS.text} text + {FLAGS.regions} regions), {n_analyses} analyses"
    )
    print(f"  bare jitted forward:                {med['bare']:.3f} s")
    print(
        f"  suite (forward + all probes, 1 jit): {med['suite']:.3f} s   "
        f"ratio suite/bare = {med['suite'] / med['bare']:.3f} (target <= 1.15)"
    )
    if "hf" in med:
        print(
            f"  HF PyTorch + numpy, one pass per analysis: {med['hf']:.3f} s   "
            f"speed-up = {med['hf'] / med['suite']:.2f}x (target >= 3)"
        )


if __name__ == "__main__":
    n = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), "2")
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}"
    )
    os.environ.setdefault("OMP_NUM_THREADS", n)
    app.run(main)
