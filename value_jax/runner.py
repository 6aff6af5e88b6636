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

Saved state is fingerprinted by everything that changes the numbers: the model config, every
probe's settings, the loader's examples (ids, tokens, targets, batch plan) and whatever the caller
adds (checkpoint identity, data files, flags). State with another fingerprint is never used: the
run says which inputs differ, removes it and starts afresh. Probes learn their layer names from
the model config (`Probe.bind`) before the first batch, so a resumed run with no batch left
finalizes exactly as the run that saved the state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from value_jax.api import forward
from value_jax.probes.base import Probe
from value_jax.progress import Progress, hms
from value_jax.state import Accumulator, _restore, _restore_from, _save_lead, run_fingerprint
from value_jax.trace import Layout


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def _shard(tree, mesh: Mesh):
    """Places the leading (batch) axis of every array across the mesh's `data` axis.

    With several processes each passes its own rows and the global batch is their
    concatenation in process order."""
    n = mesh.devices.size
    if jax.process_count() > 1:
        local = len(mesh.local_devices)
        sharding = NamedSharding(mesh, PartitionSpec("data"))

        def put_local(x):
            x = np.asarray(x)
            if not x.ndim or x.shape[0] % local:
                raise ValueError(
                    f"the batch size ({x.shape[0] if x.ndim else 'scalar'}) must be a "
                    f"multiple of this process's {local} devices"
                )
            return jax.make_array_from_process_local_data(sharding, x)

        return jax.tree_util.tree_map(put_local, tree)

    def put(x):
        x = np.asarray(x)
        spec = PartitionSpec("data") if x.ndim and x.shape[0] % n == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(put, tree)


def make_step(model, probes: Sequence[Probe]):
    """The jitted pass: forward → Trace → every probe's step. Returns {probe name: stats}."""
    outputs = tuple(sorted({o for p in probes for o in p.outputs}))

    def step(params, batch, targets):
        trace = forward(model, params, batch, outputs)
        return {p.name: p.step(trace, targets) for p in probes}

    return jax.jit(step)


class NoBatchesError(ValueError):
    """The loader yielded no batch: nothing is left to measure."""


