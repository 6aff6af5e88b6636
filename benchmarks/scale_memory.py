"""Host memory stays flat in the number of captions: peak RSS for N and 10·N.

Generates Flickr30k-shaped data (the demo generator: 5 captions per image, 36 regions of 2,048
features) for --images and --scale × --images images, then runs the coreference pass, which
collects the prober features of every link (Eq. 3 attention features plus a region and a phrase
embedding per paired layer), over each in a child process, with and without a collection
budget. The model is a small UNITER with base hidden size (768) so that the collected rows are
as wide as the real ones. Only the pass is measured: the probers' training afterwards reads one
layer at a time from what was collected.

Target: peak RSS(10·N) / peak RSS(N) ≤ 1.1 with the budget.

  python benchmarks/scale_memory.py                     # N = 60 images (about 100 val captions)
  python benchmarks/scale_memory.py --images=20 --layers=2
"""

from __future__ import annotations

import json
import os
import resource
import tempfile

from _child import measure
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 60, "N: images of the small dataset (a third are in the val split).")
flags.DEFINE_integer("scale", 10, "The large dataset has scale × N images.")
flags.DEFINE_integer("layers", 4, "Encoder layers of the model (hidden size 768, 12 heads).")
flags.DEFINE_float("budget_mb", 16.0, "--collect_budget_mb of the budgeted runs.")
flags.DEFINE_integer("batch_size", 8, "Captions per batch.")
flags.DEFINE_string("dir", None, "Where to generate the data (default: a new temp dir).")
flags.DEFINE_string("child", None, "Internal: run one measurement from this JSON and exit.")


def child(spec: dict) -> None:
    import jax
    import numpy as np

    from value_jax.data.demo import make_demo_data
    from value_jax.data.loaders import CorefLoader
    from value_jax.data.tokenization import read_vocab
    from value_jax.models import UniterConfig, build_model, init_params
    from value_jax.probes.coref import CorefProbe
    from value_jax.runner import run_probes

    class PassOnly(CorefProbe):
        def finalize(self, stats, info):
            return {k: int(len(v)) for k, v in stats.items() if k in self.collect_keys}

    demo = make_demo_data(spec["root"], n_images=spec["images"], feat_dim=2048)
    cfg = UniterConfig(
        vocab_size=len(read_vocab(demo.vocab_cased)),
        num_layers=spec["layers"],
        max_position_embeddings=128,
    )
    model = build_model(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    loader = CorefLoader(
        demo.flickr_root,
        demo.flickr_features_tsv,
        demo.vocab_cased,
        False,
        batch_size=spec["batch_size"],
    )
    spill = os.path.join(spec["root"], "spill") if spec["budget_mb"] is not None else None
    out = run_probes(
        model,
        params,
        loader,
        [PassOnly(types=loader.types)],
        progress_every=10**6,
        spill_dir=spill,
        collect_budget_mb=spec["budget_mb"],
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"peak_mb": peak, "items": out["coref"]["linked"], "captions": len(loader.examples)}
        )
    )
    del np


def main(argv):
    del argv
    if FLAGS.child:
        return child(json.loads(FLAGS.child))
    root = FLAGS.dir or tempfile.mkdtemp(prefix="scale_memory-")
    sizes = {"N": FLAGS.images, f"{FLAGS.scale}N": FLAGS.images * FLAGS.scale}
    rows = {}
    for budget in (None, FLAGS.budget_mb):
        for name, images in sizes.items():
            spec = {
                "root": os.path.join(root, name),
                "images": images,
                "layers": FLAGS.layers,
                "budget_mb": budget,
                "batch_size": FLAGS.batch_size,
            }
            rows[(budget, name)] = r = measure(__file__, spec)
            print(
                f"budget {budget if budget is not None else 'none':>5} MB  {name:>4}: "
                f"{r['captions']} captions, {r['items']} collected items, "
                f"peak RSS {r['peak_mb']:.0f} MiB",
                flush=True,
            )
    for budget in (None, FLAGS.budget_mb):
        ratio = rows[(budget, f"{FLAGS.scale}N")]["peak_mb"] / rows[(budget, "N")]["peak_mb"]
        label = "no budget" if budget is None else f"budget {budget:g} MB"
        verdict = (
            ""
            if budget is None
            else ("  (target <= 1.1: met)" if ratio <= 1.1 else "  (target <= 1.1: MISSED)")
        )
        print(f"{label}: peak RSS {FLAGS.scale}N / N = {ratio:.2f}{verdict}")


if __name__ == "__main__":
    app.run(main)
