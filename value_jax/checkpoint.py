"""The converted-checkpoint directory: `config.json` + an orbax checkpoint of the Flax params.

Layout of `DIR`:
  config.json   the model config (`model_type` uniter|lxmert, sizes, `outputs` present) plus
                `conversion` provenance (source file, format, report summary) and
                `conversion.content_sha256`, the hash of the params (`params_sha256`)
  params/       orbax checkpoint of the Flax `params` tree

`checkpoint_id(DIR)` names the weights: equal ids mean equal float32 params, whatever the source
file was called or where the directory lives.

`save` writes into a temporary sibling directory `.DIR.tmp-<pid>-*` and renames it into place,
so a failed or interrupted conversion (SIGINT, SIGTERM) leaves nothing at `DIR`, and it replaces
only a directory that is itself a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from typing import Any

import jax
import numpy as np

from value_jax.io import local_checkpointer, quiet_orbax
from value_jax.models import build_model
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


def save(
    out_dir: str,
    config,
    params: Any,
    outputs=(),
    extra: dict | None = None,
    overwrite: bool = False,
) -> str:
    """Atomically writes `config` (+ `outputs`, + `extra` metadata, + the params hash) and
    `params` to `out_dir`.

    `overwrite` replaces an existing checkpoint directory (or an empty one), never anything else
    (`replace_refusal`). SIGINT and SIGTERM during the write remove the temporary folder and
    raise KeyboardInterrupt; temporary folders of `out_dir` left by dead processes are removed
    first (`sweep_stale_tmp`).
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
        if (reason := replace_refusal(out_dir)) is not None:
            raise FileExistsError(
                f"{out_dir} is not a value_jax checkpoint directory, so it "
                f"will not be replaced: {reason}"
            )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    sweep_stale_tmp(out_dir)
    with interruptible():
        tmp = tempfile.mkdtemp(prefix=f"{_tmp_prefix(out_dir)}{os.getpid()}-", dir=parent)
        old = tmp + "-old"
        try:
            meta = dataclasses.asdict(config)
            meta["outputs"] = list(outputs)
            params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
            meta["conversion"] = {**(extra or {}), HASH_KEY: params_sha256(params)}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            with quiet_orbax(), local_checkpointer() as ckptr:
                ckptr.save(os.path.join(tmp, "params"), params)
                ckptr.wait_until_finished()
            if os.path.lexists(out_dir):
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
        except BaseException:
            with _signals_blocked():  # a second Ctrl-C must not cut the clean-up short
                if os.path.exists(old) and not os.path.lexists(out_dir):
                    os.replace(old, out_dir)  # interrupted between the two renames
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


# ---- what may be replaced, and what a killed save leaves ---------------------------------------


def replace_refusal(path: str) -> str | None:
    """None when `path` may be replaced by a new checkpoint: an empty directory, or a value_jax
    checkpoint directory (config.json with a `model_type`, a params/ folder, nothing else).
    Otherwise what is there, for the refusal."""
    if os.path.islink(path):
        return f"it is a symbolic link to {os.readlink(path)}"
    if not os.path.isdir(path):
        return "it is a file, not a directory"
    entries = sorted(os.listdir(path))
    problems = []
    if not entries:
        return None
    if other := [e for e in entries if e not in ("config.json", "params")]:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        problems.append(f"it holds {shown}, which a checkpoint directory does not")
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        problems.append("it has no config.json")
    else:
        try:
            with open(cfg) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if not model_type:
            problems.append("its config.json has no model_type")
    if not os.path.isdir(os.path.join(path, "params")):
        problems.append("it has no params/ folder")
    return "; ".join(problems) or None


def _tmp_prefix(out_dir: str) -> str:
    return f".{os.path.basename(out_dir)}.tmp-"


def sweep_stale_tmp(out_dir: str) -> list[str]:
    """Removes the `.<name>.tmp-<pid>-*` folders beside `out_dir` that a killed save left: those
    of processes no longer running (and any without a pid, from older versions). Returns them."""
    out_dir = os.path.abspath(out_dir)
    parent, prefix = os.path.dirname(out_dir), _tmp_prefix(out_dir)
    if not os.path.isdir(parent):
        return []
    removed = []
    for name in sorted(os.listdir(parent)):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-")[0]
        if pid.isdigit() and _running(int(pid)):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def interruptible():
    """SIGTERM (and SIGINT) raise `KeyboardInterrupt("SIGTERM")` inside the block, so that
    `except`/`finally` clean-ups run instead of the process dying mid-write. Signals a parent
    set to be ignored stay ignored; outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in _SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def _signals_blocked():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def read_config(path: str):
    """Returns `(config, outputs, metadata)` from `path/config.json` (`outputs`: the output heads
    with weights; directories written before the key was renamed hold it as `heads`)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{cfg_path} not found: {path} is not a converted checkpoint "
            "(make one with `python -m checkpoints_convert`)"
        )
    with open(cfg_path) as f:
        meta = json.load(f)
    legacy = meta.pop("heads", ())
    outputs = tuple(meta.pop("outputs", legacy))
    extra = meta.pop("conversion", {})
    return config_from_dict(meta), outputs, extra


def load(path: str):
    """`model, params = load(DIR)` for a directory written by `save` / the converter.

    `model.available_outputs` lists the pre-training output heads whose weights it holds.
    """
    config, outputs, _ = read_config(path)
    with quiet_orbax(), local_checkpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(path), "params"))
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    return build_model(config, outputs), params
