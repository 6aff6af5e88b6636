"""`python -m experiments.explore` as the README writes it: the demo store is written, the log
line gives the URL, and the app answers there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_explore_command_serves_the_demo(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.explore",
            "--model=lxmert",
            "--port=0",
            f"--out_dir={tmp_path}",
            "--max_images=1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        url = None
        deadline = time.time() + 240
        while time.time() < deadline and url is None:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            m = re.search(r"serving the explorer at (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert url, "no URL logged:\n" + "".join(lines)
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert "value_jax explorer" in page
        image = urllib.request.urlopen(url + "explore/image/0", timeout=30).read()
        assert image[:4] == b"\x89PNG"  # the demo's drawn image
        assert "planted heads" in "".join(lines)
        store = tmp_path / "explore" / "lxmert" / "store"
        assert (store / "meta.json").is_file() and (store / "records.lmdb").is_dir()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
