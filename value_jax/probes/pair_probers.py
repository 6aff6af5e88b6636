"""VALUE Table 3 / Fig. 5: trained probers over the pairs the coref and relation probes collected.

Attention prober (Eq. 3): a linear classifier over the pair's 2N max-attention values (every head
of every layer, both directions). Embedding prober (Eq. 4): the bilinear prober per layer, all
layers trained together under vmap. Every prober is paired with a control task (Hewitt & Liang
2019): labels drawn at random per item *type* (coref: the phrase's word pieces; relations: the
subject's and object's detector features), so selectivity = task − control accuracy tells what
the prober learned beyond memorising types (the paper notes phrase text can leak the label).
"""
from __future__ import annotations

import numpy as np

from value_jax.probes import classifiers
from value_jax.probes.results import Table

# Small, explicit prober budgets; pass larger ones from the experiment for real data.
PROBER_SETTINGS = {"linear": dict(max_epochs=300, patience=30),
                   "bilinear": dict(max_epochs=200, patience=20, rank=128)}


def _types(*arrays) -> np.ndarray:
    """Integer type id per item from the rows of the given arrays (identical rows = one type)."""
    rows = np.concatenate([np.asarray(a).reshape(len(a), -1) for a in arrays], axis=1)
    _, ids = np.unique(np.round(rows, 4), axis=0, return_inverse=True)
    return ids.reshape(-1)


def _fit(features, labels, types, seed, names, kind, settings):
    n_classes = int(labels.max()) + 1
    if len(labels) < 10 or n_classes < 2 or len(np.unique(labels)) < 2:
        return None
    kw = dict((settings or PROBER_SETTINGS)[kind])
    if kind == "linear":
        kw.pop("rank", None)
    else:
        kw["rank"] = min(kw.get("rank", 128), features[0].shape[-1])
    res = classifiers.run_probe(features, labels, num_classes=n_classes, seed=seed,
                                control_type_ids=types, names=names, **kw)
    return res.to_dict()


def _rows(task, res, label):
    if res is None:
        return []
    out = []
    for i, name in enumerate(res["names"]):
        sel = res["selectivity"][i] if res.get("selectivity") else float("nan")
        ctrl = res["control_test_acc"][i] if res.get("control_test_acc") else float("nan")
        out.append([task, f"{label} {name}".strip(), res["test_acc"][i], ctrl, sel,
                    res["majority_acc"]])
    return out


def _run_all(tasks, att, emb_a, emb_b, layers, types, seed, settings):
    """tasks: {task name: (item selector, labels)} → (results, table rows)."""
    results, rows = {}, []
    for task, (sel, labels) in tasks.items():
        entry = {
            "attention_prober": _fit(att[sel], labels, types[sel], seed, ["all heads"], "linear",
                                     settings),
            "embedding_prober": _fit((np.swapaxes(emb_a[sel], 0, 1), np.swapaxes(emb_b[sel], 0, 1)),
                                     labels, types[sel], seed, layers, "bilinear", settings)}
        results[task] = entry
        rows += _rows(task, entry["attention_prober"], "attention prober")
        rows += _rows(task, entry["embedding_prober"], "embedding prober,")
    return results, rows


def _table(caption, rows):
    return Table(caption, ["task", "prober", "test acc", "control acc", "selectivity",
                           "majority"], rows)


def coref_probers(result, stats, types, embedding_layers, seed=0, settings=None):
    """VCD (linked or not) and VCC (entity type of a link) probers; adds to `result` in place."""
    linked = stats["linked"].astype(bool)
    item_types = _types(stats["phrase_ids"])
    tasks = {"VCD": (np.ones_like(linked), linked.astype(np.int32)),
             "VCC": (linked, stats["type"][linked].astype(np.int32))}
    res, rows = _run_all(tasks, stats["att_features"], stats["emb_region"], stats["emb_phrase"],
                         embedding_layers, item_types, seed, settings)
    result.data["probers"] = res
    result.tables.append(_table("Table 3 (coreference): attention and embedding probers with "
                                "control tasks", rows))


def relation_probers(result, stats, predicates, embedding_layers, seed=0, settings=None):
    """VRI (related or not) and VRC (predicate of a relation) probers, plus the raw Faster R-CNN
    feature baseline (the bilinear prober on the detector features)."""
    related = stats["related"].astype(bool)
    item_types = _types(stats["raw_subj"], stats["raw_obj"])
    tasks = {"VRI": (np.ones_like(related), related.astype(np.int32)),
             "VRC": (related, stats["pred"][related].astype(np.int32))}
    res, rows = _run_all(tasks, stats["att_features"], stats["emb_subj"], stats["emb_obj"],
                         embedding_layers, item_types, seed, settings)
    for task, (sel, labels) in tasks.items():
        raw = _fit((stats["raw_subj"][sel][None], stats["raw_obj"][sel][None]), labels,
                   item_types[sel], seed, ["raw features"], "bilinear", settings)
        res[task]["raw_feature_baseline"] = raw
        rows += _rows(task, raw, "Faster R-CNN baseline,")
    result.data["probers"] = res
    result.tables.append(_table("Table 3 / Fig. 5 (relations): attention and embedding probers "
                                "with control tasks and the raw-feature baseline", rows))
