"""Explorer speed and size: click latency, opening a 1,000-example store, bytes per example.

    python benchmarks/explore.py                          # both models, base size
    python benchmarks/explore.py --model=lxmert --examples=1000 --computed=32

Base-size random weights (UNITER-base, LXMERT-base) and examples of 20 word pieces + 36 regions
(2048-d features, random boxes on a 640×480 image). `--computed` examples go through the model
(one jitted pass per batch, as `experiments.explore` runs them); the store is then filled to
`--examples` by writing those records again under new indices, which gives a store of the real
size and layout without an hour of base-size forwards on a CPU.

Reported:
  * bytes on disk per example (every attention map and hidden state in float16, plus the
    probe statistics and the projection coordinates); target <= 2.5 MB;
  * store open time (`Store(path)`: meta + example index) and first-example read; target <= 2 s;
  * per click, the server side of the app's callback: reading the example (LRU miss and hit)
    and building the figure, serialised to JSON as Dash sends it; target <= 150 ms. Median over
    clicks on different examples, tokens and heads.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_enum("model", "both", ["uniter", "lxmert", "both"], "Which model(s).")
flags.DEFINE_integer("examples", 1000, "Examples in the store.")
flags.DEFINE_integer("computed", 32, "Examples run through the model (the rest are copies).")
flags.DEFINE_integer("batch", 8, "Batch size of the forward passes.")
flags.DEFINE_integer("clicks", 20, "Timed clicks per kind.")
flags.DEFINE_string("dir", "", "Where to write the stores (default: a temporary folder).")
FLAGS = flags.FLAGS

TEXT, REGIONS, FEAT, W, H = 20, 36, 2048, 640, 480


class _Pieces:
    """Word-piece names for random ids (the store keeps strings)."""

    def id_to_token(self, i):
        return {101: "[CLS]", 102: "[SEP]"}.get(int(i), f"w{int(i)}")


def _infos(n, vocab_size, seed=0):
    import numpy as np

    from value_jax.data import collate as C
    from value_jax.viz.compute import ExampleInfo

    rng = np.random.default_rng(seed)
    infos = []
    for k in range(n):
        ids = np.concatenate([[101], rng.integers(1000, vocab_size, TEXT - 2), [102]])
        ex = C.Example(f"img{k % 200}:{k}", ids, {}, image_id=f"img{k % 200}", num_regions=REGIONS)
        x1, y1 = rng.uniform(0, W * 0.7, REGIONS), rng.uniform(0, H * 0.7, REGIONS)
        boxes = np.stack(
            [
                x1,
                y1,
                x1 + rng.uniform(16, W * 0.3, REGIONS),
                y1 + rng.uniform(16, H * 0.3, REGIONS),
            ],
            1,
        ).astype(np.float32)
        infos.append(
            ExampleInfo(
                ex,
                " ".join(f"w{i}" for i in ids[1:-1]),
                "",
                W,
                H,
                boxes,
                [f"r{i}" for i in range(REGIONS)],
            )
        )
    return infos


def _regions(infos):
    import numpy as np

    boxes = {i.example.image_id: i.boxes / np.array([W, H, W, H], np.float32) for i in infos}

    def fetch(image_id):
        rng = np.random.default_rng(abs(hash(image_id)) % (1 << 31))
        return np.maximum(rng.standard_normal((REGIONS, FEAT)), 0).astype(np.float32), boxes[
            image_id
        ]

    return fetch


def build(model_type, path, examples, computed, batch):
    """A store of `examples` records at `path`: `computed` examples run through the base model
    in batches of `batch`, then written again under new indices."""
    import jax

    from value_jax.models import build_model, init_params
    from value_jax.models.configs import CONFIGS
    from value_jax.viz import compute
    from value_jax.viz.store import StoreWriter

    config = CONFIGS[model_type]()
    model = build_model(config, outputs=())
    params = init_params(model, jax.random.PRNGKey(0))
    infos = _infos(computed, config.vocab_size)
    session = compute.Session(model, params, _Pieces(), _regions(infos), batch_size=batch)
    start = time.perf_counter()
    records = list(session.run(infos))
    forward_s = time.perf_counter() - start
    writer = StoreWriter(path, session.meta())
    start = time.perf_counter()
    for k in range(examples):
        entry, record, hidden = records[k % len(records)]
        writer.add(dict(entry, id=f"{entry['id']}#{k}"), record, hidden)
    writer.close()
    return session, forward_s, time.perf_counter() - start


def clicks(store, n_clicks):
    """Median seconds per kind of click, over `n_clicks` clicks each."""
    import numpy as np
    import plotly.io as pio

    from value_jax.viz import figures as F
    from value_jax.viz.app import attention_outputs

    rng = np.random.default_rng(1)
    maps = store.map_names
    h = store.meta["num_heads"]
    kinds = {
        "word (overlay + words)": lambda ex: attention_outputs(
            store,
            ex,
            maps[rng.integers(len(maps))],
            int(rng.integers(h)),
            ("text", int(rng.integers(1, TEXT - 1))),
        ),
        "head cell (matrix)": lambda ex: F.matrix(
            store, ex, maps[rng.integers(len(maps))], int(rng.integers(h))
        ),
        "head summary (this example)": lambda ex: F.head_summary(store, ex, "t2v"),
        "mean over heads (overlay)": lambda ex: attention_outputs(
            store, ex, maps[0], "mean", ("text", 1)
        ),
    }
    out = {}
    for name, fn in kinds.items():
        for cached in (False, True):
            times = []
            for _ in range(n_clicks):
                ex = int(rng.integers(len(store)))
                if cached:
                    store.record(ex)
                else:
                    store._cache.clear()
                start = time.perf_counter()
                result = fn(ex)
                fig = result[0] if isinstance(result, tuple) else result
                pio.to_json(fig, validate=False)
                times.append(time.perf_counter() - start)
            out[f"{name}, {'cached' if cached else 'read from disk'}"] = statistics.median(times)
    group = store.groups[-1]
    start = time.perf_counter()
    pio.to_json(F.hidden(store, group, 0), validate=False)
    out[f"hidden states layer change ({len(store.hidden(group)[1])} tokens, first)"] = (
        time.perf_counter() - start
    )
    start = time.perf_counter()
    store.nearest(group, 5)
    out["hidden states, first token click on a layer (its unit-norm table is built)"] = (
        time.perf_counter() - start
    )
    times = []
    for _ in range(n_clicks):
        row = int(rng.integers(len(store.hidden(group)[1])))
        start = time.perf_counter()
        near = store.nearest(group, row)
        pio.to_json(F.hidden(store, group, 0, row, near), validate=False)
        times.append(time.perf_counter() - start)
    out["hidden states token click (nearest neighbours + figure)"] = statistics.median(times)
    return out


def run(model_type, root, examples, computed, batch, n_clicks):
    from value_jax.viz.store import Store, store_bytes

    path = os.path.join(root, model_type)
    _, forward_s, write_s = build(model_type, path, examples, computed, batch)
    size = store_bytes(path) / examples
    start = time.perf_counter()
    store = Store(path)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    store.record(examples // 2)
    first_s = time.perf_counter() - start
    print(
        f"\n{model_type}-base, {TEXT} word pieces + {REGIONS} regions, {len(store.map_names)} maps"
    )
    print(
        f"  forward + record of {computed} examples: {forward_s:.1f} s "
        f"(first batch compiles); writing {examples}: {write_s:.1f} s"
    )
    print(f"  bytes on disk per example: {size / 1e6:.2f} MB (target <= 2.5)")
    print(
        f"  open a {len(store)}-example store: {open_s * 1000:.0f} ms; first example read: "
        f"{first_s * 1000:.1f} ms (target <= 2000 ms)"
    )
    for name, seconds in clicks(store, n_clicks).items():
        print(f"  click, {name}: {seconds * 1000:.0f} ms (target <= 150)")
    sys.stdout.flush()


def main(argv):
    del argv
    root = FLAGS.dir or tempfile.mkdtemp(prefix="explore-bench-")
    for m in ["uniter", "lxmert"] if FLAGS.model == "both" else [FLAGS.model]:
        run(m, root, FLAGS.examples, FLAGS.computed, FLAGS.batch, FLAGS.clicks)
    print(f"\nstores left in {root}")


if __name__ == "__main__":
    app.run(main)
