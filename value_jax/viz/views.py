"""What each view shows, as plain arrays: shared by the Dash figures, the matplotlib export and
the HTML export, so the three draw the same numbers.

A selection is (map name, head, source token): head is a 0-based index or "mean" (the mean over
the map's heads: axis 0 of `[H, Q, K]`; VL-InterpreT's "average over heads" loops over the
layer count instead, REFERENCE §1.2 bug 2); the source is ("text", position in the text slot)
or ("region", region index).
"""

from __future__ import annotations

import numpy as np

from value_jax.viz.store import Store


def default_map(store: Store) -> str:
    """A map with text queries and region keys (UNITER's first layer, LXMERT's cross1.l2v)."""
    for name, axes in store.meta["maps"].items():
        if axes["query"] in ("text", "joint") and axes["key"] in ("image", "joint"):
            if axes["query"] == "text" or store.single_stream:
                return name
    return store.map_names[-1]


def head_map(record: dict, name: str, head) -> np.ndarray:
    """`[Q, K]` float32: one head of a stored map, or the mean over its heads."""
    a = np.asarray(record["attention"][name], np.float32)  # [H, Q, K]
    return a.mean(axis=0) if head == "mean" else a[int(head)]


def axis_labels(store: Store, record: dict, kind: str) -> list[str]:
    """Token labels of one axis of a map: `joint` = text tokens then regions."""
    text = [f"{t} ({i})" for i, t in enumerate(record["tokens"])]
    regions = list(record["regions"])
    return {"text": text, "image": regions, "joint": text + regions}[kind]


def attention_from(store: Store, record: dict, name: str, head, source):
    """Attention of the source token in map `name`: `(text weights [n_text] | None,
    region weights [n_regions] | None)`; both None when the map has no query of that modality
    (LXMERT's `cross1.l2v` has only text queries)."""
    axes = store.meta["maps"][name]
    kind, pos = source
    n_text = len(record["tokens"])
    if axes["query"] == "joint":
        row = pos if kind == "text" else n_text + pos
    elif (axes["query"] == "text") == (kind == "text"):
        row = pos
    else:
        return None, None
    m = head_map(record, name, head)
    if row >= m.shape[0]:
        return None, None
    weights = m[row]
    if axes["key"] == "joint":
        return weights[:n_text], weights[n_text:]
    return (weights, None) if axes["key"] == "text" else (None, weights)


def overlay_alpha(weights: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Box opacity from attention weights: weight / max weight over the regions (so the box a
    token attends to most is opaque whatever the text's share of the row), at most 0.85."""
    w = np.asarray(weights, np.float64)
    top = w.max() if w.size and w.max() > 0 else 1.0
    return np.clip(floor + 0.85 * w / top, 0.0, 0.85)


def top_k(weights: np.ndarray, k: int = 3, min_share: float = 0.05) -> list[int]:
    """The k largest weights that reach `min_share` of the largest (near-zero ties are no
    "top" regions)."""
    w = np.asarray(weights, np.float64)
    if not w.size or w.max() <= 0:
        return []
    order = np.argsort(-w, kind="stable")[: min(k, len(w))]
    return [int(i) for i in order if w[i] >= min_share * w.max()]


def hidden_points(store: Store, group: str, highlight: int | None = None):
    """Every stored token of a projection group: `coords [N, 2]`, `rows [N, 3]` (example,
    0 text / 1 region, position), labels [N] (word piece or region label)."""
    _, rows, coords = store.hidden(group)
    return coords, rows, store.labels(group)


__all__ = [
    "default_map",
    "head_map",
    "axis_labels",
    "attention_from",
    "overlay_alpha",
    "top_k",
    "hidden_points",
]
