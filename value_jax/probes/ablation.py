"""Cross-modal input ablation (Frank, Bugliarello & Elliott 2021, Eq. 1 and Eq. 2).

Vision-for-language (`Vis4LangProbe`, head `mlm`): the phrase's word pieces are [MASK]ed and the
regions ablated (none / object: IoT > threshold / all; replaced by the dataset-mean feature).
Per example, the MEAN cross-entropy over the masked phrase pieces, in bits (nats / ln 2), as the
reference's per-example `CrossEntropyLoss(ignore_index=-1)` followed by its aggregation script.

Language-for-vision (`Lang4VisProbe`): text none / phrase / all [MASK]ed, regions with IoT >
threshold masked as in pre-training; measured at the target region (the masked one of highest
IoU with a gold box):
  UNITER, `mrc` head [B, R, 1601]:
    MRC-KL = sum_c p_c (log p_c - log q_c), p = the detector's cls_prob (1601-way, background
      at 0), q = softmax(logits), 0 log 0 = 0: `F.kl_div(log_softmax(pred), p)` summed over
      classes, in nats (VOLTA `kl_1601`).
    MRC-XE = -log q[object_id + 1], the detector's top foreground class.
  LXMERT, `obj` head [B, R, 1600] (no background column):
    MRC-XE = conf * (-log q[object_id]), conf = the detector's confidence of that class, as
      LXMERT pre-training weights its object loss (and VOLTA `xent_1600`); the mean over
      examples is sum(conf * CE) / N, not normalised by sum(conf). The unweighted CE is kept as
      `mrc_xe_unweighted`.
    MRC-KL = None: LXMERT has no 1601-way head.
Units: computed in nats; the tables print bits (nats / ln 2), as Frank et al. report every loss
(MLM included); the JSON keeps nats under names that say so (`mrc_kl_nats`, `mrc_xe_nats`,
`mrc_xe_unweighted_nats`).

Averaging (`average`): examples with no masked region (IoT > threshold on no region) have no
target and are left out of the means by default ("masked"). The reference code (whose CTRL
models put a global [IMG] region first) adds 0.0 for such examples, so its means include them:
`average="reference"` adds them with loss 0 (`AblationLoader.unmasked_counts`), to MRC-KL and
MRC-XE; the top-1 agreement stays over the masked examples.

CLASS INDICES. The detector's `object_ids` are 0-based over its 1600 foreground classes (argmax
of cls_prob[:, 1:]); in a 1601-way distribution the same class is at `object_ids + 1`, background
at 0. VOLTA's `xent_1601` indexes the 1601 logits with `object_ids` directly, one class off (it
scores the class BEFORE the detected one, and background for class 0); that is not reproduced.

CTRL models' global [IMG] feature is not modelled (the original UNITER and LXMERT have none).
Every setting is one row per example of the same pass: `experiments.ablation.run_ablation` runs
each direction in one `run_probes` pass (one compilation per batch shape), so the sweep costs forward passes only.

The probes of both directions and their loss functions stay together (about 460 lines): they
read one targets layout and are reported as one Result.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from value_jax.data.ablation_data import Lang4Vis, Vis4Lang
from value_jax.data.flickr30k import PHRASE_TYPES
from value_jax.models.configs import CONFIGS
from value_jax.probes.base import Probe
from value_jax.probes.results import Result, Table

LN2 = math.log(2.0)
LANG4VIS_AVERAGES = ("masked", "reference")


# ---------------------------------------------------------------------------------------------
# Per-example losses (pure jnp).


def masked_lm_bits(logits, labels, mask):
    """`[B, T, V]` logits, `[B, T]` labels / mask -> `[B]` mean CE over the masked tokens in
    bits (0 for a row without masked token)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum(nll * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0) / LN2


def region_logits(logits, region):
    """`[B, R, C]`, `[B]` region index -> `[B, C]`."""
    return jnp.take_along_axis(logits, region[:, None, None], axis=1)[:, 0]


def kl_divergence(probs, logits):
    """`KL(p || softmax(logits))` per row in nats, with 0 log 0 = 0 (`F.kl_div` summed)."""
    probs = jnp.asarray(probs, jnp.float32)
    logq = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    safe = jnp.where(probs > 0, probs, 1.0)
    return jnp.sum(jnp.where(probs > 0, probs * (jnp.log(safe) - logq), 0.0), axis=-1)


def cross_entropy(logits, index):
    """`-log softmax(logits)[index]` per row, in nats."""
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logq, index[:, None], axis=-1)[:, 0]


def _display_name(model_type: str) -> str:
    return CONFIGS[model_type].display_name if model_type in CONFIGS else model_type


