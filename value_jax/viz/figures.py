"""Plotly figures of the explorer's views, built from `views` / `stats` arrays (the matplotlib
export draws the same arrays). Each function returns a `plotly.graph_objects.Figure`."""

from __future__ import annotations

import warnings

import numpy as np
import plotly.graph_objects as go

from value_jax.viz import stats as S
from value_jax.viz import views as V
from value_jax.viz.store import Store

HIDDEN_POINTS_SHOWN = 12_000  # the scatter shows at most this many tokens (all are searched)


def head_summary(store: Store, example: int | None, key: str, zscore: bool = False) -> go.Figure:
    asked = example
    data, example = S.results_for(store, example, key)
    if key not in S.available(store, data):
        key = "t2v"
    m, rows, label = S.head_matrix(store, data, key, zscore)
    h = m.shape[1]
    with warnings.catch_warnings():  # rows a statistic does not cover are all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        layer_mean = np.nanmean(m, axis=1, keepdims=True)
    z = np.concatenate([m, layer_mean], axis=1)
    x = [str(i + 1) for i in range(h)] + ["mean"]
    fig = go.Figure(
        go.Heatmap(
            z=np.where(np.isfinite(z), z, None).tolist(),
            x=x,
            y=rows,
            colorscale="Viridis",
            hovertemplate="%{y}, head %{x}: %{z:.4f}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    scope = "all examples" if example is None else f"example {example}"
    if asked is not None and example is None:
        scope += f" (example {asked} has no data for this statistic)"
    fig.update_layout(
        title=dict(
            text=f"{label}<br><sub>{scope}; query→key; click a cell</sub>", font=dict(size=13)
        ),
        xaxis=dict(title="head (1-based) | layer mean", type="category"),
        yaxis=dict(autorange="reversed", type="category"),
        height=max(300, 60 + 18 * len(rows)),
        margin=dict(l=120, r=20, t=70, b=40),
    )
    fig.add_vline(x=h - 0.5, line_width=3, line_color="white")
    return fig


def _box_path(x1, y1, x2, y2):
    return [x1, x2, x2, x1, x1], [y1, y1, y2, y2, y1]


def overlay(
    store: Store, example: int, name: str, head, source, image_url: str | None, k: int = 3
) -> go.Figure:
    """The image with one translucent box per region: trace r is region r, its opacity from the
    source token's attention to it (`views.overlay_alpha`) and the weight in its customdata."""
    rec = store.record(example)
    info = rec["info"]
    w, h = info["width"] or 1, info["height"] or 1
    _, region_w = V.attention_from(store, rec, name, head, source)
    boxes = np.asarray(rec["boxes"], np.float64)
    weights = np.zeros(len(boxes)) if region_w is None else np.asarray(region_w, np.float64)
    alpha = V.overlay_alpha(weights) if region_w is not None else np.zeros(len(boxes))
    top = set(V.top_k(weights, k)) if region_w is not None else set()
    fig = go.Figure()
    for r, (x1, y1, x2, y2) in enumerate(boxes):
        xs, ys = _box_path(x1, y1, x2, y2)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                fill="toself",
                mode="lines",
                name=rec["regions"][r],
                fillcolor="rgb(255,80,0)",
                opacity=float(alpha[r]),
                line=dict(
                    color="red" if r in top else "rgba(255,80,0,0.6)", width=3 if r in top else 1
                ),
                customdata=[[r, float(weights[r])]] * 5,
                hoveron="fills+points",
                hovertemplate=f"{rec['regions'][r]}: %{{customdata[1]:.4f}}<extra></extra>",
                showlegend=False,
            )
        )
    annotations = [
        dict(
            x=boxes[r, 0],
            y=boxes[r, 1],
            xanchor="left",
            yanchor="top",
            text=f"{rec['regions'][r]} {weights[r]:.2f}",
            showarrow=False,
            font=dict(color="white", size=11),
            bgcolor="red",
        )
        for r in sorted(top)
    ]
    if source[0] == "region" and source[1] < len(boxes):
        xs, ys = _box_path(*boxes[source[1]])
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line=dict(color="blue", dash="dash", width=2),
                hoverinfo="skip",
                showlegend=False,
                name="source",
            )
        )
    images = []
    if image_url:
        images = [
            dict(
                source=image_url,
                xref="x",
                yref="y",
                x=0,
                y=0,
                sizex=w,
                sizey=h,
                sizing="stretch",
                layer="below",
            )
        ]
    src = rec["tokens"][source[1]] if source[0] == "text" else rec["regions"][source[1]]
    head_label = "mean over heads" if head == "mean" else f"head {int(head) + 1}"
    note = "" if region_w is not None else " (no region keys for this query in this map)"
    fig.update_layout(
        images=images,
        annotations=annotations,
        title=dict(text=f"{name}, {head_label}: attention from '{src}'{note}", font=dict(size=13)),
        xaxis=dict(range=[0, w], visible=False, constrain="domain"),
        yaxis=dict(range=[h, 0], visible=False, scaleanchor="x"),
        height=460,
        margin=dict(l=10, r=10, t=40, b=10),
        plot_bgcolor="white",
        clickmode="event",
    )
    return fig