def run_probes(
    model,
    params,
    loader: Iterable,
    probes: Sequence[Probe],
    *,
    state_dir: str | None = None,
    checkpoint_every: int = 20,
    total: int | None = None,
    label: str = "run",
    progress_every: int = 10,
    mesh: Mesh | None = None,
    fingerprint: dict | None = None,
    spill_dir: str | None = None,
    collect_budget_mb: float | None = None,
) -> dict[str, Any]:
    """Runs every probe over `loader` (an iterable of `(Batch, targets)`) in one pass.

    Returns {probe name: probe.finalize(stats, info)}. With `state_dir`, accumulators are saved
    every `checkpoint_every` batches and a rerun resumes after the last saved batch; the loader
    must yield the same batches in the same order (seeded), which every loader here does.
    `fingerprint` adds the caller's inputs (checkpoint identity, data files, flags) to what the
    saved state must match (see `run_fingerprint`).

    Collected per-item features beyond `collect_budget_mb` (held in memory, all probes together)
    are appended to files under `spill_dir` and reach `finalize` as read-only memmaps, so host
    memory stays flat in the number of examples. With `state_dir` the spill defaults to
    `<state_dir>.spill` and resumes with the state; without one it is removed after the run.

    Several processes (`jax.distributed`): each collates only its share of the loader's batch
    plan (`process_schedule`), the global batch spans every process's devices, the statistics
    leave the jitted step reduced or gathered, so every process holds the same accumulators and
    returns the same results; only process 0 writes the state.
    """
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise ValueError(f"probe names must be unique, got {names}")
    layout = Layout.from_config(model.config)
    for p in probes:
        p.bind(layout)
    mesh = mesh or data_mesh()
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    step = make_step(model, probes)
    if state_dir and collect_budget_mb is not None:
        spill_dir = spill_dir or os.path.abspath(state_dir) + ".spill"
    spill_here = spill_dir and os.path.join(spill_dir, f"p{jax.process_index()}")
    budget = None if collect_budget_mb is None or not spill_dir else collect_budget_mb * 2**20
    accs = {
        p.name: Accumulator(p.collect_keys, spill_here and os.path.join(spill_here, p.name))
        for p in probes
    }
    lead = jax.process_index() == 0
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if lead else (lambda msg: None)
    done = 0
    if state_dir:
        fp = run_fingerprint(model, loader, probes, fingerprint)
        done = _restore(state_dir, accs, names, fp, label, log, spill_dir) if lead else 0
        if jax.process_count() > 1:
            # Every process must see `state_dir` (a shared file system or bucket): the others
            # load what process 0 found usable.
            done = int(multihost_utils.broadcast_one_to_all(np.int32(done)))
            if not lead and done:
                _restore_from(state_dir, accs, names)
            multihost_utils.sync_global_devices("value_jax state restored")
    if spill_here and not done:
        shutil.rmtree(spill_here, ignore_errors=True)  # rows of an earlier, unused run
    steps, batches = _process_batches(loader, done, jax.process_index(), jax.process_count())
    total = total or steps
    if done:
        log(
            f"[{label}] resuming after batch {done}{f'/{total}' if total else ''} from "
            f"{state_dir} (inputs match the saved state)"
        )
    progress = Progress(total, label, progress_every if lead else 0, skipped=done)
    seen = done
    for i, batch, targets in batches:
        stats = step(params, _shard(batch, mesh), _shard(targets, mesh))
        stats = _fetch(stats)
        for name, s in stats.items():
            accs[name].update(s)
        if budget is not None and sum(a.nbytes_in_memory for a in accs.values()) > budget:
            for a in accs.values():
                a.spill()
        seen = i + 1
        progress.update(i + 1, int(np.asarray(batch.text_mask).shape[0]) * jax.process_count())
        if state_dir and (i + 1) % checkpoint_every == 0:
            _save_lead(state_dir, accs, i + 1, names, fp)
    if seen == 0:
        raise NoBatchesError(f"[{label}] no examples left: the loader yielded no batch")
    if steps is not None and done > steps:
        raise ValueError(
            f"[{label}] the saved state in {state_dir} counts {done} batches but the "
            f"loader has only {steps}"
        )
    if state_dir:
        _save_lead(state_dir, accs, seen, names, fp)
    info = {"batches": seen, "devices": int(mesh.devices.size), "processes": jax.process_count()}
    results = {}
    for p in probes:
        start = time.perf_counter()
        if p.collect_keys:
            log(
                f"[{label}] {p.name}: computing the statistics and training the probers on the "
                "collected features"
            )
        # `log`: progress lines of a long finalize (the prober fits), printed by the lead only.
        say = lambda msg, name=p.name: log(f"[{label}] {name}: {msg}")
        results[p.name] = p.finalize(accs[p.name].result(), dict(info, log=say))
        if p.collect_keys:
            log(f"[{label}] {p.name}: done in {hms(time.perf_counter() - start)}")
    if spill_here and not state_dir:
        shutil.rmtree(spill_here, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(spill_dir)  # when the last process is done
    return results


# ---- batches per process ------------------------------------------------------------------


def process_schedule(shapes: Sequence, count: int) -> list[list[int | None]]:
    """Which planned batch each of `count` processes runs at each step.

    Consecutive batches of one static shape are dealt out in groups of `count`, process p taking
    the p-th, so a step's global batch (processes in order) holds the same rows in the same
    order as `count` consecutive steps of a one-process run. A group short of `count` batches
    gives the remaining processes None: a batch of that shape with every row masked.
    """
    steps, i = [], 0
    while i < len(shapes):
        j = i
        while j < len(shapes) and shapes[j] == shapes[i]:
            j += 1
        steps += [[k if k < j else None for k in range(s, s + count)] for s in range(i, j, count)]
        i = j
    return steps


def _process_batches(loader, done: int, index: int, count: int):
    """`(number of steps or None, iterator of (step, batch, targets))` from step `done` on, for
    process `index` of `count`. Loaders with a batch plan collate only the batches this process
    runs (skipped steps are not read at all)."""
    if hasattr(loader, "plans") and hasattr(loader, "collate_plan"):
        steps = process_schedule([p.shape for p in loader.plans], count)

        def planned():
            for s in range(done, len(steps)):
                k = steps[s][index]
                if k is None:
                    yield (s, *_blank(*loader.collate_plan(steps[s][0])))
                else:
                    yield (s, *loader.collate_plan(k))

        return len(steps), planned()
    if count > 1:
        raise ValueError(
            f"a run over {count} processes needs a loader with a batch plan "
            f"(`plans` and `collate_plan`, as value_jax.data.loaders' loaders have); "
            f"got {type(loader).__name__}"
        )

    def iterated():
        for i, (batch, targets) in enumerate(loader):
            if i >= done:
                yield i, batch, targets

    return (len(loader) if hasattr(loader, "__len__") else None), iterated()


def _blank(batch, targets):
    """The batch with every row masked out (zeros everywhere, example index -1)."""
    zero = lambda tree: jax.tree_util.tree_map(np.zeros_like, tree)
    targets = zero(targets)
    if "example_index" in targets:
        targets["example_index"] = targets["example_index"] - 1
    return zero(batch), targets


def _fetch(stats):
    """The step's statistics as host numpy; with several processes every process gets all of
    them (sums are replicated already; collected per-item arrays are gathered)."""
    if jax.process_count() == 1:
        return jax.device_get(stats)
    return multihost_utils.process_allgather(stats, tiled=True)
