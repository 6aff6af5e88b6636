"""Flax UNITER and LXMERT. `build_model(config)` picks the class from `config.model_type`."""
from __future__ import annotations

import jax
import numpy as np

from value_jax.batch import Batch
from value_jax.models.configs import LxmertConfig, UniterConfig
from value_jax.models.lxmert import LXMERT_HEADS, Lxmert
from value_jax.models.uniter import UNITER_HEADS, Uniter

MODEL_CLASSES = {"uniter": (Uniter, UNITER_HEADS), "lxmert": (Lxmert, LXMERT_HEADS)}


def build_model(config, heads=None):
    """The Flax module for `config`; `heads` = the pre-training heads with weights (default all)."""
    cls, all_heads = MODEL_CLASSES[config.model_type]
    return cls(config, available_heads=tuple(all_heads if heads is None else heads))


def dummy_batch(config, batch_size: int = 1, text_len: int = 4, num_regions: int = 3) -> Batch:
    feat_dim = config.img_dim if config.model_type == "uniter" else config.visual_feat_dim
    return Batch.create(
        np.zeros((batch_size, text_len), np.int32), np.ones((batch_size, text_len), np.int32),
        np.zeros((batch_size, num_regions, feat_dim), np.float32),
        np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (batch_size, num_regions, 1)))


def init_params(model, key):
    """Random params of `model` covering all of its available heads."""
    return model.init(key, dummy_batch(model.config), heads=model.available_heads)["params"]


def param_shapes(model):
    """The params tree as `jax.ShapeDtypeStruct`s, without allocating (free at base size)."""
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


__all__ = ["Uniter", "Lxmert", "UniterConfig", "LxmertConfig", "UNITER_HEADS", "LXMERT_HEADS",
           "build_model", "init_params", "param_shapes", "dummy_batch"]
