"""VALUE §3.3.2–3.3.3, Table 2 and Table 3: visual coreference between regions and noun phrases.

Individual heads (Table 2): for each (region v, phrase p) coreference link, V→T = max_{t∈p} α_{v,t}
on the v2t block and T→V = max_{t∈p} α_{t,v} on the t2v block, per head; per entity type the head
with the largest mean and that mean. Random baselines: V→T(Rand.) pairs the region with another
noun phrase of the same sample, T→V(Rand.) the phrase with a random region; as in the paper, the
"(Rand.)" columns show the best head of the random pairs with its own label (the random value at
the real best head is kept in the JSON as `rand_same_head`). Two-stream models: V→T from the
vision→language, T→V from the language→vision cross-attention.

Targets (from `value_jax.data.collate`), over P items per sample:
  coref.region [B,P] int, coref.tokens / coref.token_mask [B,P,M], coref.type [B,P] int,
  coref.linked [B,P] bool (gold link; False = a negative pair for the VCD prober),
  coref.mask [B,P] bool, coref.rand_region [B,P], coref.rand_tokens / coref.rand_token_mask [B,P,M].
The per-item features for the probers (VCD: linked or not; VCC: type of a link) are collected,
with the item's image (`row.image`), by which the probers split (`pair_probers`). `seed` drives
the probers' splits, initialisation and control labels; `bilinear_rank` 0 = the paper's full-rank
Eq. 4 prober.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from value_jax import kernels, names
from value_jax.data.collate import ROW_IMAGE
from value_jax.data.flickr30k import PHRASE_TYPES
from value_jax.probes import pairs
from value_jax.probes.base import Probe
from value_jax.probes.classifiers import attention_pair_features
from value_jax.probes.results import Result, Table, heatmap


class CorefProbe(Probe):
    name = "coref"
    collect_keys = (
        "att_features",
        "emb_region",
        "emb_phrase",
        "linked",
        "type",
        "phrase_ids",
        "image",
    )

    def __init__(
        self,
        types=PHRASE_TYPES,
        collect_features: bool = True,
        seed: int = 0,
        bilinear_rank: int = 0,
    ):
        self.types = tuple(types)
        self.collect_features = collect_features
        self.seed, self.bilinear_rank = int(seed), int(bilinear_rank)
        self.layer_names: list[str] = []
        self.embedding_layers: list[str] = []
        if not collect_features:
            self.collect_keys = ()

    def bind(self, layout):
        self.layer_names = layout.layer_names("v2t")
        self.embedding_layers = [a for a, _ in layout.paired_layers()]

    def step(self, trace, targets):
        v2t, _ = trace.blocks("v2t", self.layer_names)
        t2v, _ = trace.blocks("t2v")
        region, region_one = pairs.singleton(targets["coref.region"])
        tokens, token_mask = targets["coref.tokens"], targets["coref.token_mask"]
        vt, tv = pairs.both_directions(v2t, t2v, region, region_one, tokens, token_mask)
        rand_tokens, rand_mask = targets["coref.rand_tokens"], targets["coref.rand_token_mask"]
        rand_region, _ = pairs.singleton(targets["coref.rand_region"])
        vt_rand = kernels.set_max_layers(v2t, region, region_one, rand_tokens, rand_mask)
        tv_rand = kernels.set_max_layers(t2v, tokens, token_mask, rand_region, region_one)

        item = targets["coref.mask"] & targets["coref.linked"]
        has_rand = item & jnp.any(rand_mask, axis=-1)
        n_types = len(self.types)
        stats = {}
        for key, values, mask in (
            ("v2t", vt, item),
            ("t2v", tv, item),
            ("v2t_rand", vt_rand, has_rand),
            ("t2v_rand", tv_rand, item),
        ):
            stats[key + ".sum"], stats[key + ".count"] = pairs.class_sums(
                values, targets["coref.type"], mask, n_types
            )
        if self.collect_features:
            stats["att_features"] = attention_pair_features(  # [B, P, L·2H]
                jnp.moveaxis(vt, 0, 2), jnp.moveaxis(tv, 0, 2)
            )
            layer_pairs = trace.paired_layers()
            text, _ = trace.hidden_states("text", [a for a, _ in layer_pairs])
            image, _ = trace.hidden_states("image", [v for _, v in layer_pairs])
            stats["emb_region"] = pairs.gather_rows(image, targets["coref.region"])
            stats["emb_phrase"] = pairs.mean_rows(text, tokens, token_mask)
            stats["linked"] = targets["coref.linked"].astype(jnp.int32)
            stats["type"] = targets["coref.type"]
            ids = jax.vmap(lambda row, idx: row[idx])(
                trace.input_ids, jnp.where(token_mask, tokens, 0)
            )
            stats["phrase_ids"] = jnp.where(token_mask, ids, -1)  # control-task types
            stats["image"] = jnp.broadcast_to(targets[ROW_IMAGE][:, None], item.shape)
            for k in self.collect_keys:
                stats[k + ".mask"] = targets["coref.mask"]
        return stats

    def finalize(self, stats, info):
        heads = stats["v2t.sum"].shape[-1]
        means = {
            k: stats[k + ".sum"] / np.maximum(stats[k + ".count"], 1)[:, None, None]
            for k in ("v2t", "t2v", "v2t_rand", "t2v_rand")
        }
        counts = stats["v2t.count"]
        rows, per_type = [], {}
        for c, type_name in enumerate(self.types):
            if counts[c] == 0:
                continue
            entry = {"links": int(counts[c])}
            row = [type_name, int(counts[c])]
            for d in ("v2t", "t2v"):
                entry[d] = pairs.best_and_random(means[d], means[d + "_rand"], self.layer_names, c)
                row += [
                    entry[d]["head"],
                    entry[d]["value"],
                    entry[d]["rand_head"],
                    entry[d]["rand_value"],
                ]
            per_type[type_name] = entry
            rows.append(row)
        table = Table(
            "Table 2: visual coreference, best head per entity type (max attention over "
            "phrase tokens; Rand. = the best head on random pairs, with its own label)",
            [
                "type",
                "links",
                "V→T head",
                "V→T",
                "V→T (Rand.) head",
                "V→T (Rand.)",
                "T→V head",
                "T→V",
                "T→V (Rand.) head",
                "T→V (Rand.)",
            ],
            rows,
        )
        total = np.maximum(counts.sum(), 1)
        overall = {d: (stats[d + ".sum"].sum(0) / total) for d in ("v2t", "t2v")}
        data = {
            "per_type": per_type,
            "layers": self.layer_names,
            "heads": heads,
            "mean_per_head": {d: means[d] for d in means},
            "links": int(counts.sum()),
        }
        figures = {
            f"coref_{d}_heads": heatmap(
                overall[d],
                f"Coreference {d.upper()} max attention, all types",
                ylabel="layer (" + ", ".join(map(names.label, self.layer_names[:1])) + " first)",
            )
            for d in overall
        }
        result = Result(self.name, data, [table], figures)
        if self.collect_features and stats.get("linked") is not None and len(stats["linked"]):
            from value_jax.probes.pair_probers import coref_probers

            coref_probers(
                result,
                stats,
                self.types,
                self.embedding_layers,
                seed=self.seed,
                bilinear_rank=self.bilinear_rank,
                log=info.get("log"),
            )
        return result
