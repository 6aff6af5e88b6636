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
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from value_jax.api import forward
from value_jax.io import local_checkpointer, quiet_orbax, replace_dir
from value_jax.probes.base import Probe
from value_jax.trace import Layout


class Collected:
    """The rows of one collected key: numpy parts in memory until `spill`, then appended to one
    raw file (`path`), read back as a read-only memmap, so collections larger than memory
    stream from disk."""

    def __init__(self, path: str | None = None):
        self.path, self.parts = path, []
        self.rows_on_disk, self.dtype, self.trail = 0, None, None

    def append(self, rows: np.ndarray) -> None:
        if self.dtype is None:
            self.dtype, self.trail = rows.dtype, rows.shape[1:]
        self.parts.append(rows)

    @property
    def nbytes_in_memory(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def rows(self) -> int:
        return self.rows_on_disk + sum(len(p) for p in self.parts)

    def spill(self) -> None:
        if not self.parts:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "ab") as f:
            for part in self.parts:
                f.write(np.ascontiguousarray(part, self.dtype).tobytes())
        self.rows_on_disk += sum(len(p) for p in self.parts)
        self.parts = []

    def array(self) -> np.ndarray:
        if self.rows_on_disk:
            self.spill()
            return np.memmap(self.path, self.dtype, "r", shape=(self.rows_on_disk, *self.trail))
        return np.concatenate(self.parts) if self.parts else np.zeros((0,))

    def on_disk(self) -> dict:
        """What saved state records of spilled rows (they stay in their file)."""
        return {"rows": self.rows_on_disk, "dtype": np.dtype(self.dtype).str,
                "trail": list(self.trail)}

    def reopen(self, meta: dict) -> None:
        """Takes back `meta["rows"]` rows of the file, cutting off rows written after that save."""
        size = int(np.prod(meta["trail"], dtype=np.int64)) * np.dtype(meta["dtype"]).itemsize
        if not os.path.isfile(self.path) or os.path.getsize(self.path) < meta["rows"] * size:
            raise ValueError(f"saved state counts {meta['rows']} rows in {self.path}, which holds "
                             "fewer; delete the state folder to start afresh")
        os.truncate(self.path, meta["rows"] * size)
        self.dtype, self.trail = np.dtype(meta["dtype"]), tuple(meta["trail"])
        self.rows_on_disk, self.parts = int(meta["rows"]), []


class Accumulator:
    """Host-side running statistics of one probe (float64 sums, concatenated collections).

    With `spill_dir`, collected rows can be moved to disk (`spill`), one file per key."""

    def __init__(self, collect_keys: Sequence[str], spill_dir: str | None = None):
        self.collect_keys = tuple(collect_keys)
        self.sums: dict[str, np.ndarray] = {}
        self.collected = {k: Collected(spill_dir and os.path.join(spill_dir, k + ".bin"))
                          for k in self.collect_keys}
        self.spill_dir = spill_dir

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

    @property
    def nbytes_in_memory(self) -> int:
        return sum(c.nbytes_in_memory for c in self.collected.values())

    def spill(self) -> None:
        for c in self.collected.values():
            c.spill()

    def result(self) -> dict[str, np.ndarray]:
        out = dict(self.sums)
        for k, c in self.collected.items():
            out[k] = c.array()
        return out

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        if self.spill_dir:                          # collected rows stay in their files
            self.spill()
            return {"sum": dict(self.sums)} if self.sums else {}
        collected = {k: v for k, v in self.result().items() if k in self.collect_keys and v.size}
        return {k: v for k, v in (("sum", dict(self.sums)), ("collect", collected)) if v}

    def spilled(self) -> dict:
        return {k: c.on_disk() for k, c in self.collected.items() if c.rows_on_disk}

    def load(self, state: dict[str, dict[str, np.ndarray]], spilled: dict | None = None) -> None:
        for key, value in state.get("sum", {}).items():
            self.sums[key] = np.asarray(value, np.float64)
        for key, value in state.get("collect", {}).items():
            self.collected[key].parts = [np.asarray(value)]
            self.collected[key].dtype = self.collected[key].parts[0].dtype
            self.collected[key].trail = self.collected[key].parts[0].shape[1:]
        for key, meta in (spilled or {}).items():
            self.collected[key].reopen(meta)


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
                raise ValueError(f"the batch size ({x.shape[0] if x.ndim else 'scalar'}) must be a "
                                 f"multiple of this process's {local} devices")
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.tree_util.tree_map(put_local, tree)

    def put(x):
        x = np.asarray(x)
        spec = PartitionSpec("data") if x.ndim and x.shape[0] % n == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(put, tree)


