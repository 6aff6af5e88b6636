"""Reruns and resumes as a user makes them, through `python -m experiments.<analysis>`.

A rerun into the same `--out_dir` must give the numbers of a fresh run of the same flags: saved
state from other inputs is never used, a finished run rerun gives the same files, and `all`
killed in one of its passes resumes across them. Each run is a subprocess on the built-in demo.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# `all` killed at its second Visual Genome batch, as by Ctrl-C (KeyboardInterrupt), after the
# Flickr30k pass has finished and saved its state.
KILL_IN_VG = """
import runpy, sys
from value_jax import runner
update = runner.Progress.update
def killing(self, done, items):
    update(self, done, items)
    if self.label.startswith("all.visual_genome") and done >= 2:
        raise KeyboardInterrupt
runner.Progress.update = killing
sys.argv = ["experiments.all"] + sys.argv[1:]
runpy.run_module("experiments.all", run_name="__main__")
"""


def _env(cache):
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _run(cache, *args, script=None, ok=True):
    cmd = [sys.executable] + (["-c", script] if script else ["-m", f"experiments.{args[0]}"])
    cmd += list(args[1:])
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=600
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _outputs(out: Path) -> dict[str, bytes]:
    """Every results.json and table.md under `out`, by relative path."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.name in ("results.json", "table.md") and "_state" not in p.parts
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def test_rerun_with_other_inputs_starts_fresh_and_a_finished_rerun_is_identical(tmp_path, cache):
    fresh, reused = tmp_path / "fresh", tmp_path / "reused"
    _run(cache, "coref", f"--out_dir={fresh}")
    _run(cache, "coref", f"--out_dir={reused}", "--max_images=2")
    proc = _run(cache, "coref", f"--out_dir={reused}")
    assert "not resuming" in proc.stderr and "flags.max_images: 2 → 0" in proc.stderr
    assert _outputs(reused) == _outputs(fresh)  # not the 2-image partial sums

    proc = _run(cache, "coref", f"--out_dir={reused}")  # every batch already counted
    assert "resuming after batch" in proc.stderr
    assert _outputs(reused) == _outputs(fresh)  # layer names and all


def test_all_killed_in_a_pass_resumes_across_its_passes(tmp_path, cache):
    flags = [
        "--model=uniter",
        "--max_images=3",
        "--batch_size=2",
        "--checkpoint_every=1",
        "--senteval_tasks=past_present",
    ]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(_run, cache, "all", f"--out_dir={clean}", *flags)
        proc = _run(cache, "all", f"--out_dir={killed}", *flags, script=KILL_IN_VG, ok=False)
        first.result()
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert (killed / "_state" / "all.visual_genome.relation" / "uniter").is_dir()
    proc = _run(cache, "all", f"--out_dir={killed}", *flags)
    assert "[all.flickr30k] resuming after batch" in proc.stderr
    assert "[all.visual_genome.relation] resuming after batch 1/2" in proc.stderr
    outputs = _outputs(clean)
    assert len(outputs) >= 12 and _outputs(killed) == outputs


def test_a_real_checkpoint_never_runs_on_demo_data(tmp_path, cache):
    out = tmp_path / "out"
    _run(cache, "fusion", f"--out_dir={out}", "--max_images=1")
    ckpt, data = out / "demo" / "checkpoints" / "uniter", out / "demo" / "data"
    vocab = data / "vocab_cased.txt"

    proc = _run(cache, "fusion", f"--out_dir={out}", f"--checkpoint={ckpt}", ok=False)
    assert proc.returncode != 0 and "needs --flickr30k_root, --vocab" in proc.stderr

    big = tmp_path / "vocab.txt"
    big.write_text(vocab.read_text() + "".join(f"extra{i}\n" for i in range(1000)))
    proc = _run(
        cache,
        "fusion",
        f"--out_dir={out}",
        f"--checkpoint={ckpt}",
        f"--vocab={big}",
        f"--flickr30k_root={data / 'flickr30k'}",
        f"--flickr30k_features={data / 'flickr30k_obj36.tsv'}",
        ok=False,
    )
    assert proc.returncode != 0 and "does not belong to this checkpoint" in proc.stderr, (
        proc.stderr[-2000:]
    )


@pytest.mark.parametrize("flag", ["--batch_size=0", "--max_images=-1"])
def test_bad_counts_are_flag_errors(tmp_path, cache, flag):
    proc = _run(cache, "fusion", f"--out_dir={tmp_path}", flag, ok=False)
    assert proc.returncode != 0 and f"flag {flag}" in proc.stderr
