"""Random access into a large LXMERT TSV keeps memory flat.

Writes a TSV of --images images x --boxes regions x --feat_dim float32 features (default 2,000 x
36 x 2,048, ~0.8 GB of base64, the size of a Flickr30k split) in a child process, so the writer's
memory does not count. Then, in this process: builds the offset index (one streaming pass), reads
every image once in random order while sampling resident memory (VmRSS) every --sample_every
images, reopens to time the cached index, and deletes the file (unless --keep).

Pass: RSS while reading stays within --max_growth_mb of the post-index level. airsplay/lxmert's
load_obj_tsv would instead hold every decoded array (printed for scale).

  python benchmarks/tsv_memory.py
  python benchmarks/tsv_memory.py --images=500 --feat_dim=256   # quick
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 2000, "Images (TSV lines).")
flags.DEFINE_integer("boxes", 36, "Regions per image.")
flags.DEFINE_integer("feat_dim", 2048, "Feature values per region.")
flags.DEFINE_integer("sample_every", 100, "Sample RSS every this many images.")
flags.DEFINE_float("max_growth_mb", 100.0, "Allowed RSS growth while reading.")
flags.DEFINE_string("dir", None, "Where to write the TSV (default: a new temp dir).")
flags.DEFINE_bool("keep", False, "Keep the TSV and its index.")
flags.DEFINE_integer("seed", 0, "Seed for the data and the read order.")
flags.DEFINE_string("write_only", None, "Internal: write the TSV to this path and exit.")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write(path: str, images: int, boxes: int, feat_dim: int, seed: int) -> None:
    from value_jax.data.fixtures.features import iter_random_records, write_lxmert_tsv

    records = iter_random_records(images, boxes, seed, feat_dim=feat_dim, with_cls_prob=False)
    write_lxmert_tsv(path, records)


def main(argv):
    del argv
    if FLAGS.write_only:
        write(FLAGS.write_only, FLAGS.images, FLAGS.boxes, FLAGS.feat_dim, FLAGS.seed)
        return
    from value_jax.data.features import LxmertTsvReader

    tmp = FLAGS.dir or tempfile.mkdtemp(prefix="tsv_memory_")
    os.makedirs(tmp, exist_ok=True)
    path = os.path.join(tmp, "features.tsv")
    try:
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                f"--write_only={path}",
                f"--images={FLAGS.images}",
                f"--boxes={FLAGS.boxes}",
                f"--feat_dim={FLAGS.feat_dim}",
                f"--seed={FLAGS.seed}",
            ],
            check=True,
        )
        size_mb = os.path.getsize(path) / 2**20
        print(
            f"wrote {FLAGS.images} images x {FLAGS.boxes} boxes x {FLAGS.feat_dim} f32: "
            f"{size_mb:.0f} MiB in {time.perf_counter() - t0:.1f} s ({path})"
        )

        rss_start = rss_mb()
        t0 = time.perf_counter()
        reader = LxmertTsvReader(path)
        t_index = time.perf_counter() - t0
        rss_index = rss_mb()
        print(f"RSS at start          {rss_start:8.1f} MiB")
        print(
            f"RSS after indexing    {rss_index:8.1f} MiB   (index {reader.index_status} in "
            f"{t_index:.2f} s, {size_mb / t_index:.0f} MiB/s)"
        )

        order = np.random.default_rng(FLAGS.seed).permutation(reader.image_ids())
        samples = []
        checksum = 0.0
        t0 = time.perf_counter()
        for k, image_id in enumerate(order, start=1):
            rec = reader[image_id]
            checksum += float(rec.features[0, 0]) + float(rec.boxes[-1, 3])
            if k % FLAGS.sample_every == 0 or k == len(order):  # the last one too
                samples.append(rss_mb())
        t_read = time.perf_counter() - t0
        reader.close()
        growth = max(samples) - rss_index
        print(
            f"RSS max while reading {max(samples):8.1f} MiB   (samples: "
            f"{' '.join(f'{s:.0f}' for s in samples[:6])} ... {samples[-1]:.0f})"
        )
        print(f"peak RSS (ru_maxrss)  {peak_rss_mb():8.1f} MiB")
        print(
            f"read {len(order)} images in random order in {t_read:.2f} s: "
            f"{len(order) / t_read:.0f} images/s, {size_mb / t_read:.0f} MiB/s of TSV "
            f"(checksum {checksum:.3f})"
        )

        t0 = time.perf_counter()
        with LxmertTsvReader(path) as again:
            status = again.index_status
        print(f"reopen: index {status} in {time.perf_counter() - t0:.3f} s")

        held = FLAGS.images * FLAGS.boxes * (FLAGS.feat_dim * 4 + 4 * 4 + 2 * 8 + 2 * 4) / 2**20
        print(f"load_obj_tsv would hold ~{held:.0f} MiB of decoded arrays (file {size_mb:.0f} MiB)")
        verdict = "PASS" if growth < FLAGS.max_growth_mb else "FAIL"
        print(
            f"{verdict}: RSS growth while reading {growth:+.1f} MiB "
            f"(limit {FLAGS.max_growth_mb:.0f} MiB; file {size_mb:.0f} MiB)"
        )
    finally:
        if not FLAGS.keep:
            for leftover in (path, path + ".idx.json"):
                if os.path.exists(leftover):
                    os.remove(leftover)
            if not FLAGS.dir:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
