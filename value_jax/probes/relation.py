"""VALUE §3.4, Table 4 and Fig. 5: visual relations between Visual Genome region pairs.

Individual heads (Table 4): per (subject, object) pair and head, max(α_{s→o}) and max(α_{o→s}) on
the v2v block; direction is ignored, so a pair's value is the mean of the two; per predicate the
head with the largest mean over pairs. Single-stream: the 12 joint layers; two-stream: the 10
layers that carry vision (5 relational layers + the 5 cross layers' vision self-attention).

Targets over Q pairs per sample: rel.subj, rel.obj [B,Q] region indices, rel.pred [B,Q] predicate
class, rel.related [B,Q] bool (False = a region pair with no relation, for the VRI prober),
rel.mask [B,Q] bool. Collected for the probers: the Eq. 3 attention features, the subject/object
embeddings of every vision-carrying layer, and the raw detector features (baseline).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from value_jax.probes import pairs
from value_jax.probes.results import Result, Table, heatmap
from value_jax.runner import Probe


class RelationProbe(Probe):
    name = "relation"
    collect_keys = ("att_features", "emb_subj", "emb_obj", "raw_subj", "raw_obj", "related",
                    "pred")

    def __init__(self, predicates: list[str], collect_features: bool = True, name: str = "relation"):
        self.predicates = list(predicates)
        self.name = name
        self.collect_features = collect_features
        self.layer_names: list[str] = []
        self.embedding_layers: list[str] = []
        if not collect_features:
            self.collect_keys = ()

    def bind(self, layout):
        self.layer_names = layout.layer_names("v2v")
        self.embedding_layers = layout.hidden_names("image")

    def step(self, trace, targets):
        v2v, _ = trace.blocks("v2v", self.layer_names)
        subj, one = pairs.singleton(targets["rel.subj"])
        obj, _ = pairs.singleton(targets["rel.obj"])
        so, os_ = pairs.both_directions(v2v, v2v, subj, one, obj, one)
        value = (so + os_) / 2
        item = targets["rel.mask"] & targets["rel.related"]
        stats = {}
        stats["pair.sum"], stats["pair.count"] = pairs.class_sums(
            value, targets["rel.pred"], item, len(self.predicates))
        if self.collect_features:
            b, q = item.shape
            att = jnp.concatenate([so, os_], axis=-1)                       # [L, B, Q, 2H]
            stats["att_features"] = jnp.transpose(att, (1, 2, 0, 3)).reshape(b, q, -1)
            image, _ = trace.hidden_states("image", self.embedding_layers)
            stats["emb_subj"] = pairs.gather_rows(image, targets["rel.subj"])
            stats["emb_obj"] = pairs.gather_rows(image, targets["rel.obj"])
            raw = trace.region_feats[None]
            stats["raw_subj"] = pairs.gather_rows(raw, targets["rel.subj"])[:, :, 0]
            stats["raw_obj"] = pairs.gather_rows(raw, targets["rel.obj"])[:, :, 0]
            stats["related"] = targets["rel.related"].astype(jnp.int32)
            stats["pred"] = targets["rel.pred"]
            for k in self.collect_keys:
                stats[k + ".mask"] = targets["rel.mask"]
        return stats

    def finalize(self, stats, info):
        counts = stats["pair.count"]
        means = stats["pair.sum"] / np.maximum(counts, 1)[:, None, None]    # [C, L, H]
        best = pairs.best_heads(means, self.layer_names)
        rows, per_pred = [], {}
        for c, pred in enumerate(self.predicates):
            if counts[c] == 0:
                continue
            label, _, value = best[c]
            per_pred[pred] = {"pairs": int(counts[c]), "head": label, "value": value}
            rows.append([pred, int(counts[c]), label, value])
        table = Table("Table 4: visual relations, best head per predicate (mean of max α_{s→o} "
                      "and max α_{o→s})", ["predicate", "pairs", "head", "attention"], rows)
        overall = stats["pair.sum"].sum(0) / max(counts.sum(), 1)
        result = Result(self.name, {"per_predicate": per_pred, "layers": self.layer_names,
                                    "mean_per_head": means, "pairs": int(counts.sum())}, [table],
                        {f"{self.name}_heads": heatmap(overall, "Relation max attention, all "
                                                       "predicates (Table 4)")})
        if self.collect_features and stats.get("related") is not None and len(stats["related"]):
            from value_jax.probes.pair_probers import relation_probers
            relation_probers(result, stats, self.predicates, self.embedding_layers)
        return result
