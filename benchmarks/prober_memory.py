"""Host memory of the embedding (Eq. 4) probers stays flat in the number of items: peak
anonymous memory of one layer's prober (task and control fits, every split scored) for N and
10·N pairs.

Writes two `[items, layers, dim]` float32 arrays as raw files, the way a spilled collection
lies under `<out_dir>/_state` (random rows, labels and images), and runs
`pair_probers._fit_layers` on them as memmaps in a child process per size: streamed (a budget
below one layer's fit, so each layer's rows are read an epoch at a time), and, at N only, in
memory (the fit holds ~4 copies of the layer's pair inputs; at 10·N that would be 10× more).

Peak anonymous memory (RssAnon, sampled every 10 ms) is what the fit holds; the peak resident
set also counts the memmapped file pages the reads bring in, which are page cache the kernel
drops under pressure.

Target: streamed peak anonymous memory(10·N) / (N) ≤ 1.1, with N's train split at least two
capped epochs (2 × 65,536 items): from there on a fit holds one epoch's rows in training and
reads the next one's alongside, whatever N (with a single epoch per pass of the train set the
reshuffle between epochs waits for the training, and the reads do not overlap it).

  python benchmarks/prober_memory.py                  # N = 200,000 pairs at hidden size 768
  python benchmarks/prober_memory.py --items=2000 --scale=3 --dim=64    # quick
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import threading
import time

from _child import measure
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("items", 200_000, "N: pairs of the small collection.")
flags.DEFINE_integer("scale", 10, "The large collection has scale × N pairs.")
flags.DEFINE_integer("dim", 768, "Hidden size of the collected rows.")
flags.DEFINE_integer("layers", 1, "Layers collected per item (each is one prober).")
flags.DEFINE_integer("epochs", 2, "max_epochs (and patience) of each fit.")
flags.DEFINE_string("dir", None, "Where to write the arrays (default: a new temp dir).")
flags.DEFINE_string("child", None, "Internal: run one measurement from this JSON and exit.")

_CHUNK = 65536


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _write(root, items, layers, dim):
    """Two raw `[items, layers, dim]` float32 files, labels, images and control types."""
    import numpy as np

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        with open(os.path.join(root, name + ".bin"), "wb") as f:
            for lo in range(0, items, _CHUNK):
                rows = min(_CHUNK, items - lo)
                f.write(rng.standard_normal((rows, layers, dim), np.float32).tobytes())
    np.savez(
        os.path.join(root, "meta.npz"),
        labels=rng.integers(0, 2, items).astype(np.int32),
        groups=np.arange(items) // 20,
        types=np.arange(items) // 2,
    )


def child(spec: dict) -> None:
    import numpy as np

    from value_jax.probes import classifiers as C
    from value_jax.probes import pair_probers

    peak = [_rss_anon_mb()]
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_anon_mb())

    threading.Thread(target=sample, daemon=True).start()
    shape = (spec["items"], spec["layers"], spec["dim"])
    a, b = (
        np.memmap(os.path.join(spec["root"], n + ".bin"), np.float32, "r", shape=shape)
        for n in ("a", "b")
    )
    meta = np.load(os.path.join(spec["root"], "meta.npz"))
    settings = {
        "bilinear": dict(
            max_epochs=spec["epochs"],
            patience=spec["epochs"],
            epoch_items=C.EPOCH_ITEMS,
            stopping_dev_items=C.STOPPING_DEV_ITEMS,
        )
    }
    before = _rss_anon_mb()
    start = time.perf_counter()
    res = pair_probers._fit_layers(
        a,
        b,
        np.ones(spec["items"], bool),
        meta["labels"],
        meta["types"],
        meta["groups"],
        0,
        [f"layer{i + 1}" for i in range(spec["layers"])],
        settings,
        0,
        budget=0 if spec["streamed"] else 1 << 50,
    )
    seconds = time.perf_counter() - start
    done.set()
    peak[0] = max(peak[0], _rss_anon_mb())
    print(
        json.dumps(
            {
                "anon_peak_mb": peak[0],
                "anon_before_mb": before,
                "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds": seconds,
                "streamed": bool(res.get("streamed")),
                "test_acc": res["test_acc"],
            }
        )
    )


def main(argv):
    del argv
    if FLAGS.child:
        return child(json.loads(FLAGS.child))
    root = FLAGS.dir or tempfile.mkdtemp(prefix="prober_memory-")
    sizes = {"N": FLAGS.items, f"{FLAGS.scale}N": FLAGS.items * FLAGS.scale}
    inputs_mb = {k: 2 * n * FLAGS.dim * 4 / 2**20 for k, n in sizes.items()}
    rows = {}
    for name, items in sizes.items():
        start = time.perf_counter()
        _write(os.path.join(root, name), items, FLAGS.layers, FLAGS.dim)
        print(
            f"{name}: {items} pairs × {FLAGS.layers} layer(s) × {FLAGS.dim} written under "
            f"{root} ({time.perf_counter() - start:.0f} s; one layer's pair inputs "
            f"{inputs_mb[name]:.0f} MiB)",
            flush=True,
        )
        runs = (True, False) if name == "N" else (True,)
        for streamed in runs:
            spec = dict(
                root=os.path.join(root, name),
                items=items,
                layers=FLAGS.layers,
                dim=FLAGS.dim,
                epochs=FLAGS.epochs,
                streamed=streamed,
            )
            rows[(name, streamed)] = r = measure(__file__, spec)
            print(
                f"  {'streamed ' if streamed else 'in memory'}: peak anonymous memory "
                f"{r['anon_peak_mb']:.0f} MiB ({r['anon_peak_mb'] - r['anon_before_mb']:.0f} "
                f"MiB above the start), peak RSS {r['rss_peak_mb']:.0f} MiB, "
                f"{r['seconds']:.0f} s",
                flush=True,
            )
    n, big = rows[("N", True)], rows[(f"{FLAGS.scale}N", True)]
    held = rows[("N", False)]
    print(
        f"in memory at N: {(held['anon_peak_mb'] - held['anon_before_mb']) / inputs_mb['N']:.1f}"
        f"× one layer's pair inputs above the start; streamed: "
        f"{(n['anon_peak_mb'] - n['anon_before_mb']) / inputs_mb['N']:.1f}× at N, "
        f"{(big['anon_peak_mb'] - big['anon_before_mb']) / inputs_mb[f'{FLAGS.scale}N']:.2f}× "
        f"at {FLAGS.scale}N"
    )
    ratio = big["anon_peak_mb"] / n["anon_peak_mb"]
    met = "met" if ratio <= 1.1 else "MISSED"
    print(
        f"streamed: peak anonymous memory {FLAGS.scale}N / N = {ratio:.2f} (target <= 1.1: {met})"
    )


if __name__ == "__main__":
    app.run(main)
