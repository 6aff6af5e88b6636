"""Two processes on loopback (jax.distributed, CPU collectives over gloo), each with two host
devices, give the numbers of a one-process run: same item counts, the same values to 1e-6;
and a two-process run killed part-way resumes to the same result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Both processes stop at the same step, as a job whose hosts are all pre-empted together.
KILL_AT_STEP_3 = """
import runpy, sys
from value_jax import runner
update = runner.Progress.update
def killing(self, done, items):
    update(self, done, items)
    if done >= 3:
        raise KeyboardInterrupt
runner.Progress.update = killing
sys.argv = ["experiments.coref"] + sys.argv[1:]
runpy.run_module("experiments.coref", run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache):
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _cmd(script, flags):
    return [sys.executable] + (["-c", script] if script else ["-m", "experiments.coref"]) + flags


def _one(cache, out, flags):
    proc = subprocess.run(
        _cmd(None, [f"--out_dir={out}", *flags]),
        cwd=REPO,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _two(cache, out, flags, script=None, ok=True):
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(
                script,
                [
                    f"--out_dir={out}",
                    *flags,
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ],
            ),
            cwd=REPO,
            env=_env(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    if ok:
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
    return procs, outs


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and a and not isinstance(a[0], (str, dict)):
        np.testing.assert_allclose(
            np.asarray(a, float), np.asarray(b, float), atol=1e-6, err_msg=path
        )
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-6, path
    else:
        assert a == b, path


FLAGS = ["--model=uniter", "--batch_size=4", "--max_images=6", "--checkpoint_every=1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    out = tmp_path_factory.mktemp("one")
    _one(cache, out, FLAGS)
    return cache, json.loads((out / "coref" / "uniter" / "results.json").read_text())


def test_two_processes_equal_one(reference, tmp_path):
    cache, one = reference
    procs, outs = _two(cache, tmp_path, FLAGS)
    assert "wrote results.json" in outs[0][1] and "wrote" not in outs[1][1]  # process 0 writes
    two = json.loads((tmp_path / "coref" / "uniter" / "results.json").read_text())
    assert two["links"] == one["links"] > 0
    _close(one, two)


def test_two_processes_killed_resume_to_the_same_result(reference, tmp_path):
    cache, one = reference
    procs, outs = _two(cache, tmp_path, FLAGS, script=KILL_AT_STEP_3, ok=False)
    assert all(p.returncode != 0 for p in procs)
    assert (tmp_path / "_state" / "coref" / "uniter" / "progress.json").is_file()
    procs, outs = _two(cache, tmp_path, FLAGS)
    assert "resuming after batch 2" in outs[0][1], outs[0][1][-2000:]
    _close(one, json.loads((tmp_path / "coref" / "uniter" / "results.json").read_text()))
