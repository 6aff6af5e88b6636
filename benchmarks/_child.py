"""Shared by the memory benchmarks: one measurement in a fresh child process, so that each
peak is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def measure(script: str, spec: dict) -> dict:
    """Runs `script --child=<spec as JSON>` on the CPU and returns the JSON object its last
    output line holds; exits with the child's error output if it failed."""
    proc = subprocess.run(
        [sys.executable, script, f"--child={json.dumps(spec)}"],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])