def xe_class_index(object_ids, background: bool):
    """Index of the detector's class in the MRC head's logits: `object_ids + 1` for a head with
    the background at 0 (UNITER's 1601-way `mrc`), `object_ids` otherwise (LXMERT's 1600-way
    `obj`); `background` is the config's `mrc_background`."""
    return object_ids + 1 if background else object_ids


def _grouped(key, values, targets, mask, n_settings, n_types):
    """Sums, squares and counts of `values [B]` per (setting, type), plus LabelMatch sums."""
    w = (
        jax.nn.one_hot(targets["setting"], n_settings, dtype=jnp.float32)
        * (targets["valid"] & mask).astype(jnp.float32)[:, None]
    )  # [B, S]
    t = jax.nn.one_hot(targets["type"], n_types, dtype=jnp.float32)  # [B, C]
    v = values.astype(jnp.float32)
    lm = w * targets["label_match"].astype(jnp.float32)[:, None]
    return {
        f"{key}.sum": jnp.einsum("bs,bc,b->sc", w, t, v),
        f"{key}.sq": jnp.einsum("bs,bc,b->sc", w, t, v * v),
        f"{key}.count": jnp.einsum("bs,bc->sc", w, t),
        f"{key}.lm_sum": jnp.einsum("bs,b->s", lm, v),
        f"{key}.lm_count": jnp.sum(lm, axis=0),
    }


# ---------------------------------------------------------------------------------------------
# Host-side summaries.


def _summaries(stats, key, names, types, zeros=None):
    """Per setting: mean, standard error, count, per-type means/counts, LabelMatch mean.
    `zeros`: `{"count": [S, C], "label_match": [S]}` examples added with value 0."""
    out = {}
    for s, name in enumerate(names):
        total, sq, n = (stats[f"{key}.{k}"][s] for k in ("sum", "sq", "count"))
        lm_n = float(stats[f"{key}.lm_count"][s])
        if zeros is not None:
            n = n + np.asarray(zeros["count"][s], np.float64)
            lm_n += float(zeros["label_match"][s])
        count = float(n.sum())
        mean = float(total.sum()) / count if count else math.nan
        var = max(float(sq.sum()) / count - mean * mean, 0.0) if count else math.nan
        out[name] = {
            "mean": mean,
            "stderr": math.sqrt(var / count) if count else math.nan,
            "count": int(count),
            "per_type": {
                t: (float(total[k] / n[k]) if n[k] else math.nan) for k, t in enumerate(types)
            },
            "per_type_count": {t: int(n[k]) for k, t in enumerate(types)},
            "label_match_mean": float(stats[f"{key}.lm_sum"][s]) / lm_n if lm_n else math.nan,
            "label_match_count": int(lm_n),
        }
    return out


def relative_change(value: float, base: float) -> float:
    """`(value - base) / base` in percent."""
    return (value - base) / base * 100.0 if base and not math.isnan(base) else math.nan


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.2f}%"


def _num(x) -> object:
    """A table cell: "—" where the metric does not exist (LXMERT has no 1601-way head), "n/a"
    where it exists but has no examples."""
    return "—" if x is None else ("n/a" if math.isnan(x) else float(x))


def _bits(x) -> object:
    """A table cell in bits from nats (`_num` otherwise)."""
    return _num(x) if x is None or math.isnan(x) else float(x) / LN2


# ---------------------------------------------------------------------------------------------
# Probes.