class Progress:
    """One line per `every` batches on stderr: done/total, items/s, elapsed and ETA.

    `skipped` batches (already counted by a resumed run) are not part of the rate or the ETA.
    """

    def __init__(self, total: int | None, label: str, every: int = 10, stream=sys.stderr,
                 skipped: int = 0):
        self.total, self.label, self.every, self.stream = total, label, every, stream
        self.skipped = skipped
        self.start = time.perf_counter()
        self.items = 0

    def update(self, done: int, items: int) -> None:
        self.items += items
        if not self.every or (done % self.every and done != self.total):
            return
        elapsed = time.perf_counter() - self.start
        rate = self.items / max(elapsed, 1e-9)
        eta = ""
        if self.total:
            per_batch = elapsed / max(done - self.skipped, 1)
            eta = f", ETA {_hms(per_batch * (self.total - done))}"
        total = f"/{self.total}" if self.total else ""
        print(f"[{self.label}] batch {done}{total}, {rate:.1f} examples/s, "
              f"elapsed {_hms(elapsed)}{eta}", file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def make_step(model, probes: Sequence[Probe]):
    """The jitted pass: forward → Trace → every probe's step. Returns {probe name: stats}."""
    outputs = tuple(sorted({o for p in probes for o in p.outputs}))

    def step(params, batch, targets):
        trace = forward(model, params, batch, outputs)
        return {p.name: p.step(trace, targets) for p in probes}

    return jax.jit(step)


class NoBatchesError(ValueError):
    """The loader yielded no batch: nothing is left to measure."""


def run_probes(model, params, loader: Iterable, probes: Sequence[Probe], *,
               state_dir: str | None = None, checkpoint_every: int = 20,
               total: int | None = None, label: str = "run", progress_every: int = 10,
               mesh: Mesh | None = None, fingerprint: dict | None = None,
               spill_dir: str | None = None, collect_budget_mb: float | None = None
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
    accs = {p.name: Accumulator(p.collect_keys, spill_here and os.path.join(spill_here, p.name))
            for p in probes}
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
        shutil.rmtree(spill_here, ignore_errors=True)     # rows of an earlier, unused run
    steps, batches = _process_batches(loader, done, jax.process_index(), jax.process_count())
    total = total or steps
    if done:
        log(f"[{label}] resuming after batch {done}{f'/{total}' if total else ''} from "
            f"{state_dir} (inputs match the saved state)")
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
        raise ValueError(f"[{label}] the saved state in {state_dir} counts {done} batches but the "
                         f"loader has only {steps}")
    if state_dir:
        _save_lead(state_dir, accs, seen, names, fp)
    info = {"batches": seen, "devices": int(mesh.devices.size),
            "processes": jax.process_count()}
    results = {}
    for p in probes:
        start = time.perf_counter()
        if p.collect_keys:
            log(f"[{label}] {p.name}: computing the statistics and training the probers on the "
                "collected features")
        results[p.name] = p.finalize(accs[p.name].result(), info)
        if p.collect_keys:
            log(f"[{label}] {p.name}: done in {_hms(time.perf_counter() - start)}")
    if spill_here and not state_dir:
        shutil.rmtree(spill_here, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(spill_dir)                             # when the last process is done
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
        raise ValueError(f"a run over {count} processes needs a loader with a batch plan "
                         f"(`plans` and `collate_plan`, as value_jax.data.loaders' loaders have); "
                         f"got {type(loader).__name__}")

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


# ---- the state fingerprint ----------------------------------------------------------------

def run_fingerprint(model, loader, probes: Sequence[Probe], extra: dict | None = None) -> dict:
    """What saved state must match to be resumed: JSON-able, compared key by key."""
    return {"model_config": _plain(dataclasses.asdict(model.config)),
            "processes": jax.process_count(),
            "probes": {p.name: _plain(p.fingerprint()) for p in probes},
            "loader": loader_fingerprint(loader),
            **_plain(extra or {})}


def loader_fingerprint(loader) -> str | None:
    """A digest of the batches a loader will yield, without reading any region feature.

    A loader may define `fingerprint()`; loaders with a batch plan (`plans` of examples) are
    hashed by batch size and each batch's shape, example ids, tokens and targets; a list of
    `(Batch, targets)` by its arrays. None when the loader cannot be hashed up front.
    """
    if hasattr(loader, "fingerprint"):
        return loader.fingerprint()
    h = hashlib.sha256()
    if hasattr(loader, "plans") and all(hasattr(p, "examples") for p in loader.plans):
        h.update(repr(getattr(loader, "batch_size", None)).encode())
        for plan in loader.plans:
            h.update(repr(plan.shape).encode())
            h.update(np.asarray(plan.indices).tobytes() if plan.indices is not None else b"-")
            for e in plan.examples:
                h.update(e.id.encode() + b"\0" + np.asarray(e.input_ids).tobytes())
                h.update(f"{e.image_id}:{e.num_regions}".encode())
                for k in sorted(e.targets):
                    h.update(k.encode() + np.ascontiguousarray(e.targets[k]).tobytes())
        return h.hexdigest()
    if isinstance(loader, (list, tuple)):
        for leaf in jax.tree_util.tree_leaves(list(loader)):
            a = np.ascontiguousarray(leaf)
            h.update(repr((a.dtype.str, a.shape)).encode() + a.tobytes())
        return h.hexdigest()
    return None


def _plain(x):
    """JSON-able, deterministic form of settings (dataclasses, tuples, numpy values)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {"class": type(x).__name__, **_plain(dataclasses.asdict(x))}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return {"sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(),
                "shape": list(x.shape), "dtype": x.dtype.str}
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return repr(x)


def fingerprint_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """`key: saved → now` for every leaf that differs (nested dicts walked by key)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            short = lambda v: (s if len(s := json.dumps(v)) <= 60 else s[:57] + "...")
            out.append(f"{prefix}{key}: {short(a)} → {short(b)}")
    return out


def _save(state_dir: str, accs: dict[str, Accumulator], done: int, names, fingerprint: dict) -> None:
    """Atomically replaces `state_dir` with the accumulators after `done` batches."""
    tree = {name: st for name in names if (st := accs[name].state())}
    state_dir = os.path.abspath(state_dir)                  # orbax refuses relative paths
    tmp = state_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if tree:
        with quiet_orbax(), local_checkpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "accumulators"), tree)
            ckptr.wait_until_finished()
    with open(os.path.join(tmp, "progress.json"), "w") as f:
        json.dump({"batches_done": done, "probes": list(names),
                   "spilled": {n: s for n in names if (s := accs[n].spilled())}}, f)
    with open(os.path.join(tmp, "fingerprint.json"), "w") as f:
        json.dump(fingerprint, f, indent=1, sort_keys=True)
    replace_dir(tmp, state_dir)


def _save_lead(state_dir: str, accs, done: int, names, fingerprint: dict) -> None:
    """Process 0 writes the state; the others wait so that nobody reads a half-moved folder.
    Every process moves its collected rows to its spill files at the same points, so the row
    counts the state records hold for each."""
    for acc in accs.values():
        if acc.spill_dir:
            acc.spill()
    if jax.process_index() == 0:
        _save(state_dir, accs, done, names, fingerprint)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"value_jax state saved after {done}")


