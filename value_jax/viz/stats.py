"""The head statistics the explorer shows, read from the probes' own `finalize`.

Every number comes from a probe: the store keeps each probe's `step` output per example, and a
view calls that probe's `finalize` on one example's statistics, or on their sum over the dataset
(what the runner accumulates, so the "all examples" view equals results.json). The only
arithmetic here is placing each statistic on the row axis of the heatmap, one row per attention
map by its real name, and VL-InterpreT's two combined statistics (cross-modal, intra-modal)
which are means of the probe's block means; see `combined`.
"""

from __future__ import annotations

import numpy as np

from value_jax.viz.compute import analysis_probes
from value_jax.viz.store import Store

# (key, label). Directions are query→key.
VL_INTERPRET = (
    ("t2v", "t2v: text queries → region keys (VL-InterpreT 'image-to-text')"),
    ("v2t", "v2t: region queries → text keys (VL-InterpreT 'text-to-image')"),
    ("v2v", "v2v: region → region"),
    ("v2v_no_self", "v2v without self (diagonal and ±1 left out)"),
    ("t2t", "t2t: text → text"),
    ("cross_modal", "cross-modal: mean of t2v and v2t"),
    ("intra_modal", "intra-modal: mean of t2t and v2v"),
)
VALUE = (
    ("mi_text", "VALUE MI_T: [CLS] attention on the words (Eq. 1)"),
    ("mi_image", "VALUE MI_V: [CLS] attention on the regions (Eq. 1)"),
    ("image_to_text", "VALUE image-to-text head probability (Eq. 2)"),
    ("coref_v2t", "VALUE coreference V→T max attention (Table 2)"),
    ("coref_t2v", "VALUE coreference T→V max attention (Table 2)"),
)
LABELS = dict(VL_INTERPRET + VALUE)


def _finalize(store: Store, stats: dict[str, dict]) -> dict:
    probes = {p.name: p for p in analysis_probes(store.single_stream, coref=True)}
    from value_jax.trace import Layout

    layout = Layout(
        store.model_type, tuple(store.map_names), tuple(store.meta.get("hidden_names", ()))
    )
    out = {}
    for name, s in stats.items():
        probe = probes.get(name)
        if probe is None:
            continue
        probe.bind(layout)
        s = {k: np.asarray(v, np.float64) for k, v in s.items()}
        if name == "coref" and not np.asarray(s["v2t.count"]).sum():
            continue
        out[name] = probe.finalize(s, {}).data
    return out


def results(store: Store, example: int | None) -> dict:
    """`{probe name: Result.data}` for one example (None: the dataset aggregate)."""
    stats = store.aggregate() if example is None else store.record(example)["stats"]
    return _finalize(store, stats)


def results_for(store: Store, example: int | None, key: str) -> tuple[dict, int | None]:
    """`results(store, example)` when it has statistic `key`, else the dataset aggregate (a
    typed caption has no coreference links): `(data, the example actually used or None)`."""
    data = results(store, example)
    if example is not None and key not in available(store, data):
        return results(store, None), None
    return data, example


def available(store: Store, data: dict) -> list[str]:
    """Statistic keys with data for this store / example."""
    keys = [k for k, _ in VL_INTERPRET]
    if "modality" in data:
        keys += ["mi_text", "mi_image"]
    if "image_to_text" in data:
        keys.append("image_to_text")
    if "coref" in data:
        keys += ["coref_v2t", "coref_t2v"]
    return keys


def combined(rows: list[str], parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """VL-InterpreT's cross-/intra-modal statistic per row: the mean of the given block
    statistics defined at that row (UNITER: both blocks of each layer; LXMERT: the one block a
    map has, e.g. `cross2.l2v` holds only t2v). VL-InterpreT's own intra-modal mean repeats
    the image–image block and leaves text–text out (REFERENCE §1.2); here it is t2t and v2v."""
    out = {}
    for r in rows:
        vals = [p[r] for p in parts if r in p]
        if vals:
            out[r] = np.mean(vals, axis=0)
    return out


def zscore_rows(by_row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """z-score of each head column across the rows that have the statistic (scipy.stats.zscore's
    axis=0, as the head-summary probe does for its blocks)."""
    names = list(by_row)
    if not names:
        return {}
    m = np.stack([by_row[n] for n in names])
    std = m.std(0, keepdims=True)
    z = np.where(std > 0, (m - m.mean(0, keepdims=True)) / np.where(std > 0, std, 1), 0.0)
    return dict(zip(names, z))


def head_matrix(store: Store, data: dict, key: str, zscore: bool = False):
    """`(matrix [rows, H] with NaN where undefined, row names, label)` on the store's map axis."""
    rows = store.map_names
    h = store.meta["num_heads"]
    hs = data["head_summary"]

    def block(name, z=False):
        d = hs[name]
        values = d["zscore_across_layers"] if z else d["mean"]
        return dict(zip(d["layers"], np.asarray(values, np.float64)))

    if key in ("t2v", "v2t", "v2v", "v2v_no_self", "t2t"):
        by_row = block(key, zscore)
    elif key in ("cross_modal", "intra_modal"):
        parts = ("t2v", "v2t") if key == "cross_modal" else ("t2t", "v2v")
        by_row = combined(rows, [block(p) for p in parts])
        if zscore:
            by_row = zscore_rows(by_row)
    else:
        by_row = _value_stat(store, data, key)
        if zscore:
            by_row = zscore_rows(by_row)
    m = np.full((len(rows), h), np.nan)
    for i, r in enumerate(rows):
        if r in by_row:
            m[i] = by_row[r]
    return m, rows, LABELS[key] + (" (z-score across layers)" if zscore else "")


def _value_stat(store: Store, data: dict, key: str) -> dict[str, np.ndarray]:
    d = store.meta["directions"]
    if key in ("mi_text", "mi_image"):
        m = data["modality"]["per_head_text" if key == "mi_text" else "per_head_image"]
        return dict(zip(d["t2t"], np.asarray(m)))
    if key == "image_to_text":
        return dict(zip(d["v2t"], np.asarray(data["image_to_text"]["probability"])))
    direction = key.split("_")[1]
    c = data["coref"]
    # The probe reports means per entity type and each type's link count: their link-weighted
    # mean is the all-types mean the probe plots (`coref_<dir>_heads`).
    links = np.array([c["per_type"].get(t, {}).get("links", 0) for t in _types()], np.float64)
    means = np.asarray(c["mean_per_head"][direction], np.float64)  # [types, L, H]
    overall = np.einsum("c,clh->lh", links, means) / max(links.sum(), 1.0)
    return dict(zip(d[direction], overall))


def _types():
    from value_jax.data.flickr30k import PHRASE_TYPES

    return PHRASE_TYPES


__all__ = [
    "VL_INTERPRET",
    "VALUE",
    "LABELS",
    "results",
    "available",
    "head_matrix",
    "combined",
    "zscore_rows",
]
