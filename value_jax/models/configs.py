"""Model configurations: frozen dataclasses (hashable, so a model is a valid static jit argument).

`base` configs are the released checkpoints' sizes; `tiny` ones keep every structural feature
(all layer kinds, all output heads) at a size tests can run in milliseconds.

Every per-model fact the rest of the project needs is read from the config, never from a
`model_type` switch: `display_name`, `outputs` (the pre-training output heads the model can
compute), `feature_dim` (detector feature size), `mrc_output` and `mrc_classes` (the masked-region
classification head and its class count), `mrc_background` (whether class 0 is the detector's
background), `region_mask_embedding` (whether a masked region also gets a learned embedding),
`lowercase` (vocabulary casing of the released checkpoint) and `single_stream`.
These are class constants or properties, so `config.json` holds the sizes only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class UniterConfig:
    """UNITER-base (`config/uniter-base.json`; bert-base-cased vocabulary of 28,996)."""

    vocab_size: int = 28996
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    img_dim: int = 2048
    pos_dim: int = 7
    num_region_labels: int = 1601  # MRC head: the detector's 1601 classes, background at 0
    dtype: str = "float32"
    model_type: str = "uniter"

    display_name: ClassVar[str] = "UNITER"
    outputs: ClassVar[tuple[str, ...]] = ("mlm", "mrc", "mrfr", "itm")
    mrc_output: ClassVar[str] = "mrc"
    mrc_background: ClassVar[bool] = True  # 1601-way: background at 0, then the VG classes
    region_mask_embedding: ClassVar[bool] = True  # a masked region gets img mask_embedding[1]
    lowercase: ClassVar[bool] = False  # bert-base-cased
    single_stream: ClassVar[bool] = True

    @property
    def feature_dim(self) -> int:
        return self.img_dim

    @property
    def mrc_classes(self) -> int:
        return self.num_region_labels

    @classmethod
    def tiny(cls, **kw) -> "UniterConfig":
        base = dict(
            vocab_size=99,
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            img_dim=24,
            num_region_labels=11,
        )
        base.update(kw)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class LxmertConfig:
    """LXMERT-base (`Epoch20_LXRT.pth`: 9 language, 5 vision (relational), 5 cross layers)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    l_layers: int = 9
    r_layers: int = 5
    x_layers: int = 5
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    num_qa_labels: int = 0  # the 9500-way VQA answer head is not needed by any analysis here
    dtype: str = "float32"
    model_type: str = "lxmert"

    display_name: ClassVar[str] = "LXMERT"
    outputs: ClassVar[tuple[str, ...]] = ("mlm", "obj", "attr", "feat", "itm")
    mrc_output: ClassVar[str] = "obj"
    mrc_background: ClassVar[bool] = False  # 1600-way over the VG classes, no background
    region_mask_embedding: ClassVar[bool] = False  # a masked region is its zeroed feature only
    lowercase: ClassVar[bool] = True  # bert-base-uncased
    single_stream: ClassVar[bool] = False

    @property
    def feature_dim(self) -> int:
        return self.visual_feat_dim

    @property
    def mrc_classes(self) -> int:
        return self.num_object_labels

    @classmethod
    def tiny(cls, **kw) -> "LxmertConfig":
        base = dict(
            vocab_size=99,
            hidden_size=32,
            num_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            l_layers=2,
            r_layers=2,
            x_layers=2,
            visual_feat_dim=24,
            num_object_labels=13,
            num_attr_labels=7,
        )
        base.update(kw)
        return cls(**base)


CONFIGS = {"uniter": UniterConfig, "lxmert": LxmertConfig}


def config_to_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def config_from_dict(d: dict[str, Any]):
    """Rebuilds a config from its JSON dict; unknown fields are refused by name."""
    model_type = d.get("model_type")
    if model_type not in CONFIGS:
        raise ValueError(
            f"config 'model_type' must be one of {sorted(CONFIGS)}, got {model_type!r}"
        )
    cls = CONFIGS[model_type]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {model_type} config fields: {unknown}")
    return cls(**d)
