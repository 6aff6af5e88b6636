"""The one engine every experiment uses: one jitted pass, several probes, resumable.

    results = run_probes(model, params, loader, [FusionProbe(), CorefProbe(...)], state_dir=...)

Per batch, ONE jitted function runs the forward pass, builds the Trace and calls every probe's
`step(trace, targets)`; only the probes' small statistics leave the device. The batch axis is
sharded over `jax.devices()` (a Mesh with one `data` axis; params replicated), so the same code
runs on one CPU, several CPU devices, a GPU or a TPU slice.

Statistics come in two kinds, declared by each probe:
  sums     — added over batches in float64 on the host (means are sums / counts in `finalize`);
  collect  — per-item arrays `[B, P, ...]` kept where `<key>.mask` `[B, P]` is true, concatenated
             (features for trained probers).
Accumulators are checkpointed every `checkpoint_every` batches (orbax); a killed run restarted
with the same loader skips the batches already counted and finishes with identical numbers.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from value_jax.api import forward


class Probe:
    """Base class: `step` is jittable and returns small statistics; `finalize` makes the Result.

    Subclasses set `name`, `heads` (model heads the step needs), `sum_keys` / `collect_keys`.
    """

    name: str = "probe"
    heads: tuple = ()
    collect_keys: tuple = ()

    def step(self, trace, targets: dict) -> dict[str, jnp.ndarray]:
        raise NotImplementedError

    def finalize(self, stats: dict[str, np.ndarray], info: dict):
        raise NotImplementedError


class Accumulator:
    """Host-side running statistics of one probe (float64 sums, concatenated collections)."""

    def __init__(self, collect_keys: Sequence[str]):
        self.collect_keys = tuple(collect_keys)
        self.sums: dict[str, np.ndarray] = {}
        self.collected: dict[str, list[np.ndarray]] = {k: [] for k in self.collect_keys}

    def update(self, stats: dict[str, Any]) -> None:
        for key, value in stats.items():
            if key.endswith(".mask"):
                continue
            value = np.asarray(value)
            if key in self.collect_keys:
                mask = np.asarray(stats[key + ".mask"]).astype(bool)
                self.collected[key].append(value[mask])
            elif key in self.sums:
                self.sums[key] += value.astype(np.float64)
            else:
                self.sums[key] = value.astype(np.float64)

    def result(self) -> dict[str, np.ndarray]:
        out = dict(self.sums)
        for k, parts in self.collected.items():
            out[k] = np.concatenate(parts) if parts else np.zeros((0,))
        return out

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        collected = {k: v for k, v in self.result().items() if k in self.collect_keys and v.size}
        return {k: v for k, v in (("sum", dict(self.sums)), ("collect", collected)) if v}

    def load(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        for key, value in state.get("sum", {}).items():
            self.sums[key] = np.asarray(value, np.float64)
        for key, value in state.get("collect", {}).items():
            self.collected[key] = [np.asarray(value)]


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def _shard(tree, mesh: Mesh):
    """Places the leading (batch) axis of every array across the mesh's `data` axis."""
    n = mesh.devices.size

    def put(x):
        x = np.asarray(x)
        spec = PartitionSpec("data") if x.ndim and x.shape[0] % n == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(put, tree)


class Progress:
    """One line per `every` batches on stderr: done/total, items/s, elapsed and ETA."""

    def __init__(self, total: int | None, label: str, every: int = 10, stream=sys.stderr):
        self.total, self.label, self.every, self.stream = total, label, every, stream
        self.start = time.perf_counter()
        self.items = 0

    def update(self, done: int, items: int) -> None:
        self.items += items
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.items / max(elapsed, 1e-9)
        eta = ""
        if self.total:
            eta = f", ETA {_hms(elapsed / max(done, 1) * (self.total - done))}"
        total = f"/{self.total}" if self.total else ""
        print(f"[{self.label}] batch {done}{total}, {rate:.1f} examples/s, "
              f"elapsed {_hms(elapsed)}{eta}", file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def make_step(model, probes: Sequence[Probe]):
    """The jitted pass: forward → Trace → every probe's step. Returns {probe name: stats}."""
    heads = tuple(sorted({h for p in probes for h in p.heads}))

    def step(params, batch, targets):
        trace = forward(model, params, batch, heads)
        return {p.name: p.step(trace, targets) for p in probes}

    return jax.jit(step)


def run_probes(model, params, loader: Iterable, probes: Sequence[Probe], *,
               state_dir: str | None = None, checkpoint_every: int = 20,
               total: int | None = None, label: str = "run", progress_every: int = 10,
               mesh: Mesh | None = None) -> dict[str, Any]:
    """Runs every probe over `loader` (an iterable of `(Batch, targets)`) in one pass.

    Returns {probe name: probe.finalize(stats, info)}. With `state_dir`, accumulators are saved
    every `checkpoint_every` batches and a rerun resumes after the last saved batch; the loader
    must yield the same batches in the same order (seeded), which every loader here does.
    """
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise ValueError(f"probe names must be unique, got {names}")
    mesh = mesh or data_mesh()
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    step = make_step(model, probes)
    accs = {p.name: Accumulator(p.collect_keys) for p in probes}
    done = _restore(state_dir, accs, names) if state_dir else 0
    if total is None and hasattr(loader, "__len__"):
        total = len(loader)
    if done:
        print(f"[{label}] resuming after batch {done} from {state_dir}", file=sys.stderr)
    progress = Progress(total, label, progress_every)
    n_examples = 0
    for i, (batch, targets) in enumerate(loader):
        if i < done:
            continue
        stats = step(params, _shard(batch, mesh), _shard(targets, mesh))
        stats = jax.device_get(stats)
        for name, s in stats.items():
            accs[name].update(s)
        n_examples += int(np.asarray(batch.text_mask).shape[0])
        progress.update(i + 1, int(np.asarray(batch.text_mask).shape[0]))
        if state_dir and (i + 1) % checkpoint_every == 0:
            _save(state_dir, accs, i + 1, names)
    done_batches = max(done, (i + 1) if "i" in locals() else 0)
    if state_dir:
        _save(state_dir, accs, done_batches, names)
    info = {"batches": done_batches, "devices": int(mesh.devices.size)}
    return {p.name: p.finalize(accs[p.name].result(), info) for p in probes}


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every step of a save at INFO; a progress line per checkpoint is enough here."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(min(level, absl_logging.WARNING))  # lower = quieter in absl
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _save(state_dir: str, accs: dict[str, Accumulator], done: int, names) -> None:
    """Atomically replaces `state_dir` with the accumulators after `done` batches."""
    tree = {name: st for name in names if (st := accs[name].state())}
    state_dir = os.path.abspath(state_dir)                  # orbax refuses relative paths
    tmp = state_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if tree:
        with _quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "accumulators"), tree)
            ckptr.wait_until_finished()
    with open(os.path.join(tmp, "progress.json"), "w") as f:
        json.dump({"batches_done": done, "probes": list(names)}, f)
    old = state_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(state_dir):
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def _restore(state_dir: str, accs: dict[str, Accumulator], names) -> int:
    meta_path = os.path.join(state_dir, "progress.json")
    if not os.path.isfile(meta_path):
        return 0
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["probes"] != list(names):
        raise ValueError(f"{state_dir} holds a run of probes {meta['probes']}, not {list(names)}; "
                         "use another --out_dir or delete it")
    ckpt = os.path.join(os.path.abspath(state_dir), "accumulators")
    if os.path.isdir(ckpt):
        with _quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(ckpt)
        for name in names:
            accs[name].load(tree.get(name, {}))
    return int(meta["batches_done"])
