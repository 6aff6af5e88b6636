"""The explorer's on-disk store: examples written once, read lazily one at a time.

Opening a store reads two small files (`meta.json`, `examples.jsonl`); an example's attention
and statistics are read from LMDB when it is asked for, and the hidden states of one layer are a
memory-mapped float16 table, so a store of 1,000 base-size examples opens in milliseconds and
never sits in memory whole.

The writer (`StoreWriter`) and the reader (`Store`) of the format stay in this one module (about
500 lines): the layout below is their contract, and keeping both sides next to it is what keeps
them in step.

Layout of `<store>/` (schema `value_jax.explore/1`):

  meta.json        model type, attention map names in forward order with the modality of their
                   query and key axes (`joint` = UNITER's `[text | regions]`, `text`, `image`),
                   head count, hidden-state groups, projection method, probe names
  examples.jsonl   one line per example: index, id, image_id, caption, image (path or ""),
                   width, height, n_text, n_regions, added (typed in the app), tokens (the
                   text word pieces, [CLS] ... [SEP]), regions (one label per region: `r3`,
                   or `r3 dog` with a detector class vocabulary)
  records.lmdb/    key `%08d` → msgpack record:
                     boxes         [R, 4] float32 x1, y1, x2, y2 in image pixels
                     attention     name → [H, Q, K] float16 over real tokens only (padding cut);
                                   UNITER's joint maps are `[n_text + n_regions]` square
                     stats         probe name → key → that probe's `step` output for this example
                                   alone (the runner's sums for a batch of one)
                     hidden_rows   group → first row of this example in the group's table
  hidden/<g>.f16   [N, D] float16, the hidden states of every token of every example, rows
                   appended example by example (text tokens first, then regions)
  hidden/<g>.rows  [N, 3] int32 (example index, 0 text / 1 region, position)
  projection/<g>.npz     mean [D], components [2, D] of the 2-D projection fitted across the
                         store, method name
  projection/<g>.coords  [N, 2] float32: every row of the group's table projected
  aggregate.npz    `<probe>/<key>`: the per-example statistics summed over the dataset examples
                   (typed captions left out), i.e. what the runner accumulates for results.json

Groups are the hidden-state layer names with LXMERT's two streams of one stage joined
(`cross3` holds `cross3.lang` and `cross3.visn`, `embeddings` both embedding outputs), so a
projection fitted on a group places text and regions of one stage in one space.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from pathlib import Path

import lmdb
import msgpack
import numpy as np

from value_jax.io import write_json_atomic
from value_jax.names import LayerId

SCHEMA = "value_jax.explore/1"
_MAP_SIZE = 1 << 40  # LMDB reserves address space only; the file grows with the data


def pack_array(a: np.ndarray) -> dict:
    a = np.asarray(a)  # (np.ascontiguousarray would make a 0-d array 1-d)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes(order="C")}


def unpack_array(d: dict) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(tuple(d["shape"]))


def _pack_tree(tree):
    if isinstance(tree, dict):
        return {str(k): _pack_tree(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        return {"__array__": pack_array(tree)}
    return tree


def _unpack_tree(tree):
    if isinstance(tree, dict):
        if "__array__" in tree:
            return unpack_array(tree["__array__"])
        return {k: _unpack_tree(v) for k, v in tree.items()}
    return tree


def group_of(hidden_name: str) -> str:
    """The projection group of a hidden-state name (see the module docstring)."""
    layer = LayerId.parse(hidden_name)
    if layer.is_embeddings:
        return "embeddings"
    return f"cross{layer.index}" if layer.stack == "cross" else hidden_name


def map_axes(name: str) -> tuple[str, str]:
    """(query, key) modality of an attention map: `joint` (UNITER's `[text slot | regions]`),
    `text` or `image`."""
    directions = LayerId.parse(name).directions()
    if len(directions) > 1:
        return "joint", "joint"
    side = {"t": "text", "v": "image"}
    return side[directions[0][0]], side[directions[0][2]]


class StoreWriter:
    """Writes a new store (an existing one at `path` is replaced) or appends to an open one."""

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        (self.path / "hidden").mkdir(parents=True, exist_ok=True)
        (self.path / "projection").mkdir(parents=True, exist_ok=True)
        for f in [
            self.path / "examples.jsonl",
            *(self.path / "hidden").iterdir(),
            *(self.path / "projection").iterdir(),
        ]:
            if f.is_file():
                f.unlink()
        with _ENVS_LOCK:
            stale = _ENVS.pop(os.path.realpath(self.path / "records.lmdb"), None)
        if stale is not None:
            stale[0].close()
        if (self.path / "records.lmdb").exists():
            import shutil

            shutil.rmtree(self.path / "records.lmdb")
        self.meta = {"schema": SCHEMA, **meta, "n_examples": 0, "projection": None}
        # No fsync per example: the store is rebuilt from scratch if a write is interrupted.
        self.env = lmdb.open(
            str(self.path / "records.lmdb"),
            map_size=_MAP_SIZE,
            subdir=True,
            sync=False,
            metasync=False,
        )
        self.count = 0
        self.aggregate: dict[str, np.ndarray] = {}
        self._rows = collections.Counter()
        self._index = open(self.path / "examples.jsonl", "w", encoding="utf-8")
        self._hidden = {}

    def add(
        self,
        info: dict,
        record: dict,
        hidden: dict[str, tuple[np.ndarray, np.ndarray]],
        in_aggregate: bool = True,
    ) -> int:
        """Adds one example. info: the examples.jsonl fields; record: tokens, regions, boxes,
        attention, stats; hidden: group → ([n, D] states, [n, 2] (modality, position))."""
        index = self.count
        rows = {}
        for group, (states, where) in hidden.items():
            f = self._hidden.get(group)
            if f is None:
                f = self._hidden[group] = (
                    open(self.path / "hidden" / f"{group}.f16", "ab"),
                    open(self.path / "hidden" / f"{group}.rows", "ab"),
                )
            rows[group] = int(self._rows[group])
            f[0].write(np.ascontiguousarray(states, np.float16).tobytes())
            table = np.concatenate(
                [np.full((len(where), 1), index, np.int32), np.asarray(where, np.int32)], axis=1
            )
            f[1].write(table.tobytes())
            self._rows[group] += len(states)
            self.meta.setdefault("hidden_dim", int(states.shape[1]))
        record = dict(record, hidden_rows=rows)
        with self.env.begin(write=True) as txn:
            txn.put(b"%08d" % index, msgpack.packb(_pack_tree(record), use_bin_type=True))
        self._index.write(json.dumps({"index": index, **info}) + "\n")
        if in_aggregate:
            for probe, stats in record["stats"].items():
                for key, value in stats.items():
                    k = f"{probe}/{key}"
                    v = np.asarray(value, np.float64)
                    self.aggregate[k] = self.aggregate[k] + v if k in self.aggregate else v
        self.count += 1
        return index

    def close(self, projection: str = "pca") -> None:
        for fs in self._hidden.values():
            for f in fs:
                f.close()
        self._index.close()
        self.meta["n_examples"] = self.count
        self.meta["groups"] = sorted(self._rows, key=lambda g: self.meta["group_order"].index(g))
        self.meta["projection"] = fit_projections(self.path, self.meta, projection)
        np.savez(self.path / "aggregate.npz", **self.aggregate)
        self.env.sync(True)
        self.env.close()
        _write_json(self.path / "meta.json", self.meta)


def _write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj, indent=1)


def _hidden_table(path: Path, group: str, dim: int, mode="r"):
    f = path / "hidden" / f"{group}.f16"
    n = f.stat().st_size // (2 * dim)
    states = np.memmap(f, np.float16, mode, shape=(n, dim)) if n else np.zeros((0, dim), np.float16)
    rows = np.fromfile(path / "hidden" / f"{group}.rows", np.int32).reshape(-1, 3)
    return states, rows


def fit_projections(path: Path, meta: dict, method: str = "pca") -> str:
    """Fits one 2-D projection per group over every stored row and writes the coordinates.

    PCA by default (the two leading eigenvectors of the rows' covariance, accumulated in
    float64 over chunks; the sign fixed so the largest loading is positive); `umap` when umap-learn is installed. The fit reads one group's
    table at a time."""
    if method == "umap":
        try:
            import umap  # noqa: F401
        except ImportError:
            method = "pca"
    dim = meta.get("hidden_dim", 0)
    chunk = 8192
    for group in meta.get("groups", []):
        states, _ = _hidden_table(path, group, dim)
        n = len(states)
        # Covariance accumulated in float64 over chunks of rows: one pass, one [D, D] in memory.
        total, cov = np.zeros(dim), np.zeros((dim, dim))
        for i in range(0, n, chunk):
            x = np.nan_to_num(np.asarray(states[i : i + chunk], np.float64))
            total += x.sum(0)
            cov += x.T @ x
        mean = total / max(n, 1)
        cov = cov / max(n, 1) - np.outer(mean, mean)
        if n >= 2:
            _, vecs = np.linalg.eigh(cov)
            comps = vecs[:, ::-1][:, :2].T  # largest variance first
        else:
            comps = np.eye(2, dim)
        sign = np.sign(comps[np.arange(2), np.argmax(np.abs(comps), axis=1)])
        comps = (comps * np.where(sign == 0, 1, sign)[:, None]).astype(np.float32)
        mean = mean.astype(np.float32)
        coords = np.concatenate(
            [
                (np.nan_to_num(np.asarray(states[i : i + chunk], np.float32)) - mean) @ comps.T
                for i in range(0, n, chunk)
            ]
            or [np.zeros((0, 2))]
        )
        if method == "umap" and n > 15:
            import umap

            coords = umap.UMAP(n_components=2, random_state=0).fit_transform(
                np.asarray(states, np.float32)
            )
        np.savez(
            path / "projection" / f"{group}.npz",
            mean=mean,
            components=comps,
            method=np.array(method),
        )
        coords.astype(np.float32).tofile(path / "projection" / f"{group}.coords")
    return method


class Store:
    """A store opened for reading (and for appending typed captions)."""

    def __init__(self, path, cache_size: int = 16):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is no explorer store ({meta_path} missing): "
                "write one with python -m experiments.explore --export_only"
            )
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("schema") != SCHEMA:
            raise ValueError(
                f"{meta_path}: schema {self.meta.get('schema')!r}, expected {SCHEMA!r}"
            )
        with open(self.path / "examples.jsonl", encoding="utf-8") as f:
            self.examples = [json.loads(line) for line in f if line.strip()]
        self.env = _open_env(self.path / "records.lmdb")
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.RLock()
        self._tables: dict = {}
        self._unit = None
        self._labels: dict = {}
        self._aggregate = None

    # ---- metadata -------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.meta["model_type"]

    @property
    def single_stream(self) -> bool:
        """Whether the maps are joint `[text slot | regions]` softmaxes (UNITER)."""
        return all(axes["query"] == "joint" for axes in self.meta["maps"].values())

    @property
    def map_names(self) -> list[str]:
        return list(self.meta["maps"])

    @property
    def groups(self) -> list[str]:
        return list(self.meta.get("groups", []))

    def __len__(self) -> int:
        return len(self.examples)

    # ---- examples -------------------------------------------------------------------------
    def record(self, index: int) -> dict:
        """One example's record (see the module docstring), read on first use, LRU-cached."""
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        with self.env.begin() as txn:
            raw = txn.get(b"%08d" % index)
        if raw is None:
            raise IndexError(f"{self.path}: no example {index} (the store holds {len(self)})")
        rec = _unpack_tree(msgpack.unpackb(raw, raw=False))
        rec["info"] = self.examples[index]
        rec["tokens"], rec["regions"] = rec["info"]["tokens"], rec["info"]["regions"]
        with self._lock:
            self._cache[index] = rec
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return rec

    def aggregate(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-example statistics summed over the dataset examples, by probe then key."""
        if self._aggregate is None:
            out: dict = collections.defaultdict(dict)
            with np.load(self.path / "aggregate.npz") as z:
                for k in z.files:
                    probe, key = k.split("/", 1)
                    out[probe][key] = z[k]
            self._aggregate = dict(out)
        return self._aggregate

    # ---- hidden states --------------------------------------------------------------------
    def hidden(self, group: str):
        """`(states [N, D] float16 memmap, rows [N, 3] int32, coords [N, 2] float32)`."""
        with self._lock:
            return self._group_table(group)

    def _group_table(self, group: str):
        """`hidden` with the lock already held."""
        if group not in self._tables:
            states, rows = _hidden_table(self.path, group, self.meta["hidden_dim"])
            coords = np.fromfile(self.path / "projection" / f"{group}.coords", np.float32).reshape(
                -1, 2
            )
            self._tables[group] = (states, rows, coords)
        return self._tables[group]

    def example_hidden(self, index: int, group: str) -> tuple[np.ndarray, np.ndarray]:
        """One example's rows of a group: `(states [n, D] float32, where [n, 2])`."""
        rec = self.record(index)
        start = rec["hidden_rows"].get(group)
        if start is None:
            return np.zeros((0, self.meta["hidden_dim"]), np.float32), np.zeros((0, 2), np.int32)
        states, rows, _ = self.hidden(group)
        n = rec["info"]["n_text"] + rec["info"]["n_regions"]
        end = start
        while end < len(rows) and end < start + n and rows[end, 0] == index:
            end += 1
        return np.asarray(states[start:end], np.float32), rows[start:end, 1:]

    def nearest(self, group: str, row: int, k: int = 8, other_examples: bool = True):
        """The k rows of `group` nearest to `row` by cosine similarity of hidden states
        (in the model's space, not the projection), by default from other examples only.
        Returns `[(row, similarity)]`."""
        _, rows, _ = self.hidden(group)
        unit = self._unit_rows(group)
        sim = unit @ unit[row]
        sim[row] = -np.inf
        if other_examples:
            sim[rows[:, 0] == rows[row, 0]] = -np.inf
        k = min(k, int(np.isfinite(sim).sum()))
        best = np.argpartition(-sim, k - 1)[:k] if k else np.zeros(0, int)
        best = best[np.argsort(-sim[best])]
        return [(int(r), float(sim[r])) for r in best]

    def _unit_rows(self, group: str) -> np.ndarray:
        """The group's hidden states as float32 unit rows, kept for the last group asked for
        only (one layer of the store in memory, never all)."""
        with self._lock:
            if (
                self._unit is None
                or self._unit[0] != group
                or len(self._unit[1]) != len(self._group_table(group)[1])
            ):
                x = np.asarray(self._group_table(group)[0], np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
                self._unit = (group, x)
            return self._unit[1]

    def labels(self, group: str) -> list[str]:
        """The word piece or region label of every row of a group's table."""
        _, rows, _ = self.hidden(group)
        with self._lock:
            cached = self._labels.get(group)
            if cached is None or len(cached) != len(rows):
                cached = [
                    self.examples[int(e)]["tokens" if k == 0 else "regions"][int(p)]
                    for e, k, p in rows
                ]
                self._labels = {group: cached}
            return cached

    # ---- appending ------------------------------------------------------------------------
    def append(self, info: dict, record: dict, hidden: dict) -> int:
        """Adds a typed example: projected with the store's fitted projections (not refitted),
        left out of the aggregate."""
        with self._lock:
            index = len(self.examples)
            rows = {}
            for group, (states, where) in hidden.items():
                f16 = self.path / "hidden" / f"{group}.f16"
                rows[group] = f16.stat().st_size // (2 * self.meta["hidden_dim"])
                with open(f16, "ab") as f:
                    f.write(np.ascontiguousarray(states, np.float16).tobytes())
                table = np.concatenate(
                    [np.full((len(where), 1), index, np.int32), np.asarray(where, np.int32)], axis=1
                )
                with open(self.path / "hidden" / f"{group}.rows", "ab") as f:
                    f.write(table.tobytes())
                with np.load(self.path / "projection" / f"{group}.npz") as p:
                    coords = (np.asarray(states, np.float16).astype(np.float32) - p["mean"]) @ p[
                        "components"
                    ].T
                with open(self.path / "projection" / f"{group}.coords", "ab") as f:
                    f.write(coords.astype(np.float32).tobytes())
                self._tables.pop(group, None)
            record = dict(record, hidden_rows=rows)
            with self.env.begin(write=True) as txn:
                txn.put(b"%08d" % index, msgpack.packb(_pack_tree(record), use_bin_type=True))
            entry = {"index": index, **info}
            with open(self.path / "examples.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            self.examples.append(entry)
            self.meta["n_examples"] = len(self.examples)
            _write_json(self.path / "meta.json", self.meta)
            return index

    def close(self) -> None:
        _close_env(self.path / "records.lmdb")


# LMDB allows one environment per file per process: stores opened on one path share it.
_ENVS: dict[str, list] = {}
_ENVS_LOCK = threading.Lock()


def _open_env(path: Path):
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        if key not in _ENVS:
            _ENVS[key] = [lmdb.open(key, map_size=_MAP_SIZE, subdir=True, lock=True), 0]
        _ENVS[key][1] += 1
        return _ENVS[key][0]


def _close_env(path: Path) -> None:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                entry[0].close()
                del _ENVS[key]


def open_store(path, cache_size: int = 16) -> Store:
    return Store(path, cache_size)


def store_bytes(path) -> int:
    """Bytes on disk under a store (allocated blocks, so LMDB's reserved map is not counted)."""
    return sum(
        min(f.stat().st_size, f.stat().st_blocks * 512)
        for f in Path(path).rglob("*")
        if f.is_file()
    )


__all__ = [
    "SCHEMA",
    "Store",
    "StoreWriter",
    "open_store",
    "group_of",
    "map_axes",
    "store_bytes",
    "pack_array",
    "unpack_array",
]