def _restore(state_dir: str, accs: dict[str, Accumulator], names, fingerprint: dict,
             label: str, log=print, spill_dir: str | None = None) -> int:
    """Loads saved accumulators whose fingerprint equals `fingerprint`; returns batches done.

    State made from other inputs is removed (never used), saying which inputs differ."""
    meta_path = os.path.join(state_dir, "progress.json")
    if not os.path.isfile(meta_path):
        return 0
    with open(meta_path) as f:
        meta = json.load(f)
    saved = {}
    fp_path = os.path.join(state_dir, "fingerprint.json")
    if os.path.isfile(fp_path):
        with open(fp_path) as f:
            saved = json.load(f)
    diffs = fingerprint_differences(saved, json.loads(json.dumps(fingerprint))) if saved else \
        ["the saved state has no fingerprint (made by an older version)"]
    if meta["probes"] != list(names):
        diffs.insert(0, f"probes: {meta['probes']} → {list(names)}")
    if diffs:
        listed = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more"
                                              if len(diffs) > 20 else "")
        log(f"[{label}] not resuming: the saved state in {state_dir} was made from other "
            f"inputs:\n  {listed}\n[{label}] removed it; starting from the first batch")
        shutil.rmtree(state_dir)
        if spill_dir:
            shutil.rmtree(spill_dir, ignore_errors=True)
        return 0
    _restore_from(state_dir, accs, names)
    return int(meta["batches_done"])


def _restore_from(state_dir: str, accs: dict[str, Accumulator], names) -> None:
    with open(os.path.join(state_dir, "progress.json")) as f:
        spilled = json.load(f).get("spilled", {})
    ckpt = os.path.join(os.path.abspath(state_dir), "accumulators")
    tree = {}
    if os.path.isdir(ckpt):
        with quiet_orbax(), local_checkpointer() as ckptr:
            tree = ckptr.restore(ckpt)
    for name in names:
        if spilled.get(name) and not accs[name].spill_dir:
            raise ValueError(f"{state_dir} keeps collected rows of {name} in spill files; "
                             "resume it with a collection budget (--collect_budget_mb)")
        accs[name].load(tree.get(name, {}), spilled.get(name))