class Vis4LangProbe(Probe):
    """MLM on the masked phrase under vision ablation; one row per (setting, example)."""

    name = "vis4lang"
    outputs = ("mlm",)

    def __init__(
        self,
        settings: Sequence[Vis4Lang],
        model_type: str,
        threshold: float = 0.5,
        types=PHRASE_TYPES,
    ):
        self.settings, self.model_type = list(settings), model_type
        self.threshold, self.types = threshold, tuple(types)

    def step(self, trace, targets):
        bits = masked_lm_bits(trace.outputs["mlm"], targets["labels"], targets["label_mask"])
        s = len(self.settings)
        stats = _grouped("mlm", bits, targets, jnp.ones_like(targets["valid"]), s, len(self.types))
        w = jax.nn.one_hot(targets["setting"], s) * targets["valid"][:, None]
        stats["ablated.sum"] = jnp.einsum("bs,b->s", w, targets["num_ablated"])
        return stats

    def finalize(self, stats, info):
        names = [st.name for st in self.settings]
        per = _summaries(stats, "mlm", names, self.types)
        for s, name in enumerate(names):
            per[name]["regions_ablated_mean"] = (
                float(stats["ablated.sum"][s]) / per[name]["count"]
                if per[name]["count"]
                else math.nan
            )
        base = per.get("none", {}).get("mean", math.nan)
        for name in names:
            per[name]["relative_change_pct"] = relative_change(per[name]["mean"], base)
        model = _display_name(self.model_type)
        main = [n for n in ("none", Vis4Lang("object", self.threshold).name, "all") if n in per]
        label = lambda n: f"object (IoT > {self.threshold:g})" if n.startswith("object") else n
        lm = any(per[n]["label_match_count"] for n in main)
        header = [
            "model",
            "vision ablation",
            "MLM (bits)",
            "Δ vs none",
            "examples",
            "regions ablated",
        ]
        rows = [
            [
                model,
                label(n),
                per[n]["mean"],
                _pct(per[n]["relative_change_pct"]),
                per[n]["count"],
                _num(per[n]["regions_ablated_mean"]),
            ]
            + ([_num(per[n]["label_match_mean"])] if lm else [])
            for n in main
        ]
        tables = [
            Table(
                "Vision-for-language: MLM loss on the masked phrase (bits; higher = worse)",
                header + (["LabelMatch (bits)"] if lm else []),
                rows,
            ),
            Table(
                "Vision-for-language per entity type (bits)",
                ["vision ablation"] + list(self.types) + ["overall"],
                [
                    [label(n)]
                    + [_num(per[n]["per_type"][t]) for t in self.types]
                    + [per[n]["mean"]]
                    for n in main
                ],
            ),
        ]
        sweep = sorted((st.threshold, st.name) for st in self.settings if st.kind == "object")
        figures = {}
        if len(sweep) > 1:
            tables.append(
                Table(
                    "Vision-for-language: object ablation by IoT threshold (bits)",
                    ["IoT >", "MLM (bits)", "Δ vs none", "regions ablated"],
                    [
                        [
                            f"{t:.2f}",
                            per[n]["mean"],
                            _pct(per[n]["relative_change_pct"]),
                            _num(per[n]["regions_ablated_mean"]),
                        ]
                        for t, n in sweep
                    ],
                )
            )
            figures["ablation_iot_sweep"] = sweep_plot(
                [t for t, _ in sweep],
                [per[n]["mean"] for _, n in sweep],
                per.get("none", {}).get("mean"),
                per.get("all", {}).get("mean"),
                f"{model}: MLM loss under object ablation",
            )
        data = {
            "model": self.model_type,
            "threshold": self.threshold,
            "settings": per,
            "iot_sweep": {f"{t:.2f}": per[n]["mean"] for t, n in sweep},
            "batches": info.get("batches"),
        }
        return Result(self.name, data, tables, figures)


