"""VALUE Table 3 / Fig. 5: trained probers over the pairs the coref and relation probes collected.

Attention prober (Eq. 3): a linear classifier over the pair's 2N max-attention values (every head
of every layer, both directions). Embedding prober (Eq. 4): the bilinear prober per layer, all
layers trained together under vmap, `W_w, W_μ ∈ R^{D×D}` (full rank, D = hidden size: 768×768 for
base models, as the paper) unless `bilinear_rank` asks for a low-rank form. Beyond a memory budget
the layers are fitted in chunks, and a layer too large to hold is streamed from the collected
arrays (`_fit_layers`).

Splits (80/10/10 train/dev/test) are drawn by IMAGE (`collate`'s `row.image`, collected per item
as `image`): no image has items in two splits. An item split would put the k rows of a phrase
linked to k regions, and the 5 captions of an image, on both sides, and the probers would score
memorised phrases.

Every prober is paired with a control task (Hewitt & Liang 2019): labels drawn at random per item
*type*, so selectivity = task − control accuracy tells what the prober learned beyond memorising
types (the paper notes phrase text can leak the label). Types:
  coreference  the phrase's word pieces (one type per distinct phrase text);
  relations    (subject class, object class), the classes being `relation_control_classes`
               k-means clusters of the raw detector features (K² types, K chosen so that a type
               holds ~`CONTROL_ITEMS_PER_TYPE` items on average, at most `MAX_CONTROL_CLASSES`
               classes): a stand-in for the detector's object classes, which the targets do not
               carry. Identical features as the type (one type per region pair) would make
               nearly every pair its own type and the control task unlearnable.
"""

from __future__ import annotations

import numpy as np

from value_jax import names
from value_jax.probes import classifiers, probing
from value_jax.probes.results import Table
from value_jax.progress import FitProgress

# Prober budgets, recorded in results.json (`prober_settings.training`). A bilinear epoch is at
# most `epoch_items` train items, so `patience` bounds the work after the best epoch whatever
# the data size; early stopping scores at most `stopping_dev_items` dev items.
PROBER_SETTINGS = {
    "linear": dict(max_epochs=300, patience=30),
    "bilinear": dict(
        max_epochs=200,
        patience=20,
        epoch_items=classifiers.EPOCH_ITEMS,
        stopping_dev_items=classifiers.STOPPING_DEV_ITEMS,
    ),
}
SPLIT = "by image: every image's items in one of train/dev/test (80/10/10 of the items)"
CONTROL_ITEMS_PER_TYPE = 20
MAX_CONTROL_CLASSES = 32
_KMEANS_FIT_ROWS = 20000
# Host memory for one embedding-prober fit; beyond it the layers are trained in chunks read
# from the collected (possibly disk-backed) arrays, and beyond one layer's worth each layer's
# rows are streamed from them, so memory does not grow with layers × items.
EMBEDDING_PROBER_BUDGET_BYTES = 4 << 30
# An in-memory fit holds ~3.9x its pair inputs: the inputs picked from the collected arrays,
# the train/dev split copies, the device copy and the standardised copy.
_FIT_COPIES = 4
_KMEANS_ITERS = 25


def _types(*arrays) -> np.ndarray:
    """Integer type id per item from the rows of the given arrays (identical rows = one type)."""
    rows = np.concatenate([np.asarray(a).reshape(len(a), -1) for a in arrays], axis=1)
    _, ids = np.unique(np.round(rows, 4), axis=0, return_inverse=True)
    return ids.reshape(-1)


def _nearest(x, centres, chunk=65536):
    out = np.empty(len(x), np.int64)
    c2 = np.sum(centres * centres, axis=1)
    for start in range(0, len(x), chunk):
        part = np.asarray(x[start : start + chunk], np.float64)
        out[start : start + chunk] = np.argmin(c2[None] - 2 * part @ centres.T, axis=1)
    return out


