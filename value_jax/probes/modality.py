"""VALUE §3.2–3.3.1: modality importance of the [CLS] attention and image-to-text heads.

Modality importance (Eq. 1, Fig. 3, Fig. 4a): I_{M,j} = Σ_{i∈M} α^j_{CLS,i} over the words
(M = T, [CLS]/[SEP] excluded) or the regions (M = V), per head; the per-layer value is the mean of
its heads, the overall value the sum over all heads; each a mean over samples.
Image-to-text heads (Eq. 2, Fig. 4b): the fraction of samples on which ∃ region v with
Σ_{t∈T} α_{v,t} > 0.5. Both single-stream only (VALUE applies them to UNITER).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from value_jax import kernels, names
from value_jax.probes.base import Probe
from value_jax.probes.pairs import head_label
from value_jax.probes.results import Result, Table, heatmap, line_plot
from value_jax.probes.samples import first_rows


def _require_single_stream(layout, what):
    if not layout.single_stream:
        raise ValueError(
            f"{what} is defined for single-stream models (UNITER) only; got {layout.model_type}"
        )


class ModalityProbe(Probe):
    name = "modality"

    def __init__(self):
        self.layer_names: list[str] = []

    def bind(self, layout):
        _require_single_stream(layout, "modality importance")
        self.layer_names = layout.layer_names("t2t")

    def step(self, trace, targets):
        joint = jnp.stack([trace.attention[n] for n in self.layer_names])  # [L, B, H, N, N]
        m = trace.token_masks()
        i_t, i_v = kernels.over_layers(kernels.cls_modality_sums)(joint, m["words"], m["regions"])
        valid = (
            jnp.any(m["words"], axis=1)
            & jnp.any(m["regions"], axis=1)
            & first_rows(targets, joint.shape[1])
        ).astype(jnp.float32)
        return {
            "text_sum": jnp.einsum("lbh,b->lh", i_t, valid),
            "image_sum": jnp.einsum("lbh,b->lh", i_v, valid),
            "count": jnp.sum(valid),
        }

    def finalize(self, stats, info):
        n = max(float(stats["count"]), 1.0)
        text, image = stats["text_sum"] / n, stats["image_sum"] / n  # [L, H]
        per_layer_t, per_layer_v = text.mean(1), image.mean(1)
        overall_t, overall_v = float(text.sum()), float(image.sum())
        layers = [names.label(n) for n in self.layer_names]
        table = Table(
            "Fig. 4a: modality importance of [CLS] attention per layer (mean over heads)",
            ["layer"] + layers + ["overall (sum of heads)"],
            [
                ["text MI_T"] + list(per_layer_t) + [overall_t],
                ["image MI_V"] + list(per_layer_v) + [overall_v],
            ],
        )
        return Result(
            self.name,
            {
                "per_head_text": text,
                "per_head_image": image,
                "per_layer_text": per_layer_t,
                "per_layer_image": per_layer_v,
                "overall_text": overall_t,
                "overall_image": overall_v,
                "samples": int(stats["count"]),
            },
            [table],
            {
                "modality_text_heads": heatmap(text, "[CLS] attention on text (Fig. 3)"),
                "modality_image_heads": heatmap(image, "[CLS] attention on image (Fig. 3)"),
                "modality_layers": line_plot(
                    {"text": per_layer_t, "image": per_layer_v},
                    "Modality importance per layer (Fig. 4a)",
                    "layer",
                    "mean [CLS] attention",
                    layers,
                ),
            },
        )


class ImageToTextProbe(Probe):
    name = "image_to_text"

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def bind(self, layout):
        _require_single_stream(layout, "the image-to-text head test")
        self.layer_names = layout.layer_names("v2t")

    def step(self, trace, targets):
        v2t, _ = trace.blocks("v2t", self.layer_names)  # [L, B, H, R, T]
        regions = trace.region_mask > 0
        hit = kernels.over_layers(kernels.image_to_text_indicator)(
            v2t, regions, trace.word_mask, self.threshold
        )  # [L, B, H]
        valid = (jnp.any(regions, axis=1) & first_rows(targets, regions.shape[0])).astype(
            jnp.float32
        )
        return {
            "hits": jnp.einsum("lbh,b->lh", hit.astype(jnp.float32), valid),
            "count": jnp.sum(valid),
        }

    def finalize(self, stats, info):
        prob = stats["hits"] / max(float(stats["count"]), 1.0)  # [L, H]
        layers, heads = prob.shape
        order = np.argsort(-prob, axis=None)[:5]
        rows = [[head_label(self.layer_names, i, heads), float(prob.flat[i])] for i in order]
        table = Table(
            f"Fig. 4b: image-to-text heads (fraction of samples with a region putting "
            f"> {self.threshold} of its attention on the words), top 5",
            ["head (layer-head)", "probability"],
            rows,
        )
        return Result(
            self.name,
            {
                "probability": prob,
                "threshold": self.threshold,
                "max": float(prob.max()),
                "min": float(prob.min()),
                "fraction_of_heads_above_half": float((prob > 0.5).mean()),
                "samples": int(stats["count"]),
            },
            [table],
            {
                "image_to_text_heads": heatmap(
                    prob, "Image-to-text head probability (Fig. 4b)", vmin=0.0, vmax=1.0
                )
            },
        )
