"""One vocabulary for layers, directions and streams: models, Trace, probes and tables all use it.

A layer is a `LayerId(stack, index, part)`:

  stack  `layer`  UNITER's single stream
         `lang`, `visn`  LXMERT's language and relational (vision) encoders
         `cross`  LXMERT's cross-modality layers
  index  the layer number as the papers count (1-based); 0 is the embedding output
  part   "" or, in a cross layer, which map or stream: `l2v`, `v2l`, `lang_self`, `visn_self`
         (attention maps), `lang`, `visn` (hidden states)

Three spellings of one layer, each with one use:

  `LayerId.name`   what the model sows and what every results.json lists:
                   `layer3`, `embeddings`, `lang2`, `visn.embeddings`, `cross2.v2l`, `cross2.lang`
  `LayerId.label`  the short label of tables, figures and head labels: `3`, `emb`, `lang2`,
                   `visn.emb`, `x2` (every part of cross layer 2)
  `head_label(layer, head)`  a head in tables and JSON: `3-2`, `x2-4`, `visn2-1` (head 1-based)

Parameters keep the original checkpoints' 0-based module names (`encoder/layer_2` is `layer3`);
only the converter's tables speak of them.

Directions are query→key over the two modalities: `t2v` = text queries attending to region keys.
LXMERT's sown cross maps keep the original code's stream words: `l2v` is direction `t2v`,
`v2l` is `v2t` (`CROSS_ATTENTION`). The modalities are `text` and `image`; LXMERT's streams for
them are `lang` and `visn` (`STREAM`).
"""

from __future__ import annotations

import dataclasses
import functools

DIRECTIONS = ("t2t", "t2v", "v2t", "v2v")
MODALITIES = ("text", "image")
STREAM = {"text": "lang", "image": "visn"}  # modality → LXMERT stream
MODALITY = {stream: m for m, stream in STREAM.items()}  # LXMERT stream → modality
CROSS_ATTENTION = {"l2v": "t2v", "v2l": "v2t", "lang_self": "t2t", "visn_self": "v2v"}
CROSS_HIDDEN = ("lang", "visn")
STACKS = ("layer", "lang", "visn", "cross")

# The two kinds of sown intermediates: `attention.<name>` `[B, H, Q, K]`, `hidden.<name>` `[B, S, D]`.
ATTENTION = "attention"
HIDDEN = "hidden"

_PARTS = (*CROSS_ATTENTION, *CROSS_HIDDEN)
_STAGE = {"layer": 1, "lang": 1, "visn": 2, "cross": 3}
_EMBEDDINGS = "embeddings"


@functools.total_ordering
@dataclasses.dataclass(frozen=True)
class LayerId:
    """One layer output or attention map; sorts in forward order (embeddings, language layers,
    vision layers, cross layers in call order)."""

    stack: str
    index: int
    part: str = ""

    def __post_init__(self):
        if self.stack not in STACKS:
            raise ValueError(f"unknown layer stack {self.stack!r}; expected one of {STACKS}")
        if self.index < 0 or (self.stack == "cross" and self.index == 0):
            raise ValueError(f"bad layer index {self.index} for stack {self.stack!r}")
        if (self.stack == "cross") != bool(self.part) or (self.part and self.part not in _PARTS):
            raise ValueError(f"bad layer part {self.part!r} for stack {self.stack!r}")

    @classmethod
    def parse(cls, name: str) -> "LayerId":
        """The inverse of `name`; anything else is refused naming it."""
        head, _, part = name.partition(".")
        if name == _EMBEDDINGS:
            return cls("layer", 0)
        if part == _EMBEDDINGS and head in STREAM.values():
            return cls(head, 0)
        stack = head.rstrip("0123456789")
        digits = head[len(stack) :]
        try:
            if stack in STACKS and digits and not digits.startswith("0"):
                return cls(stack, int(digits), part)
        except ValueError:
            pass
        raise ValueError(
            f"not a layer name: {name!r} (expected e.g. 'layer3', 'embeddings', "
            "'lang2', 'visn.embeddings', 'cross2.v2l', 'cross2.lang')"
        )

    @property
    def name(self) -> str:
        if self.index == 0:
            return _EMBEDDINGS if self.stack == "layer" else f"{self.stack}.{_EMBEDDINGS}"
        return f"{self.stack}{self.index}" + (f".{self.part}" if self.part else "")

    @property
    def label(self) -> str:
        if self.stack == "layer":
            return str(self.index) if self.index else "emb"
        if self.stack == "cross":
            return f"x{self.index}"
        return f"{self.stack}{self.index}" if self.index else f"{self.stack}.emb"

    @property
    def is_embeddings(self) -> bool:
        return self.index == 0

    def directions(self) -> tuple[str, ...]:
        """The attention directions a map of this layer holds: all four for UNITER's joint map,
        one for each LXMERT map."""
        if self.stack == "layer":
            return DIRECTIONS
        if self.stack == "cross":
            return (CROSS_ATTENTION[self.part],) if self.part in CROSS_ATTENTION else ()
        return ("t2t",) if self.stack == "lang" else ("v2v",)

    def modalities(self) -> tuple[str, ...]:
        """The modalities whose hidden states this layer output holds."""
        if self.stack == "layer":
            return MODALITIES
        stream = self.part if self.stack == "cross" else self.stack
        return (MODALITY[stream],) if stream in MODALITY else ()

    def _key(self):
        if self.index == 0:
            return (0, 0, 0, self.name)
        return (
            _STAGE[self.stack],
            self.index,
            _PARTS.index(self.part) if self.part else 0,
            self.name,
        )

    def __lt__(self, other: "LayerId") -> bool:
        return self._key() < other._key()

    def __str__(self) -> str:
        return self.name


def sort_names(names) -> list[str]:
    """Layer names in forward order."""
    return sorted(names, key=LayerId.parse)


def label(name: str) -> str:
    """The display label of a layer name: `label("cross2.v2l") == "x2"`."""
    return LayerId.parse(name).label


def head_label(name: str, head: int) -> str:
    """`head_label("layer3", 1) == "3-2"`: a 0-based head of a layer, as tables and JSON show it."""
    return f"{label(name)}-{int(head) + 1}"


def sown(kind: str, name: str) -> str:
    """The intermediates key a model sows `kind` (`ATTENTION` or `HIDDEN`) of layer `name` under."""
    if kind not in (ATTENTION, HIDDEN):
        raise ValueError(f"unknown intermediate kind {kind!r}")
    return f"{kind}.{name}"


def unsown(key: str) -> tuple[str, str]:
    """`(kind, layer name)` of a sown intermediates key."""
    kind, _, name = key.partition(".")
    if kind not in (ATTENTION, HIDDEN) or not name:
        raise ValueError(f"not a sown intermediate: {key!r}")
    return kind, name