def kmeans_classes(arrays, k: int, seed: int) -> list[np.ndarray]:
    """Seeded k-means over the rows of several `[N_i, F]` arrays (or memmaps) taken together ->
    `[N_i]` class ids per array: a k-means++ start and Lloyd iterations on at most
    `_KMEANS_FIT_ROWS` sampled rows, then every row to its nearest centre in chunks, so the
    arrays are never copied whole. Fewer distinct rows than k give fewer classes."""
    rng = np.random.default_rng(seed)
    sizes = [len(a) for a in arrays]
    take = np.sort(rng.choice(sum(sizes), min(sum(sizes), _KMEANS_FIT_ROWS), replace=False))
    starts = np.cumsum([0] + sizes)
    fit = np.concatenate(
        [
            np.asarray(a[take[(take >= lo) & (take < hi)] - lo], np.float64)
            for a, lo, hi in zip(arrays, starts[:-1], starts[1:])
        ]
    )
    centres = [fit[rng.integers(len(fit))]]
    d = np.sum((fit - centres[0]) ** 2, axis=1)
    while len(centres) < k and d.sum() > 0:
        centres.append(fit[rng.choice(len(fit), p=d / d.sum())])
        d = np.minimum(d, np.sum((fit - centres[-1]) ** 2, axis=1))
    centres = np.stack(centres)
    for _ in range(_KMEANS_ITERS):
        assign = _nearest(fit, centres)
        new = np.stack(
            [
                fit[assign == j].mean(0) if np.any(assign == j) else centres[j]
                for j in range(len(centres))
            ]
        )
        if np.allclose(new, centres):
            break
        centres = new
    return [_nearest(a, centres) for a in arrays]


def relation_control_classes(raw_subj, raw_obj, seed: int):
    """Control-task types of the relation probers: `(type ids [N], description dict)`, the type
    of a pair being (class of its subject, class of its object), classes = k-means clusters of
    the raw detector features of every subject and object, K = min(MAX_CONTROL_CLASSES,
    floor(sqrt(N / CONTROL_ITEMS_PER_TYPE))) and at least 2."""
    n = len(raw_subj)
    k = int(np.clip(np.floor(np.sqrt(n / CONTROL_ITEMS_PER_TYPE)), 2, MAX_CONTROL_CLASSES))
    subj, obj = kmeans_classes([raw_subj, raw_obj], k, seed)
    k = int(max(subj.max(), obj.max())) + 1 if n else k
    types = subj * k + obj
    counts = np.bincount(types)
    counts = counts[counts > 0]
    return types, {
        "scheme": "(subject class, object class); classes = k-means clusters of the "
        "raw detector features",
        "classes": k,
        "types": int(len(counts)),
        "mean_items_per_type": float(n / max(len(counts), 1)),
        "median_items_per_type": float(np.median(counts)) if len(counts) else 0.0,
    }


def _fit(features, labels, types, groups, seed, names, kind, settings, bilinear_rank):
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) < 10 or n_classes < 2 or len(np.unique(labels)) < 2:
        return {"skipped": f"{len(labels)} items, {len(np.unique(labels))} label(s)"}
    if len(np.unique(groups)) < 3:
        return {
            "skipped": f"{len(np.unique(groups))} image(s): image-disjoint train/dev/test "
            "need at least 3"
        }
    kw = dict((settings or PROBER_SETTINGS)[kind])
    kw.pop("rank", None)
    if kind == "bilinear":
        d = features[0].shape[-1]
        kw["rank"] = min(bilinear_rank, d) if bilinear_rank else d
    res = probing.train_prober(
        features,
        labels,
        num_classes=n_classes,
        seed=seed,
        groups=groups,
        control_type_ids=types,
        names=names,
        **kw,
    )
    out = res.to_dict()
    if kind == "bilinear":
        out["rank"] = kw["rank"]
    return out


def _fit_memory(n: int, d: int, layers: int = 1) -> int:
    """Host bytes an in-memory Eq. 4 fit of `layers` layers over `n` pairs of `d`-wide rows
    holds: `_FIT_COPIES` copies of the pair inputs."""
    return _FIT_COPIES * layers * 2 * n * d * 4


def _pairs(a, b, index, layer=None):
    """`(e_i, e_j)` read on demand (`CollectedRows`) from the collected arrays."""
    return classifiers.CollectedRows(a, index, layer), classifiers.CollectedRows(b, index, layer)


