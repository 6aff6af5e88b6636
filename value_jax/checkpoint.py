"""The converted-checkpoint directory: `config.json` + an orbax checkpoint of the Flax params.

Layout of `DIR`:
  config.json   the model config (`model_type` uniter|lxmert, sizes, `heads` present) plus
                `conversion` provenance (source file, format, report summary) and
                `conversion.content_sha256`, the hash of the params (`params_sha256`)
  params/       orbax checkpoint of the Flax `params` tree

`checkpoint_id(DIR)` names the weights: equal ids mean equal float32 params, whatever the source
file was called or where the directory lives.

`save` writes into a temporary sibling directory and renames it into place, so a failed or
interrupted conversion leaves nothing at `DIR`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from value_jax.models import build_model
from value_jax.runner import _local_checkpointer, _quiet_orbax
from value_jax.models.configs import config_from_dict

HASH_KEY = "content_sha256"  # under `conversion` in config.json


def params_sha256(params: Any) -> str:
    """sha256 over the float32 params: per leaf, in sorted `a/b/c` path order, the path, dtype,
    shape and little-endian C-order bytes, each length-prefixed so no two trees collide."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    flat = {"/".join(str(_key_name(k)) for k in keys): v for keys, v in leaves}
    for path in sorted(flat):
        arr = np.ascontiguousarray(np.asarray(flat[path], np.float32)).astype("<f4", copy=False)
        _update(h, path.encode(), arr.dtype.str.encode(), repr(arr.shape).encode(), arr.tobytes())
    return h.hexdigest()


def _update(h, *parts: bytes) -> None:
    """Length-prefixed, so that ("ab", "c") and ("a", "bc") hash differently."""
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)


def _key_name(key):
    """`DictKey('kernel')` -> `kernel`: the same path for a dict, FrozenDict or orbax restore."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def _files_sha256(path: str) -> str:
    """sha256 over `config.json` and every file under `params/`: sorted relative paths + bytes."""
    h = hashlib.sha256()
    files = ["config.json"]
    for root, dirs, names in os.walk(os.path.join(path, "params")):
        dirs.sort()
        files += [os.path.relpath(os.path.join(root, n), path) for n in names]
    for rel in sorted(files):
        with open(os.path.join(path, rel), "rb") as f:
            data = f.read()
        _update(h, rel.replace(os.sep, "/").encode(), data)
    return h.hexdigest()


def checkpoint_id(path: str) -> str:
    """The identity of the checkpoint directory `path`: its recorded `conversion.content_sha256`
    (a hash of the params alone, see `params_sha256`), or, for a directory written before that
    was recorded, a sha256 of `config.json` and every file under `params/`."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a converted checkpoint")
    with open(cfg_path) as f:
        meta = json.load(f)
    recorded = (meta.get("conversion") or {}).get(HASH_KEY)
    return recorded if recorded else _files_sha256(path)


def save(out_dir: str, config, params: Any, heads=(), extra: dict | None = None,
         overwrite: bool = False) -> str:
    """Atomically writes `config` (+ `heads`, + `extra` metadata, + the params hash) and
    `params` to `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        meta = dataclasses.asdict(config)
        meta["heads"] = list(heads)
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
        meta["conversion"] = {**(extra or {}), HASH_KEY: params_sha256(params)}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        with _quiet_orbax(), _local_checkpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
            ckptr.wait_until_finished()
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(path: str):
    """Returns `(config, heads, metadata)` from `path/config.json`."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{cfg_path} not found: {path} is not a converted checkpoint "
            "(make one with `python -m checkpoints_convert`)")
    with open(cfg_path) as f:
        meta = json.load(f)
    heads = tuple(meta.pop("heads", ()))
    extra = meta.pop("conversion", {})
    return config_from_dict(meta), heads, extra


def load(path: str):
    """`model, params = load(DIR)` for a directory written by `save` / the converter.

    `model.available_heads` lists the pre-training heads whose weights the checkpoint holds.
    """
    config, heads, _ = read_config(path)
    with _quiet_orbax(), _local_checkpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(path), "params"))
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    return build_model(config, heads), params
