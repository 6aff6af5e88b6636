"""Export for papers, without a browser: every view as PNG and SVG (matplotlib, from the same
arrays the app draws), an example's data as JSON + npz, and a self-contained HTML page.

JSON + npz schema (`value_jax.explore.example/1`, model-agnostic):

  <stem>.json   schema, model_type, id, image_id, caption,
                image {file, width, height},
                tokens {text: [word pieces, [CLS] ... [SEP]], regions: [labels]},
                boxes_xyxy_pixels: [[x1, y1, x2, y2], ...] (one per region),
                attention {name: {query: text|image|joint, key: ..., shape: [H, Q, K],
                                  npz: "attention/<name>"}},
                hidden {group: {shape: [n, D], npz: "hidden/<group>",
                                rows: [[0 text | 1 region, position], ...]}},
                statistics {probe: Result.data of the probe on this example alone}
  <stem>.npz    attention/<name> [H, Q, K] and hidden/<group> [n, D], float16 as stored;
                boxes [R, 4] float32. `joint` axes list the text tokens, then the regions.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from value_jax.viz import stats as S
from value_jax.viz import views as V
from value_jax.viz.store import Store

EXAMPLE_SCHEMA = "value_jax.explore.example/1"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _jsonable(x):
    from value_jax.probes.results import _jsonable as j

    return j(x)


def _save(fig, out: Path, stem: str) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{stem}.{ext}"
        fig.savefig(p, dpi=130 if ext == "png" else None, bbox_inches="tight")
        paths.append(str(p))
    _plt().close(fig)
    return paths


def _image(info: dict) -> np.ndarray | None:
    if not info.get("image") or not os.path.isfile(info["image"]):
        return None
    from PIL import Image

    with Image.open(info["image"]) as im:
        return np.asarray(im.convert("RGB"))


# ---- one figure per view ---------------------------------------------------------------------


def head_summary_figure(store: Store, example: int | None, key: str, zscore: bool = False):
    data, example = S.results_for(store, example, key)
    m, rows, label = S.head_matrix(store, data, key, zscore)
    plt = _plt()
    h = m.shape[1]
    with warnings.catch_warnings():  # rows a statistic does not cover are all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        full = np.concatenate([m, np.nanmean(m, axis=1, keepdims=True)], axis=1)
    fig, ax = plt.subplots(figsize=(2.0 + 0.45 * (h + 1), 1.2 + 0.28 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(full), aspect="auto", cmap="viridis")
    ax.set_xticks(range(h + 1), [str(i + 1) for i in range(h)] + ["mean"])
    ax.set_yticks(range(len(rows)), rows)
    ax.axvline(h - 0.5, color="white", lw=2)
    ax.set_xlabel("head (1-based)")
    scope = "all examples" if example is None else f"example {example}"
    ax.set_title(f"{label}\n{scope}", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def overlay_figure(store: Store, example: int, name: str, head, source, k: int = 3):
    """The image with one translucent box per region (opacity by the source's attention) and
    the caption coloured by its attention to the words."""
    rec = store.record(example)
    info = rec["info"]
    text_w, region_w = V.attention_from(store, rec, name, head, source)
    plt = _plt()
    fig = plt.figure(figsize=(7, 6.2))
    ax = fig.add_axes([0.02, 0.2, 0.96, 0.75])
    img = _image(info)
    w, h = info["width"] or 1, info["height"] or 1
    if img is not None:
        ax.imshow(img, extent=(0, w, h, 0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    boxes = np.asarray(rec["boxes"])
    if region_w is not None:
        alpha = V.overlay_alpha(region_w)
        top = set(V.top_k(region_w, k))
        for r, (x1, y1, x2, y2) in enumerate(boxes):
            ax.add_patch(
                plt.Rectangle(
                    (x1, y1),
                    x2 - x1,
                    y2 - y1,
                    facecolor=(1, 0.3, 0, alpha[r]),
                    edgecolor="red" if r in top else "none",
                    lw=2 if r in top else 0,
                )
            )
            if r in top:
                ax.text(
                    x1 + 2,
                    y1 + 10,
                    f"{rec['regions'][r]} {region_w[r]:.2f}",
                    fontsize=7,
                    color="white",
                    bbox=dict(facecolor="red", alpha=0.8, pad=1, lw=0),
                )
    if source[0] == "region":
        x1, y1, x2, y2 = boxes[source[1]]
        ax.add_patch(
            plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="blue", lw=2, ls="--")
        )
    src = rec["tokens"][source[1]] if source[0] == "text" else rec["regions"][source[1]]
    head_label = "mean over heads" if head == "mean" else f"head {int(head) + 1}"
    ax.set_title(f"{name}, {head_label}: attention from {src!r}", fontsize=9)
    tax = fig.add_axes([0.02, 0.02, 0.96, 0.15])
    tax.axis("off")
    x = 0.0
    top_w = float(np.max(text_w)) if text_w is not None and len(text_w) else 1.0
    for i, tok in enumerate(rec["tokens"]):
        a = 0.0 if text_w is None else float(text_w[i]) / max(top_w, 1e-9) * 0.85
        tax.text(
            x,
            0.5,
            tok,
            fontsize=9,
            va="center",
            bbox=dict(
                facecolor=(1, 0.3, 0, a),
                edgecolor="blue" if (source == ("text", i)) else "none",
                pad=2,
            ),
        )
        x += 0.012 * (len(tok) + 2)
        if x > 0.95:
            x = 0.0
    return fig


def matrix_figure(store: Store, example: int, name: str, head):
    rec = store.record(example)
    m = V.head_map(rec, name, head)
    axes = store.meta["maps"][name]
    plt = _plt()
    q, k = V.axis_labels(store, rec, axes["query"]), V.axis_labels(store, rec, axes["key"])
    size = 0.16 * max(len(q), len(k)) + 2
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m, cmap="viridis")
    ax.set_yticks(range(len(q)), q, fontsize=6)
    ax.set_xticks(range(len(k)), k, fontsize=6, rotation=90)
    ax.set_ylabel("query")
    ax.set_xlabel("key")
    head_label = "mean over heads" if head == "mean" else f"head {int(head) + 1}"
    ax.set_title(f"{name}, {head_label}", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def hidden_figure(store: Store, group: str, example: int | None = None):
    coords, rows, _ = V.hidden_points(store, group)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, colour, label in ((0, "tab:blue", "text"), (1, "tab:orange", "region")):
        sel = rows[:, 1] == kind
        ax.scatter(coords[sel, 0], coords[sel, 1], s=6, c=colour, alpha=0.5, label=label)
    if example is not None:
        sel = rows[:, 0] == example
        ax.scatter(
            coords[sel, 0],
            coords[sel, 1],
            s=30,
            facecolors="none",
            edgecolors="black",
            label=f"example {example}",
        )
    ax.legend(fontsize=8)
    method = store.meta.get("projection", "pca")
    ax.set_title(
        f"hidden states, {group} ({method.upper()} across {len(store)} examples)", fontsize=9
    )
    return fig


def export_views(
    store: Store,
    example: int,
    out_dir,
    *,
    map_name: str | None = None,
    head=0,
    source=("text", 1),
    stat: str = "t2v",
    zscore: bool = False,
    group: str | None = None,
) -> list[str]:
    """Every view of one selection as PNG and SVG under `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    map_name = map_name or V.default_map(store)
    group = group or store.groups[-1]
    paths = []
    paths += _save(head_summary_figure(store, example, stat, zscore), out, f"head_summary_{stat}")
    paths += _save(
        overlay_figure(store, example, map_name, head, source), out, "attention_from_token"
    )
    paths += _save(matrix_figure(store, example, map_name, head), out, "attention_matrix")
    paths += _save(hidden_figure(store, group, example), out, f"hidden_{group}")
    return paths


# ---- data -----------------------------------------------------------------------------------


def export_data(store: Store, example: int, out_dir, stem: str | None = None) -> list[str]:
    """The example as `<stem>.json` + `<stem>.npz` (schema in the module docstring)."""
    rec = store.record(example)
    info = rec["info"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"example_{example}"
    arrays = {"boxes": np.asarray(rec["boxes"], np.float32)}
    attention = {}
    for name, a in rec["attention"].items():
        arrays[f"attention/{name}"] = a
        attention[name] = {
            **store.meta["maps"][name],
            "shape": list(a.shape),
            "npz": f"attention/{name}",
        }
    hidden = {}
    for group in store.groups:
        states, where = store.example_hidden(example, group)
        if not len(states):
            continue
        arrays[f"hidden/{group}"] = states.astype(np.float16)
        hidden[group] = {
            "shape": list(states.shape),
            "npz": f"hidden/{group}",
            "rows": where.tolist(),
        }
    doc = {
        "schema": EXAMPLE_SCHEMA,
        "model_type": store.model_type,
        "id": info["id"],
        "image_id": info["image_id"],
        "caption": info["caption"],
        "image": {"file": info["image"], "width": info["width"], "height": info["height"]},
        "tokens": {"text": rec["tokens"], "regions": rec["regions"]},
        "boxes_xyxy_pixels": np.asarray(rec["boxes"]).tolist(),
        "attention": attention,
        "hidden": hidden,
        "statistics": _jsonable(S.results(store, example)),
    }
    json_path, npz_path = out / f"{stem}.json", out / f"{stem}.npz"
    json_path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    np.savez_compressed(npz_path, **arrays)
    return [str(json_path), str(npz_path)]


def read_export(json_path) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads back `export_data`'s pair: (the JSON document, the npz arrays by key)."""
    doc = json.loads(Path(json_path).read_text(encoding="utf-8"))
    with np.load(Path(json_path).with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return doc, arrays


__all__ = [
    "export_views",
    "export_data",
    "read_export",
    "head_summary_figure",
    "overlay_figure",
    "matrix_figure",
    "hidden_figure",
    "EXAMPLE_SCHEMA",
]