class Lang4VisProbe(Probe):
    """MRC at the target region under text ablation; one row per (setting, example)."""

    name = "lang4vis"

    def __init__(
        self,
        settings: Sequence[Lang4Vis],
        model_type: str,
        types=PHRASE_TYPES,
        average: str = "masked",
        unmasked: Optional[dict] = None,
    ):
        """`average`: "masked" or "reference" (see the module docstring); "reference" needs
        `unmasked` = `AblationLoader.unmasked_counts()`."""
        if model_type not in CONFIGS:
            raise ValueError(f"model_type must be one of {sorted(CONFIGS)}, got {model_type!r}")
        if average not in LANG4VIS_AVERAGES:
            raise ValueError(f"average must be one of {LANG4VIS_AVERAGES}, got {average!r}")
        if average == "reference" and unmasked is None:
            raise ValueError(
                "average='reference' needs the unmasked example counts "
                "(AblationLoader.unmasked_counts())"
            )
        self.settings, self.model_type, self.types = list(settings), model_type, tuple(types)
        self.output = CONFIGS[model_type].mrc_output
        self.background = CONFIGS[model_type].mrc_background
        self.outputs = (self.output,)
        self.average = average
        self.unmasked = unmasked if average == "reference" else None

    def step(self, trace, targets):
        logits = region_logits(trace.outputs[self.output], targets["target_region"])  # [B, C]
        index = xe_class_index(targets["target_object"], self.background)
        xe_raw = cross_entropy(logits, index)
        s, n = len(self.settings), len(self.types)
        every = jnp.ones_like(targets["valid"])
        top1 = (jnp.argmax(logits, axis=-1) == index).astype(jnp.float32)
        stats = {
            **_grouped("xe_raw", xe_raw, targets, every, s, n),
            **_grouped("top1", top1, targets, every, s, n),
        }
        if self.background:  # a 1601-way head: the detector's distributions compare (MRC-KL)
            if targets["target_probs"].shape[-1] != logits.shape[-1]:
                raise ValueError(
                    f"detector distributions have {targets['target_probs'].shape[-1]} classes, "
                    f"the {self.output} head {logits.shape[-1]}"
                )
            stats.update(
                _grouped(
                    "kl",
                    kl_divergence(targets["target_probs"], logits),
                    targets,
                    targets["has_probs"],
                    s,
                    n,
                )
            )
            stats.update(_grouped("xe", xe_raw, targets, every, s, n))
        else:
            stats.update(_grouped("xe", targets["target_conf"] * xe_raw, targets, every, s, n))
        return stats

    def finalize(self, stats, info):
        names = [st.name for st in self.settings]
        zeros = self.unmasked
        kl = _summaries(stats, "kl", names, self.types, zeros) if "kl.sum" in stats else None
        xe = _summaries(stats, "xe", names, self.types, zeros)
        raw = _summaries(stats, "xe_raw", names, self.types, zeros)
        top1 = _summaries(stats, "top1", names, self.types)
        for table in (kl, xe):
            if table is None:
                continue
            base = table.get("none", {}).get("mean", math.nan)
            for name in names:
                table[name]["relative_change_pct"] = relative_change(table[name]["mean"], base)
        model = _display_name(self.model_type)
        kl_of = lambda n, k="mean": None if kl is None or not kl[n]["count"] else kl[n][k]
        rows = [
            [
                model,
                n,
                _bits(kl_of(n)),
                _pct(kl_of(n, "relative_change_pct") if kl_of(n) is not None else math.nan),
                _bits(xe[n]["mean"]),
                _pct(xe[n]["relative_change_pct"]),
                xe[n]["count"],
            ]
            for n in names
        ]
        xe_name = "MRC-XE (bits)" if self.background else "MRC-XE (bits, × detector conf)"
        averaged = (
            "examples without a masked region count as 0, as the reference code"
            if self.average == "reference"
            else "examples with a masked region"
        )
        tables = [
            Table(
                f"Language-for-vision: MRC at the masked target region (bits; higher = "
                f"worse; mean over {averaged})",
                [
                    "model",
                    "text ablation",
                    "MRC-KL (bits)",
                    "Δ KL vs none",
                    xe_name,
                    "Δ XE vs none",
                    "examples",
                ],
                rows,
            )
        ]
        for label, summ in (("MRC-KL", kl), ("MRC-XE", xe)):
            if summ is not None and any(summ[n]["count"] for n in names):
                tables.append(
                    Table(
                        f"Language-for-vision {label} per entity type (bits)",
                        ["text ablation"] + list(self.types) + ["overall"],
                        [
                            [n]
                            + [_bits(summ[n]["per_type"][t]) for t in self.types]
                            + [_bits(summ[n]["mean"])]
                            for n in names
                        ],
                    )
                )
        has_kl = kl is not None and any(kl[n]["count"] for n in names)
        data = {
            "model": self.model_type,
            "head": self.output,
            "units": "nats (tables: bits)",
            "average": self.average,
            "average_definition": f"mean over {averaged}",
            "mrc_kl_nats": kl if has_kl else None,
            "mrc_xe_nats": xe,
            "mrc_xe_unweighted_nats": raw,
            "top1_matches_detector": {n: top1[n]["mean"] for n in names},
            "xe_definition": (
                "-log softmax(mrc)[object_id + 1]"
                if self.background
                else "object_conf * -log softmax(obj)[object_id]; mean over examples"
            ),
            "batches": info.get("batches"),
        }
        if self.background and not has_kl:
            data["mrc_kl_note"] = "the region features hold no cls_prob: MRC-KL not computed"
        return Result(self.name, data, tables)


def sweep_plot(thresholds, values, none: Optional[float], all_: Optional[float], title: str):
    """Figure drawer: MLM bits against the IoT threshold, with the none / all levels."""

    def draw(fig):
        ax = fig.add_subplot(111)
        ax.plot(thresholds, values, marker="o", label="object ablation")
        for level, style, text in ((none, "--", "none"), (all_, ":", "all")):
            if level is not None and not math.isnan(level):
                ax.axhline(level, linestyle=style, color="gray", label=text)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("IoT threshold (regions with IoT > t are ablated)")
        ax.set_ylabel("MLM loss on the phrase (bits)")
        ax.set_title(title)
        ax.legend()

    return draw


def merge_results(name: str, results: Sequence[Result], extra: Optional[dict] = None) -> Result:
    """One Result holding several: data under each result's name, tables and figures in order."""
    data = {r.name: r.data for r in results}
    data.update(extra or {})
    return Result(
        name,
        data,
        [t for r in results for t in r.tables],
        {k: v for r in results for k, v in r.figures.items()},
    )
