"""What a run keeps between batches and between runs: the accumulators and the saved state.

  Accumulator   one probe's statistics: sums added in float64, collected rows concatenated, rows
                beyond the memory budget spilled to raw files (`Collected`) read back as memmaps
  run_fingerprint / fingerprint_differences
                what saved state must match to be resumed, and how two fingerprints differ
  _save_lead / _restore / _restore_from
                the state folder (orbax for the accumulators, JSON for progress and the
                fingerprint), written atomically by process 0 and read by every process

`value_jax.runner.run_probes` is the only caller; the functions are split out so that the engine
reads as the loop it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from value_jax.io import local_checkpointer, quiet_orbax, replace_dir
from value_jax.probes.base import Probe


class LayerFiles:
    """A spilled `[N, L, ...]` collection as `L` read-only memmaps `[N, ...]`, one file per
    layer, so that reading one layer's rows (what the probers do) touches only that layer's
    file. `x[rows, l]` reads rows of layer `l`; any other indexing, and `np.asarray(x)`, builds
    the whole `[N, L, ...]` array in memory."""

    def __init__(self, layers: Sequence[np.ndarray]):
        self.layers = list(layers)

    @property
    def shape(self) -> tuple:
        first = self.layers[0]
        return (first.shape[0], len(self.layers), *first.shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.layers[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def layer(self, index: int) -> np.ndarray:
        return self.layers[index]

    def __array__(self, dtype=None, copy=None):
        out = np.stack(self.layers, axis=1)
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], (int, np.integer)):
            return self.layers[key[1]][key[0]]
        return np.asarray(self)[key]


class Collected:
    """The rows of one collected key: numpy parts in memory until `spill`, then appended to raw
    files, read back as read-only memmaps, so collections larger than memory stream from disk.
    Rows of two or more dimensions (`[L, D]` per item: a vector per layer) go layer-major, one
    file per layer next to `path` (`LayerFiles`); flatter rows to `path` itself."""

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

    @property
    def layer_major(self) -> bool:
        return len(self.trail) >= 2

    def files(self) -> list[str]:
        """The raw files the spilled rows are in: one per layer when layer-major."""
        if not self.layer_major:
            return [self.path]
        root, ext = os.path.splitext(self.path)
        return [f"{root}.layer{i:03d}{ext}" for i in range(self.trail[0])]

    def spill(self) -> None:
        if not self.parts:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for i, path in enumerate(self.files()):
            with open(path, "ab") as f:
                for part in self.parts:
                    rows = part[:, i] if self.layer_major else part
                    f.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.rows_on_disk += sum(len(p) for p in self.parts)
        self.parts = []

    def array(self):
        if self.rows_on_disk:
            self.spill()
            trail = self.trail[1:] if self.layer_major else self.trail
            maps = [
                np.memmap(path, self.dtype, "r", shape=(self.rows_on_disk, *trail))
                for path in self.files()
            ]
            return LayerFiles(maps) if self.layer_major else maps[0]
        return np.concatenate(self.parts) if self.parts else np.zeros((0,))

    def on_disk(self) -> dict:
        """What saved state records of spilled rows (they stay in their files)."""
        return {
            "rows": self.rows_on_disk,
            "dtype": np.dtype(self.dtype).str,
            "trail": list(self.trail),
            "layout": "layer-major" if self.layer_major else "rows",
        }

    def reopen(self, meta: dict) -> None:
        """Takes back `meta["rows"]` rows of the files, cutting off rows written after that
        save."""
        self.dtype, self.trail = np.dtype(meta["dtype"]), tuple(meta["trail"])
        layout = "layer-major" if self.layer_major else "rows"
        if meta.get("layout", "rows") != layout:
            raise ValueError(
                f"saved state keeps {self.path}'s rows as {meta.get('layout', 'rows')}, this "
                f"version as {layout}; delete the state folder to start afresh"
            )
        trail = self.trail[1:] if self.layer_major else self.trail
        size = int(np.prod(trail, dtype=np.int64)) * self.dtype.itemsize
        for path in self.files():
            if not os.path.isfile(path) or os.path.getsize(path) < meta["rows"] * size:
                raise ValueError(
                    f"saved state counts {meta['rows']} rows in {path}, which holds "
                    "fewer; delete the state folder to start afresh"
                )
            os.truncate(path, meta["rows"] * size)
        self.rows_on_disk, self.parts = int(meta["rows"]), []


class Accumulator:
    """Host-side running statistics of one probe (float64 sums, concatenated collections).

    With `spill_dir`, collected rows can be moved to disk (`spill`), one file per key."""

    def __init__(self, collect_keys: Sequence[str], spill_dir: str | None = None):
        self.collect_keys = tuple(collect_keys)
        self.sums: dict[str, np.ndarray] = {}
        self.collected = {
            k: Collected(spill_dir and os.path.join(spill_dir, k + ".bin"))
            for k in self.collect_keys
        }
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
        if self.spill_dir:  # collected rows stay in their files
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


# ---- the state fingerprint ----------------------------------------------------------------


def run_fingerprint(model, loader, probes: Sequence[Probe], extra: dict | None = None) -> dict:
    """What saved state must match to be resumed: JSON-able, compared key by key."""
    return {
        "model_config": _plain(dataclasses.asdict(model.config)),
        "processes": jax.process_count(),
        "probes": {p.name: _plain(p.fingerprint()) for p in probes},
        "loader": loader_fingerprint(loader),
        **_plain(extra or {}),
    }


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
        return {
            "sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(),
            "shape": list(x.shape),
            "dtype": x.dtype.str,
        }
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
            short = lambda v: s if len(s := json.dumps(v)) <= 60 else s[:57] + "..."
            out.append(f"{prefix}{key}: {short(a)} → {short(b)}")
    return out


def _save(
    state_dir: str, accs: dict[str, Accumulator], done: int, names, fingerprint: dict
) -> None:
    """Atomically replaces `state_dir` with the accumulators after `done` batches."""
    tree = {name: st for name in names if (st := accs[name].state())}
    state_dir = os.path.abspath(state_dir)  # orbax refuses relative paths
    tmp = state_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if tree:
        with quiet_orbax(), local_checkpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "accumulators"), tree)
            ckptr.wait_until_finished()
    with open(os.path.join(tmp, "progress.json"), "w") as f:
        json.dump(
            {
                "batches_done": done,
                "probes": list(names),
                "spilled": {n: s for n in names if (s := accs[n].spilled())},
            },
            f,
        )
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


def _restore(
    state_dir: str,
    accs: dict[str, Accumulator],
    names,
    fingerprint: dict,
    label: str,
    log=print,
    spill_dir: str | None = None,
) -> int:
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
    diffs = (
        fingerprint_differences(saved, json.loads(json.dumps(fingerprint)))
        if saved
        else ["the saved state has no fingerprint (made by an older version)"]
    )
    if meta["probes"] != list(names):
        diffs.insert(0, f"probes: {meta['probes']} → {list(names)}")
    if diffs:
        listed = "\n  ".join(diffs[:20]) + (
            f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        )
        log(
            f"[{label}] not resuming: the saved state in {state_dir} was made from other "
            f"inputs:\n  {listed}\n[{label}] removed it; starting from the first batch"
        )
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
            raise ValueError(
                f"{state_dir} keeps collected rows of {name} in spill files; "
                "resume it with a collection budget (--collect_budget_mb)"
            )
        accs[name].load(tree.get(name, {}), spilled.get(name))