def _fit_layers(
    emb_a,
    emb_b,
    sel,
    labels,
    types,
    groups,
    seed,
    layers,
    settings,
    bilinear_rank,
    budget=None,
    progress=None,
    what="embedding prober",
):
    """The bilinear prober of every layer from `[N, L, D]` collected arrays (`LayerFiles` of
    memmaps when spilled; `e[rows, layer]` is all that is read): all layers under one vmap
    when their fit holds at most `budget` bytes (`_fit_memory`), else in chunks of layers, each
    read from the arrays on its own (recorded as `layers_per_fit`); when even one layer's fit
    would exceed it, each layer is trained on rows streamed from the arrays
    (`classifiers.STREAM_ROWS` at a time; recorded as `streamed`), in memory that does not
    grow with the number of items but for their indices and labels."""
    budget = EMBEDDING_PROBER_BUDGET_BYTES if budget is None else budget
    n, n_layers, d = int(np.count_nonzero(sel)), emb_a.shape[1], emb_a.shape[2]
    progress = progress or FitProgress(None, n_layers)
    chunk = int(min(n_layers, budget // max(1, _fit_memory(n, d))))

    def fit(make_pair, names):
        span = names[0] if len(names) == 1 else f"{names[0]}–{names[-1]}"
        how = " (streamed)" if chunk == 0 else ""
        return progress.run(
            f"{what}, layer{'s' * (len(names) > 1)} {span}{how}",
            lambda: _fit(
                make_pair(),
                labels,
                types,
                groups,
                seed,
                names,
                "bilinear",
                settings,
                bilinear_rank,
            ),
            len(names),
        )

    if chunk == 0:
        index = np.flatnonzero(sel)
        parts = [
            fit(lambda layer=layer: _pairs(emb_a, emb_b, index, layer), [layers[layer]])
            for layer in range(n_layers)
        ]
    else:
        # One layer at a time: a spilled collection keeps each layer in its own file.
        pick = lambda e, lo, hi: np.stack(
            [np.asarray(e[sel, layer], np.float32) for layer in range(lo, min(hi, n_layers))]
        )
        parts = [
            fit(
                lambda lo=lo: (pick(emb_a, lo, lo + chunk), pick(emb_b, lo, lo + chunk)),
                list(layers[lo : lo + chunk]),
            )
            for lo in range(0, n_layers, chunk)
        ]
    if "skipped" in parts[0]:
        return parts[0]
    merged = dict(parts[0])
    if len(parts) > 1:
        for key, value in parts[0].items():
            if isinstance(value, list):
                merged[key] = [v for part in parts for v in part[key]]
        merged["layers_per_fit"] = max(chunk, 1)
    if chunk == 0:
        merged["streamed"] = True
    return merged


def _rows(task, res, label, display=str):
    if "skipped" in res:
        return [[task, f"{label} (skipped: {res['skipped']})".strip(), "n/a", "n/a", "n/a", "n/a"]]
    out = []
    for i, name in enumerate(res["names"]):
        name = display(name)
        sel = res["selectivity"][i] if res.get("selectivity") else float("nan")
        ctrl = res["control_test_acc"][i] if res.get("control_test_acc") else float("nan")
        out.append(
            [task, f"{label} {name}".strip(), res["test_acc"][i], ctrl, sel, res["majority_acc"]]
        )
    return out


def _run_all(
    tasks, att, emb_a, emb_b, layers, types, groups, seed, settings, bilinear_rank, progress
):
    """tasks: {task name: (item selector, labels)} → (results, table rows). `progress`: a
    `FitProgress` counting 1 + len(layers) fits per task (and whatever the caller adds)."""
    results, rows = {}, []
    for task, (sel, labels) in tasks.items():
        attention = progress.run(
            f"{task} attention prober",
            lambda sel=sel, labels=labels: _fit(
                att[sel],
                labels,
                types[sel],
                groups[sel],
                seed,
                ["all heads"],
                "linear",
                settings,
                bilinear_rank,
            ),
        )
        entry = {
            "attention_prober": attention,
            "embedding_prober": _fit_layers(
                emb_a,
                emb_b,
                sel,
                labels,
                types[sel],
                groups[sel],
                seed,
                layers,
                settings,
                bilinear_rank,
                progress=progress,
                what=f"{task} embedding prober",
            ),
        }
        results[task] = entry
        rows += _rows(task, entry["attention_prober"], "attention prober")
        rows += _rows(task, entry["embedding_prober"], "embedding prober, layer", names.label)
    return results, rows


def _table(caption, rows):
    return Table(
        caption, ["task", "prober", "test acc", "control acc", "selectivity", "majority"], rows
    )


def _settings(seed, bilinear_rank, dim, control, settings):
    return {
        "seed": seed,
        "training": settings or PROBER_SETTINGS,
        "split": SPLIT,
        "bilinear_rank": int(min(bilinear_rank, dim)) if bilinear_rank else int(dim),
        "bilinear_rank_flag": int(bilinear_rank),
        "bilinear_full_rank": not bilinear_rank or bilinear_rank >= dim,
        "control_types": control,
    }


def coref_probers(
    result,
    stats,
    types,
    embedding_layers,
    seed=0,
    settings=None,
    bilinear_rank=0,
    log=None,
):
    """VCD (linked or not) and VCC (entity type of a link) probers; adds to `result` in place.
    `bilinear_rank` 0 = full rank (Eq. 4 as the paper). `log`: a line per finished fit
    (`FitProgress`)."""
    linked = stats["linked"].astype(bool)
    item_types = _types(stats["phrase_ids"])
    groups = np.asarray(stats["image"])
    tasks = {
        "VCD": (np.ones_like(linked), linked.astype(np.int32)),
        "VCC": (linked, stats["type"][linked].astype(np.int32)),
    }
    res, rows = _run_all(
        tasks,
        stats["att_features"],
        stats["emb_region"],
        stats["emb_phrase"],
        embedding_layers,
        item_types,
        groups,
        seed,
        settings,
        bilinear_rank,
        FitProgress(log, len(tasks) * (1 + len(embedding_layers))),
    )
    used = _settings(
        seed,
        bilinear_rank,
        stats["emb_region"].shape[-1],
        {
            "scheme": "the phrase's word pieces",
            "types": int(item_types.max() + 1) if len(item_types) else 0,
        },
        settings,
    )
    result.data["probers"], result.data["prober_settings"] = res, used
    result.tables.append(
        _table(
            f"Table 3 (coreference): attention and embedding probers with control tasks (split by "
            f"image; Eq. 4 rank {used['bilinear_rank']}; control types: phrase text)",
            rows,
        )
    )


def relation_probers(
    result,
    stats,
    predicates,
    embedding_layers,
    seed=0,
    settings=None,
    bilinear_rank=0,
    log=None,
):
    """VRI (related or not) and VRC (predicate of a relation) probers, plus the raw Faster R-CNN
    feature baseline (the bilinear prober on the detector features). `log`: a line per
    finished fit (`FitProgress`)."""
    related = stats["related"].astype(bool)
    item_types, control = relation_control_classes(stats["raw_subj"], stats["raw_obj"], seed)
    groups = np.asarray(stats["image"])
    tasks = {
        "VRI": (np.ones_like(related), related.astype(np.int32)),
        "VRC": (related, stats["pred"][related].astype(np.int32)),
    }
    progress = FitProgress(log, len(tasks) * (2 + len(embedding_layers)))
    res, rows = _run_all(
        tasks,
        stats["att_features"],
        stats["emb_subj"],
        stats["emb_obj"],
        embedding_layers,
        item_types,
        groups,
        seed,
        settings,
        bilinear_rank,
        progress,
    )
    for task, (sel, labels) in tasks.items():
        index = np.flatnonzero(sel)
        streamed = (
            _fit_memory(len(index), stats["raw_subj"].shape[-1]) > EMBEDDING_PROBER_BUDGET_BYTES
        )

        def pair(sel=sel, index=index, streamed=streamed):
            if streamed:
                return _pairs(stats["raw_subj"], stats["raw_obj"], index)
            return stats["raw_subj"][sel][None], stats["raw_obj"][sel][None]

        raw = progress.run(
            f"{task} raw-feature baseline{' (streamed)' * streamed}",
            lambda pair=pair, sel=sel, labels=labels: _fit(
                pair(),
                labels,
                item_types[sel],
                groups[sel],
                seed,
                ["raw features"],
                "bilinear",
                settings,
                bilinear_rank,
            ),
        )
        res[task]["raw_feature_baseline"] = raw
        rows += _rows(task, raw, "Faster R-CNN baseline,")
    used = _settings(seed, bilinear_rank, stats["emb_subj"].shape[-1], control, settings)
    result.data["probers"], result.data["prober_settings"] = res, used
    result.tables.append(
        _table(
            f"Table 3 / Fig. 5 (relations): attention and embedding probers with control tasks and "
            f"the raw-feature baseline (split by image; Eq. 4 rank {used['bilinear_rank']}; "
            f"control types: (subject, object) feature class, "
            f"{control['classes']} classes, {control['mean_items_per_type']:.1f} pairs per type)",
            rows,
        )
    )
