"""Flax UNITER and LXMERT. `build_model(config)` picks the class from `config.model_type`.

`value_jax.models.configs` (the configs and every per-model fact) is light and may be imported by
any part of the project; the Flax modules (`uniter`, `lxmert`, `layers`) load only when a model
is built or one of their names is first used here.
"""

from __future__ import annotations

import importlib

import numpy as np

from value_jax.batch import Batch
from value_jax.models.configs import LxmertConfig, UniterConfig

# model_type -> (module, class name); `UNITER_OUTPUTS` etc. are the configs' `outputs`.
MODEL_CLASSES = {
    "uniter": ("value_jax.models.uniter", "Uniter"),
    "lxmert": ("value_jax.models.lxmert", "Lxmert"),
}
UNITER_OUTPUTS = UniterConfig.outputs
LXMERT_OUTPUTS = LxmertConfig.outputs


def model_class(model_type: str):
    module, name = MODEL_CLASSES[model_type]
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str):
    for module, cls in MODEL_CLASSES.values():
        if name == cls:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'value_jax.models' has no attribute {name!r}")


def build_model(config, outputs=None):
    """The Flax module for `config`; `outputs` = the pre-training output heads whose weights the
    checkpoint holds (default all of `config.outputs`)."""
    cls = model_class(config.model_type)
    return cls(config, available_outputs=tuple(config.outputs if outputs is None else outputs))


def dummy_batch(config, batch_size: int = 1, text_len: int = 4, num_regions: int = 3) -> Batch:
    feat_dim = config.feature_dim
    return Batch.create(
        np.zeros((batch_size, text_len), np.int32),
        np.ones((batch_size, text_len), np.int32),
        np.zeros((batch_size, num_regions, feat_dim), np.float32),
        np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (batch_size, num_regions, 1)),
    )


def init_params(model, key):
    """Random params of `model` covering all of its available output heads."""
    return model.init(key, dummy_batch(model.config), outputs=model.available_outputs)["params"]


def param_shapes(model):
    """The params tree as `jax.ShapeDtypeStruct`s, without allocating (free at base size)."""
    import jax

    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


__all__ = [
    "Uniter",
    "Lxmert",
    "UniterConfig",
    "LxmertConfig",
    "UNITER_OUTPUTS",
    "LXMERT_OUTPUTS",
    "build_model",
    "init_params",
    "param_shapes",
    "dummy_batch",
]
