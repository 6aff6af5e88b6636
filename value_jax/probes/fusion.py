"""VALUE §3.1, Table 1: multimodal fusion degree per layer.

Per sample and layer: 2-means over the output states of the text and region tokens, NMI between
the clusters and the true modality; reported as the mean over samples (smaller = more fused).
Single-stream: every encoder layer; two-stream: the cross layers' text + vision outputs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from value_jax import kernels, names
from value_jax.probes.base import Probe
from value_jax.probes.results import Result, Table, line_plot
from value_jax.probes.samples import first_rows


class FusionProbe(Probe):
    """`include_special=False` (default) clusters the words t1..tm plus regions; True adds [CLS]
    and [SEP] (the paper does not say; the choice is reported with the result)."""

    name = "fusion"

    def __init__(self, include_special: bool = False, num_iters: int = 20):
        self.include_special = include_special
        self.num_iters = num_iters
        self.layer_names: list[str] = []

    def bind(self, layout):
        self.layer_names = [a for a, _ in layout.paired_layers()]

    def step(self, trace, targets):
        pairs = trace.paired_layers()
        text, _ = trace.hidden_states("text", [a for a, _ in pairs])  # [L, B, T, D]
        image, _ = trace.hidden_states("image", [b for _, b in pairs])  # [L, B, R, D]
        x = jnp.concatenate([text, image], axis=2)
        text_tokens = (trace.text_mask > 0) if self.include_special else trace.word_mask
        regions = trace.region_mask > 0
        mask = jnp.concatenate([text_tokens, regions], axis=1)
        labels = jnp.concatenate(
            [jnp.zeros(text_tokens.shape, jnp.int32), jnp.ones(regions.shape, jnp.int32)], axis=1
        )
        nmi = kernels.over_layers(kernels.kmeans2_nmi)(x, labels, mask, self.num_iters)  # [L, B]
        valid = (
            jnp.any(text_tokens, axis=1)
            & jnp.any(regions, axis=1)
            & first_rows(targets, x.shape[1])
        )
        return {
            "nmi_sum": jnp.sum(jnp.where(valid[None], nmi, 0.0), axis=1),
            "count": jnp.sum(valid).astype(jnp.float32),
        }

    def finalize(self, stats, info):
        count = float(stats.get("count", 0.0))
        nmi = (
            stats["nmi_sum"] / max(count, 1.0) if count else np.full(len(self.layer_names), np.nan)
        )
        labels = [names.label(n) for n in self.layer_names]
        table = Table(
            "Table 1: multimodal fusion degree (mean NMI of 2-means vs modality; lower = more fused)",
            ["layer"] + labels,
            [["NMI"] + [float(v) for v in nmi]],
        )
        return Result(
            self.name,
            {
                "layers": labels,
                "nmi": nmi,
                "samples": int(count),
                "tokens": "words+regions+[CLS]/[SEP]" if self.include_special else "words+regions",
                "kmeans_iters": self.num_iters,
            },
            [table],
            {
                "fusion_nmi": line_plot(
                    {"NMI": nmi}, "Multimodal fusion (VALUE Table 1)", "layer", "NMI", labels
                )
            },
        )
