"""VL-InterpreT's head-summary statistics, with explicit query→key directions.

Per head and layer, the mean attention of each block over real tokens, [CLS] and [SEP] left out
(queries and keys: the words t1..tm and the regions). VL-InterpreT computes the same means
(`db_analyzer.py`) but slices with the text length taken before removing [CLS]/[SEP], which
shifts its block boundaries; here the masks come from the Trace layout, so they do not shift.
`v2v_no_self` leaves the diagonal and the ±1 off-diagonals out of the region block (VL-InterpreT's
"image-to-image without self"), averaging over the remaining entries. Reported as raw means and
as z-scores across layers per head (scipy.stats.zscore's default axis=0, as VL-InterpreT does).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from value_jax import kernels, names
from value_jax.probes.base import Probe
from value_jax.probes.results import Result, Table, heatmap
from value_jax.probes.samples import first_rows

BLOCKS = ("t2t", "t2v", "v2t", "v2v", "v2v_no_self")


class HeadSummaryProbe(Probe):
    name = "head_summary"

    def __init__(self):
        self.layer_names: dict[str, list[str]] = {}

    def bind(self, layout):
        self.layer_names = {block: layout.layer_names(block[:3]) for block in BLOCKS}

    def step(self, trace, targets):
        words, regions = trace.word_mask, trace.region_mask > 0
        masks = {"t": words, "v": regions}
        first = first_rows(targets, words.shape[0])
        stats = {}
        for block in BLOCKS:
            direction = block[:3]
            maps, _ = trace.blocks(direction, self.layer_names[block])
            band = 1 if block == "v2v_no_self" else None
            q, k = masks[direction[0]], masks[direction[2]]
            means = kernels.over_layers(kernels.block_mean)(maps, q, k, band)  # [L, B, H]
            valid = (jnp.any(q, 1) & jnp.any(k, 1) & first).astype(jnp.float32)
            stats[block + ".sum"] = jnp.einsum("lbh,b->lh", means, valid)
            stats[block + ".count"] = jnp.sum(valid)
        return stats

    def finalize(self, stats, info):
        data, rows, figures = {}, [], {}
        for block in BLOCKS:
            mean = stats[block + ".sum"] / max(float(stats[block + ".count"]), 1.0)  # [L, H]
            std = mean.std(axis=0, keepdims=True)
            z = np.where(
                std > 0, (mean - mean.mean(axis=0, keepdims=True)) / np.where(std > 0, std, 1), 0.0
            )
            layers = self.layer_names[block]
            data[block] = {"layers": layers, "mean": mean, "zscore_across_layers": z}
            rows += [
                [block, names.label(n), float(mean[i].mean()), float(mean[i].max())]
                for i, n in enumerate(layers)
            ]
            figures[f"head_summary_{block}"] = heatmap(mean, f"Mean {block} attention per head")
        table = Table(
            "Mean attention per block (query→key; words and regions, [CLS]/[SEP] "
            "excluded): mean and max over heads",
            ["block", "layer", "mean", "max head"],
            rows,
        )
        return Result(self.name, data, [table], figures)
