"""The model-agnostic view of one forward pass: attention blocks, hidden states, token layout.

This is the only module that knows how each model's sown intermediates map onto the common view
(see the docstrings of `value_jax.models.uniter` / `.lxmert` for the sown names). A probe asks for
`trace.blocks("v2t")` and gets `[L, B, H, Q, K]` plus the layer names; it never looks at a model.

Layer names, directions and modalities are those of `value_jax.names`.
Directions are written query→key: `t2v` = text queries attending to region keys.
  UNITER: every block is a slice of the layer's joint softmax over `[text slot | regions]`, so a
    slice keeps the joint normalisation (a t2v row sums to the text query's mass on regions).
    Layers `layer1..layer12` (1-based names; index 0 in the array is layer1).
  LXMERT: `t2t` = the language layers then each cross layer's language self-attention,
    `v2v` = the relational layers then each cross layer's vision self-attention,
    `t2v` / `v2t` = the cross layers' language→vision / vision→language cross-attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np

from value_jax import names as N
from value_jax.names import DIRECTIONS, MODALITIES, LayerId


@flax.struct.dataclass
class Trace:
    """Attention maps, hidden states and layout of one batch (a pytree: it can leave a jit).

    Attributes:
      attention: name → `[B, H, Q, K]` float32, names as the model sows them without the
        `attention.` prefix (UNITER `layer3`; LXMERT `lang3`, `visn2`, `cross4.v2l`, ...).
      hidden: name → `[B, S, D]` (UNITER `embeddings`, `layer3`; LXMERT `lang.embeddings`,
        `lang3`, `visn.embeddings`, `visn2`, `cross4.lang`, `cross4.visn`).
      text_mask: `[B, T]` 1 on `[CLS] w1..wm [SEP]`. region_mask: `[B, R]` 1 on real regions.
      outputs: the model's outputs (sequence outputs, pooled output, requested head logits).
      input_ids: `[B, T]` and region_feats `[B, R, F]`: what went in (control tasks, raw-feature
        baselines).
      model_type: `uniter` or `lxmert` (static).
    """

    attention: dict[str, Any]
    hidden: dict[str, Any]
    text_mask: Any
    region_mask: Any
    outputs: dict[str, Any]
    input_ids: Any
    region_feats: Any
    model_type: str = flax.struct.field(pytree_node=False)

    @classmethod
    def from_intermediates(
        cls, model_type: str, intermediates: dict, batch, outputs=None
    ) -> "Trace":
        scope = intermediates[model_type]
        attention, hidden = {}, {}
        for key, value in scope.items():
            kind, name = N.unsown(key)
            (attention if kind == N.ATTENTION else hidden)[name] = value[0]
        return cls(
            attention,
            hidden,
            batch.text_mask,
            batch.region_mask,
            dict(outputs or {}),
            batch.input_ids,
            batch.region_feats,
            model_type,
        )

    # ---- layout -------------------------------------------------------------------------
    @property
    def text_len(self) -> int:
        return self.text_mask.shape[1]

    @property
    def word_mask(self):
        """`[B, T]` bool: the words t1..tm, i.e. real text tokens minus [CLS] (0) and the last
        real token ([SEP])."""
        t = jnp.arange(self.text_len)[None, :]
        sep = self.sep_index[:, None]
        return (self.text_mask > 0) & (t > 0) & (t < sep)

    @property
    def sep_index(self):
        """`[B]` position of [SEP]: the last real token of the text slot."""
        return jnp.sum(self.text_mask, axis=1).astype(jnp.int32) - 1

    def token_masks(self) -> dict[str, Any]:
        """Masks over the joint `[text slot | regions]` axis: `cls`, `words`, `sep`, `regions`."""
        t = jnp.arange(self.text_len)[None, :]
        zeros_r = jnp.zeros_like(self.region_mask, dtype=bool)
        zeros_t = jnp.zeros_like(self.text_mask, dtype=bool)
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        return {
            "cls": cat((t == 0) & (self.text_mask > 0), zeros_r),
            "words": cat(self.word_mask, zeros_r),
            "sep": cat(t == self.sep_index[:, None], zeros_r),
            "regions": cat(zeros_t, self.region_mask > 0),
        }

    # ---- attention ------------------------------------------------------------------------
    @property
    def layout(self) -> "Layout":
        """The names of what this pass sowed (equal to `Layout.from_config(model.config)`)."""
        return Layout(self.model_type, tuple(self.attention), tuple(self.hidden))

    def layer_names(self, direction: str) -> list[str]:
        """Names of the layers `blocks(direction)` stacks, in order (1-based, as papers number them)."""
        return self.layout.layer_names(direction)

    def blocks(self, direction: str, layers: list[str] | None = None):
        """`([L, B, H, Q, K], names)`: the `direction` block of every layer that has one.

        `layers` restricts to (and orders by) the given layer names.
        """
        names = self.layer_names(direction) if layers is None else list(layers)
        q, k = self._slot(direction[0]), self._slot(direction[2])
        maps = [self.attention[n][:, :, q, k] if _joint(n) else self.attention[n] for n in names]
        return jnp.stack(maps), names

    def _slot(self, modality: str) -> slice:
        """Where `modality` (`t` / `v`, or `text` / `image`) lies on a joint `[text slot | regions]` axis."""
        return slice(0, self.text_len) if modality[0] == "t" else slice(self.text_len, None)

    def attention_numpy(self) -> dict[str, np.ndarray]:
        """Every attention map by name, as numpy `[B, H, Q, K]` (copies the whole set to host)."""
        return {n: np.asarray(self.attention[n]) for n in N.sort_names(self.attention)}

    # ---- hidden states --------------------------------------------------------------------
    def hidden_names(self, modality: str) -> list[str]:
        """Layer names of `hidden_states(modality)`, embedding output first."""
        return self.layout.hidden_names(modality)

    def hidden_states(self, modality: str, layers: list[str] | None = None):
        """`([L, B, S, D], names)`: the hidden states of `modality`'s tokens per layer (the text
        slot `[B, T, D]` or the regions `[B, R, D]`), embedding output first."""
        names = self.hidden_names(modality) if layers is None else list(layers)
        sl = self._slot(modality)
        states = [self.hidden[n][:, sl] if _joint(n) else self.hidden[n] for n in names]
        return jnp.stack(states), names

    def paired_layers(self) -> list[tuple[str, str]]:
        """(text layer, image layer) name pairs at which both modalities have an output of the same
        layer: UNITER every encoder layer; LXMERT the cross layers (VALUE §3.1)."""
        return self.layout.paired_layers()


@dataclasses.dataclass(frozen=True)
class Layout:
    """The names a model sows, known from its config before anything runs.

    Probes take their layer names from here (`Probe.bind`), never from tracing a batch, so a run
    that resumes with no batch left still knows them. `Trace.layout` gives the same object from
    a pass; a test checks the two agree for both models.
    """

    model_type: str
    attention: tuple[str, ...]
    hidden: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> "Layout":
        if config.single_stream:
            layers = [LayerId("layer", i + 1) for i in range(config.num_layers)]
            hidden = [LayerId("layer", 0), *layers]
            attention = layers
        else:
            lang = [LayerId("lang", i + 1) for i in range(config.l_layers)]
            visn = [LayerId("visn", i + 1) for i in range(config.r_layers)]
            cross = range(1, config.x_layers + 1)
            attention = (
                lang + visn + [LayerId("cross", j, k) for j in cross for k in N.CROSS_ATTENTION]
            )
            hidden = (
                [LayerId("lang", 0), LayerId("visn", 0)]
                + lang
                + visn
                + [LayerId("cross", j, k) for j in cross for k in N.CROSS_HIDDEN]
            )
        return cls(
            config.model_type, tuple(i.name for i in attention), tuple(i.name for i in hidden)
        )

    @property
    def single_stream(self) -> bool:
        """Whether every map is a joint `[text slot | regions]` softmax (UNITER)."""
        return all(_joint(n) for n in self.attention)

    def layer_names(self, direction: str) -> list[str]:
        """Names of the layers `Trace.blocks(direction)` stacks, in forward order."""
        _check(direction, DIRECTIONS, "direction")
        return [
            n for n in N.sort_names(self.attention) if direction in LayerId.parse(n).directions()
        ]

    def hidden_names(self, modality: str) -> list[str]:
        """Layer names of `Trace.hidden_states(modality)`, embedding output first."""
        _check(modality, MODALITIES, "modality")
        return [n for n in N.sort_names(self.hidden) if modality in LayerId.parse(n).modalities()]

    def paired_layers(self) -> list[tuple[str, str]]:
        """(text layer, image layer) pairs with an output of both modalities (VALUE §3.1):
        UNITER's encoder layers, LXMERT's cross layers."""
        pairs = []
        for name in self.hidden_names("text"):
            layer = LayerId.parse(name)
            if layer.stack == "layer" and not layer.is_embeddings:
                pairs.append((name, name))
            elif layer.stack == "cross":
                pairs.append((name, dataclasses.replace(layer, part=N.STREAM["image"]).name))
        return pairs


def _joint(name: str) -> bool:
    """Whether layer `name` holds both modalities on one `[text slot | regions]` axis (UNITER)."""
    return LayerId.parse(name).stack == "layer"


def _check(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")
