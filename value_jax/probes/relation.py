"""VALUE §3.4, Table 4 and Fig. 5: visual relations between Visual Genome region pairs.

Individual heads (Table 4): per (subject, object) pair and head, max(α_{s→o}) and max(α_{o→s}) on
the v2v block; direction is ignored, so a pair's value is the mean of the two; per predicate the
head with the largest mean over pairs. Single-stream: the 12 joint layers; two-stream: the 10
layers that carry vision (5 relational layers + the 5 cross layers' vision self-attention).

Random baseline (Table 4's "(Rand.)" columns): every related pair of predicate c is matched with
a random ordered pair of two distinct regions of the same image (`pairs.random_region_pairs`,
drawn from `seed`, the image and the item's position), scored the same way; per predicate the
best head of those random pairs with its own label, as the paper prints it (the random value at
the real best head is kept in the JSON as `rand_same_head`).

Targets over Q pairs per sample: rel.subj, rel.obj [B,Q] region indices, rel.pred [B,Q] predicate
class, rel.related [B,Q] bool (False = a region pair with no relation, for the VRI prober),
rel.mask [B,Q] bool. Collected for the probers: the Eq. 3 attention features, the subject/object
embeddings of every vision-carrying layer, the raw detector features (baseline) and the image
(`row.image`: the probers split by image). Random pairs read `row.image` and `row.item_offset`.
`seed` drives the random pairs and the probers; `bilinear_rank` 0 = full-rank Eq. 4.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from value_jax.data.collate import ROW_IMAGE, ROW_ITEM_OFFSET
from value_jax.probes import pairs
from value_jax.probes.base import Probe
from value_jax.probes.classifiers import attention_pair_features
from value_jax.probes.results import Result, Table, heatmap


class RelationProbe(Probe):
    name = "relation"
    collect_keys = (
        "att_features",
        "emb_subj",
        "emb_obj",
        "raw_subj",
        "raw_obj",
        "related",
        "pred",
        "image",
    )

    def __init__(
        self,
        predicates: list[str],
        collect_features: bool = True,
        name: str = "relation",
        seed: int = 0,
        bilinear_rank: int = 0,
    ):
        self.predicates = list(predicates)
        self.name = name
        self.collect_features = collect_features
        self.seed, self.bilinear_rank = int(seed), int(bilinear_rank)
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
            value, targets["rel.pred"], item, len(self.predicates)
        )
        rand_a, rand_b = pairs.random_region_pairs(
            self.seed,
            targets[ROW_IMAGE],
            targets[ROW_ITEM_OFFSET],
            trace.region_mask,
            item.shape[1],
        )
        ra, _ = pairs.singleton(rand_a)
        rb, _ = pairs.singleton(rand_b)
        rand_ab, rand_ba = pairs.both_directions(v2v, v2v, ra, one, rb, one)
        has_pair = item & (jnp.sum(trace.region_mask > 0, axis=1) >= 2)[:, None]
        stats["rand.sum"], stats["rand.count"] = pairs.class_sums(
            (rand_ab + rand_ba) / 2, targets["rel.pred"], has_pair, len(self.predicates)
        )
        if self.collect_features:
            stats["att_features"] = attention_pair_features(  # [B, Q, L·2H]
                jnp.moveaxis(so, 0, 2), jnp.moveaxis(os_, 0, 2)
            )
            image, _ = trace.hidden_states("image", self.embedding_layers)
            stats["emb_subj"] = pairs.gather_rows(image, targets["rel.subj"])
            stats["emb_obj"] = pairs.gather_rows(image, targets["rel.obj"])
            raw = trace.region_feats[None]
            stats["raw_subj"] = pairs.gather_rows(raw, targets["rel.subj"])[:, :, 0]
            stats["raw_obj"] = pairs.gather_rows(raw, targets["rel.obj"])[:, :, 0]
            stats["related"] = targets["rel.related"].astype(jnp.int32)
            stats["pred"] = targets["rel.pred"]
            stats["image"] = jnp.broadcast_to(targets[ROW_IMAGE][:, None], item.shape)
            for k in self.collect_keys:
                stats[k + ".mask"] = targets["rel.mask"]
        return stats

    def finalize(self, stats, info):
        counts = stats["pair.count"]
        means = stats["pair.sum"] / np.maximum(counts, 1)[:, None, None]  # [C, L, H]
        rand = stats["rand.sum"] / np.maximum(stats["rand.count"], 1)[:, None, None]
        rows, per_pred = [], {}
        for c, pred in enumerate(self.predicates):
            if counts[c] == 0:
                continue
            per_pred[pred] = {
                "pairs": int(counts[c]),
                "random_pairs": int(stats["rand.count"][c]),
                **pairs.best_and_random(means, rand, self.layer_names, c),
            }
            e = per_pred[pred]
            rows.append(
                [pred, int(counts[c]), e["head"], e["value"], e["rand_head"], e["rand_value"]]
            )
        table = Table(
            "Table 4: visual relations, best head per predicate (mean of max α_{s→o} "
            "and max α_{o→s}; Rand. = the best head on random region pairs of the same "
            "image, with its own label)",
            ["predicate", "pairs", "head", "attention", "Rand. head", "attention (Rand.)"],
            rows,
        )
        overall = stats["pair.sum"].sum(0) / max(counts.sum(), 1)
        result = Result(
            self.name,
            {
                "per_predicate": per_pred,
                "layers": self.layer_names,
                "mean_per_head": means,
                "mean_per_head_random": rand,
                "pairs": int(counts.sum()),
                "random_baseline": "a random ordered pair of two distinct "
                "regions of the same image per related pair",
                "seed": self.seed,
            },
            [table],
            {
                f"{self.name}_heads": heatmap(
                    overall, "Relation max attention, all predicates (Table 4)"
                )
            },
        )
        if self.collect_features and stats.get("related") is not None and len(stats["related"]):
            from value_jax.probes.pair_probers import relation_probers

            relation_probers(
                result,
                stats,
                self.predicates,
                self.embedding_layers,
                seed=self.seed,
                bilinear_rank=self.bilinear_rank,
                log=info.get("log"),
            )
        return result