def word_colours(
    store: Store, example: int, name: str, head, source
) -> list[tuple[str, str, float]]:
    """[(token, css background, weight)] of the caption under the source's attention."""
    rec = store.record(example)
    text_w, _ = V.attention_from(store, rec, name, head, source)
    out = []
    top = float(np.max(text_w)) if text_w is not None and len(text_w) else 1.0
    for i, tok in enumerate(rec["tokens"]):
        wgt = 0.0 if text_w is None else float(text_w[i])
        a = 0.85 * wgt / max(top, 1e-9)
        out.append((tok, f"rgba(255,80,0,{a:.3f})", wgt))
    return out


def matrix(store: Store, example: int, name: str, head) -> go.Figure:
    rec = store.record(example)
    m = V.head_map(rec, name, head)
    axes = store.meta["maps"][name]
    q, k = V.axis_labels(store, rec, axes["query"]), V.axis_labels(store, rec, axes["key"])
    head_label = "mean over heads" if head == "mean" else f"head {int(head) + 1}"
    fig = go.Figure(
        go.Heatmap(
            z=m.tolist(),
            x=k,
            y=q,
            colorscale="Viridis",
            hovertemplate="query %{y} → key %{x}: %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=dict(text=f"{name}, {head_label} (rows: queries, columns: keys)", font=dict(size=13)),
        xaxis=dict(type="category", tickangle=-60, tickfont=dict(size=9)),
        yaxis=dict(type="category", autorange="reversed", tickfont=dict(size=9)),
        height=max(420, 14 * len(q) + 160),
        margin=dict(l=120, r=20, t=40, b=120),
    )
    return fig


def hidden(
    store: Store, group: str, example: int | None, picked: int | None = None, neighbours=()
) -> go.Figure:
    coords, rows, labels = V.hidden_points(store, group)
    n = len(rows)
    shown = np.arange(n)
    if n > HIDDEN_POINTS_SHOWN:
        rng = np.random.default_rng(0)
        shown = np.sort(
            np.union1d(
                rng.choice(n, HIDDEN_POINTS_SHOWN, replace=False),
                np.flatnonzero(rows[:, 0] == (example if example is not None else -1)),
            )
        )
    fig = go.Figure()
    for kind, colour, label in ((0, "#1f77b4", "text tokens"), (1, "#ff7f0e", "regions")):
        sel = shown[rows[shown, 1] == kind]
        fig.add_trace(
            go.Scattergl(
                x=coords[sel, 0],
                y=coords[sel, 1],
                mode="markers",
                name=label,
                marker=dict(size=5, color=colour, opacity=0.55),
                customdata=sel.tolist(),
                text=[f"{labels[i]} (ex {rows[i, 0]})" for i in sel],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    if example is not None:
        sel = np.flatnonzero(rows[:, 0] == example)
        fig.add_trace(
            go.Scattergl(
                x=coords[sel, 0],
                y=coords[sel, 1],
                mode="markers",
                name=f"example {example}",
                customdata=sel.tolist(),
                text=[labels[i] for i in sel],
                hovertemplate="%{text}<extra></extra>",
                marker=dict(size=9, color="rgba(0,0,0,0)", line=dict(color="black", width=1.5)),
            )
        )
    if picked is not None:
        near = [r for r, _ in neighbours]
        fig.add_trace(
            go.Scattergl(
                x=coords[near, 0],
                y=coords[near, 1],
                mode="markers",
                name="nearest (hidden space)",
                customdata=near,
                text=[labels[i] for i in near],
                hovertemplate="%{text}<extra></extra>",
                marker=dict(size=12, symbol="diamond-open", color="green", line=dict(width=2)),
            )
        )
        fig.add_trace(
            go.Scattergl(
                x=[coords[picked, 0]],
                y=[coords[picked, 1]],
                mode="markers",
                name=f"picked: {labels[picked]}",
                customdata=[picked],
                marker=dict(size=14, symbol="star", color="red"),
            )
        )
    method = str(store.meta.get("projection") or "pca").upper()
    fig.update_layout(
        title=dict(
            text=f"hidden states at {group}: {method} fitted on all {len(store)} "
            "examples; click a token for its nearest neighbours",
            font=dict(size=13),
        ),
        height=480,
        margin=dict(l=40, r=10, t=40, b=40),
        legend=dict(x=0, y=1),
    )
    return fig


__all__ = ["head_summary", "overlay", "word_colours", "matrix", "hidden"]
