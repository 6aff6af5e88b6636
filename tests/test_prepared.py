"""Prepare once, probe many times: `experiments.prepare` writes TFDS datasets, and an
experiment reading them with `--tfds_data_dir` gives the results of reading the raw files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(module, *flags, ok=True):
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *flags],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_prepared_records_give_the_raw_files_results(tmp_path):
    raw, prep = tmp_path / "raw", tmp_path / "prepared"
    common = ["--model=lxmert", "--max_images=9"]
    _run("prepare", f"--out_dir={prep}", f"--tfds_data_dir={prep / 'tfds'}", *common)
    for analysis in ("coref", "relation"):
        _run(analysis, f"--out_dir={raw}", *common)
        proc = _run(analysis, f"--out_dir={prep}", f"--tfds_data_dir={prep / 'tfds'}", *common)
        assert "reading the prepared dataset" in proc.stderr
        for name in [analysis] if analysis == "coref" else [analysis, "relation_mismatched"]:
            a = (raw / name / "lxmert" / "results.json").read_text()
            b = (prep / name / "lxmert" / "results.json").read_text()
            assert a == b, name

    # Other settings name another dataset: it is never read in place of the one asked for.
    proc = _run(
        "coref",
        f"--out_dir={prep}",
        f"--tfds_data_dir={prep / 'tfds'}",
        *common,
        "--seed=1",
        ok=False,
    )
    assert proc.returncode != 0 and "no coref dataset prepared with these settings" in proc.stderr
