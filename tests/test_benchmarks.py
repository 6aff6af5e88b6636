"""Every benchmark runs to its end at a tiny size (no timing is checked: the figures are the
benchmarks' own business, on an idle machine). They reach into the library's internals (the
runner's step, the probes' binding, the prober fits), so without these runs a change there could
break a benchmark unseen, as `benchmarks/suite.py` once was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (script, tiny flags, a line its output must hold); "{dir}" is a fresh temporary folder.
RUNS = [
    (
        "throughput.py",
        "--captions=10 --vg_images=4 --layers=1 --feat_dim=32 --batch_size=4 --timing_repeats=1 "
        "--dir={dir}",
        "Projected full run",
    ),
    ("suite.py", "--batch=2 --text=8 --regions=6 --links=2 --batches=1 --nohf", "suite/bare"),
    ("forward.py", "--batch=2 --text=8 --regions=4 --repeats=1 --nohf", "of matmul peak"),
    ("kmeans_nmi.py", "--samples=8 --layers=2 --sk_samples=2 --repeats=1", "JAX-sklearn"),
    ("probers.py", "--layers=2 --pairs=300 --features=64 --classes=3 --sk_every=1", "speed-up"),
    ("padding.py", "--captions=2000 --compile_examples=40", "XLA compilations"),
    ("tsv_memory.py", "--images=20 --dir={dir}", "RSS growth while reading"),
    ("scale_memory.py", "--images=6 --scale=2 --layers=1 --dir={dir}", "peak RSS 2N / N"),
    ("prober_memory.py", "--items=2000 --scale=2 --dim=16 --dir={dir}", "anonymous memory 2N / N"),
    ("explore.py", "--examples=4 --computed=2 --clicks=1 --model=uniter --dir={dir}", "click"),
]


def test_every_benchmark_is_listed():
    listed = {script for script, _, _ in RUNS}
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert listed == scripts


@pytest.mark.parametrize("script, args, expected", RUNS, ids=[r[0] for r in RUNS])
def test_benchmark_runs_at_a_tiny_size(script, args, expected, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / script)]
    cmd += args.format(dir=tmp_path).split()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}"
    assert expected in output, output[-3000:]


PROJECTION_CHECKS = """
import math, sys
import numpy as np
sys.path.insert(0, "benchmarks")
import throughput as T
from value_jax.data.collate import Buckets

# 3 batches of 32 rows of one shape, 70 rows real, 1.5 s: at 100x the rows fill
# ceil(7000 / 32) = 219 batches of 0.5 s; a second shape, 1 batch of 10 real rows, 2 s:
# ceil(1000 / 32) = 32 batches of 2 s.
shapes = {"a": [3, 70, 1.5], "b": [1, 10, 2.0]}
assert math.isclose(T._project_forward(shapes, 100, 32), 219 * 0.5 + 32 * 2.0), shapes
# Every (text, item) bucket at each region size seen, at the mean compilation.
buckets = Buckets(text=(16, 32), items=(8, 16, 32))
assert math.isclose(T._project_compile({"a": 2.0, "b": 4.0}, buckets, {36}), 3.0 * 6)
assert math.isclose(T._project_compile({"a": 2.0}, buckets, {36, 50}), 2.0 * 12)
# Batches equal but for a target's shape are two compilations, two keys.
x = np.zeros((4, 16))
assert T._shape_key(x, {"t": np.zeros((4, 8))}) != T._shape_key(x, {"t": np.zeros((4, 16))})
assert T._shape_key(x, {"t": np.zeros((4, 8))}) == T._shape_key(x + 1, {"t": np.ones((4, 8))})
print("projection ok")
"""


def test_throughput_projects_by_batches_and_compiles_every_shape():
    """The throughput benchmark's projection arithmetic on known inputs (in a child process:
    the benchmark defines absl flags that experiment modules also define)."""
    proc = subprocess.run(
        [sys.executable, "-c", PROJECTION_CHECKS],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "projection ok" in proc.stdout, proc.stdout + proc.stderr
