"""No wasted padding: useful tokens / computed tokens of the batch plan, and XLA compilations.

    python benchmarks/padding.py
    python benchmarks/padding.py --captions=5000 --compile_examples=400

Flickr30k-like length distributions: captions of 8–40 word pieces ([CLS]/[SEP] included),
10–100 regions (UNITER's adaptive features, confidence-thresholded) or 36 (LXMERT's). For each,
the plan of --captions examples with the fixed grid (`collate.DEFAULT_BUCKETS`) and with
buckets fitted to the data (`bucketing.fit_buckets`, what the experiments use): useful tokens
(real text tokens + real regions) over computed tokens (every row of every padded batch).
Then a tiny UNITER runs the fusion, modality and head-summary probes over
--compile_examples of them through the runner, counting the XLA backend compilations.
Targets: efficiency ≥ 0.85 (fitted); compilations ≤ the number of distinct batch shapes.
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("captions", 158915, "Examples planned (all of Flickr30k Entities).")
flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
flags.DEFINE_integer("compile_examples", 600, "Examples run through the model for the count.")
flags.DEFINE_integer("seed", 0, "Seed of the lengths.")


def examples(n, regions, rng):
    import numpy as np

    from value_jax.data import collate as C

    return [
        C.Example(
            f"{i}",
            np.arange(rng.integers(8, 41), dtype=np.int32) % 90 + 1,
            {},
            image_id=str(i),
            num_regions=int(regions(rng)),
        )
        for i in range(n)
    ]


def count_compilations(exs, batch_size):
    import jax
    import numpy as np

    from value_jax.data.loaders import ExampleLoader
    from value_jax.models import UniterConfig, build_model, init_params
    from value_jax.probes.fusion import FusionProbe
    from value_jax.probes.head_summary import HeadSummaryProbe
    from value_jax.probes.modality import ModalityProbe
    from value_jax.runner import run_probes

    cfg = UniterConfig.tiny(img_dim=16, max_position_embeddings=64)
    model = build_model(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def regions(image_id):
        n = next(e.num_regions for e in exs if e.image_id == image_id)
        x1y1 = rng.uniform(0, 0.5, (n, 2))
        return rng.normal(size=(n, 16)).astype(np.float32), np.concatenate([x1y1, x1y1 + 0.3], 1)

    loader = ExampleLoader(exs, batch_size, buckets="fit", regions=regions)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: (
            compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    before = len(compiles)
    run_probes(
        model,
        params,
        loader,
        [FusionProbe(), ModalityProbe(), HeadSummaryProbe()],
        progress_every=10**6,
    )
    return len(loader.shapes), len(compiles) - before


def main(argv):
    del argv
    import numpy as np

    from value_jax.data import batch_plan as BP
    from value_jax.data.bucketing import fit_buckets, padding_efficiency

    for name, regions in (
        ("UNITER, 10-100 regions", lambda r: r.integers(10, 101)),
        ("LXMERT, 36 regions", lambda r: 36),
    ):
        exs = examples(FLAGS.captions, regions, np.random.default_rng(FLAGS.seed))
        fixed = BP.plan_batches(exs, FLAGS.batch_size)
        buckets = fit_buckets(exs, FLAGS.batch_size)
        fitted = BP.plan_batches(exs, FLAGS.batch_size, buckets)
        e_fixed, e_fit = (padding_efficiency(p, FLAGS.batch_size) for p in (fixed, fitted))
        print(
            f"{name}, {len(exs)} captions, batch {FLAGS.batch_size}:\n"
            f"  fixed grid   {e_fixed:.3f} useful/computed, "
            f"{len({p.shape for p in fixed})} shapes\n"
            f"  fitted       {e_fit:.3f} useful/computed, {len({p.shape for p in fitted})} "
            f"shapes (text {buckets.text}, regions {buckets.regions})  "
            f"target >= 0.85: {'met' if e_fit >= 0.85 else 'MISSED'}",
            flush=True,
        )
    exs = examples(FLAGS.compile_examples, lambda r: r.integers(10, 101), np.random.default_rng(1))
    shapes, compiles = count_compilations(exs, FLAGS.batch_size)
    print(
        f"runner over {len(exs)} examples: {shapes} batch shapes, {compiles} XLA compilations "
        f"(target <= shapes: {'met' if compiles <= shapes else 'MISSED'})"
    )


if __name__ == "__main__":
    app.run(main)
