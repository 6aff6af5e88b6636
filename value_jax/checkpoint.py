"""The converted-checkpoint directory: `config.json` + an orbax checkpoint of the Flax params.

Layout of `DIR`:
  config.json   the model config (`model_type` uniter|lxmert, sizes, `heads` present) plus
                `conversion` provenance (source file, format, report summary)
  params/       orbax checkpoint of the Flax `params` tree

`save` writes into a temporary sibling directory and renames it into place, so a failed or
interrupted conversion leaves nothing at `DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from value_jax.models import build_model
from value_jax.runner import _quiet_orbax
from value_jax.models.configs import config_from_dict


def save(out_dir: str, config, params: Any, heads=(), extra: dict | None = None,
         overwrite: bool = False) -> str:
    """Atomically writes `config` (+ `heads`, + `extra` metadata) and `params` to `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        meta = dataclasses.asdict(config)
        meta["heads"] = list(heads)
        if extra:
            meta["conversion"] = extra
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
        with _quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
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
    with _quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(path), "params"))
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    return build_model(config, heads), params
