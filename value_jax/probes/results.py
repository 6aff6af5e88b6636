"""A probe's Result: JSON data, Markdown tables shaped like the paper's, matplotlib figures.

Files are written atomically (temporary file + rename), so an interrupted write never leaves a
truncated results.json behind, with the permissions a plain `open` would give (0666 less the
umask). Writing the same Result twice gives byte-identical files, figures included: SVG ids come
from a fixed hash salt and no date is embedded.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Callable

import numpy as np

from value_jax.io import write_atomic


@dataclasses.dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[Any]]

    def to_markdown(self) -> str:
        fmt = lambda v: f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)
        lines = [
            f"**{self.caption}**",
            "",
            "| " + " | ".join(self.header) + " |",
            "|" + "|".join("---" for _ in self.header) + "|",
        ]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Result:
    """What a probe's `finalize` returns.

    `data` is JSON-able (numpy arrays become lists); `figures` maps a file stem to a function
    `(matplotlib Figure) -> None` that draws into it.
    """

    name: str
    data: dict[str, Any]
    tables: list[Table] = dataclasses.field(default_factory=list)
    figures: dict[str, Callable] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **_jsonable(self.data)}

    def to_markdown(self) -> str:
        return "\n".join(t.to_markdown() for t in self.tables)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# A fixed salt makes the SVG element ids a function of the figure alone (the default is random).
SVG_HASH_SALT = "value_jax"
# Matplotlib stamps SVGs with the current date; PNGs (Agg) carry no timestamp.
SAVE_METADATA = {"svg": {"Date": None}, "png": {}}


def write_result(result: Result, out_dir: str, flags: dict | None = None) -> list[str]:
    """Writes `results.json`, `table.md`, `flags.json` and every figure as PNG and SVG."""
    written = []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    write_atomic(path, json.dumps(result.to_json(), indent=2, sort_keys=True))
    written.append(path)
    path = os.path.join(out_dir, "table.md")
    write_atomic(path, result.to_markdown())
    written.append(path)
    if flags is not None:
        path = os.path.join(out_dir, "flags.json")
        write_atomic(path, json.dumps(_jsonable(flags), indent=2, sort_keys=True))
        written.append(path)
    if result.figures:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for stem, draw in result.figures.items():
            with matplotlib.rc_context({"svg.hashsalt": SVG_HASH_SALT}):
                fig = plt.figure(figsize=(6, 4.5))
                try:
                    draw(fig)
                    fig.tight_layout()
                    for ext in ("png", "svg"):
                        path = os.path.join(out_dir, f"{stem}.{ext}")
                        buf = io.BytesIO()
                        fig.savefig(buf, dpi=120, format=ext, metadata=SAVE_METADATA[ext])
                        write_atomic(path, buf.getvalue())
                        written.append(path)
                finally:
                    plt.close(fig)
    return written


def heatmap(
    values: np.ndarray,
    title: str,
    xlabel="head",
    ylabel="layer",
    cmap="viridis",
    vmin=None,
    vmax=None,
) -> Callable:
    """A figure drawer for a `[layers, heads]` heatmap with 1-based tick labels (VALUE Fig. 3/4)."""

    def draw(fig):
        ax = fig.add_subplot(111)
        im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(values.shape[1]), [str(i + 1) for i in range(values.shape[1])])
        ax.set_yticks(range(values.shape[0]), [str(i + 1) for i in range(values.shape[0])])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.colorbar(im, ax=ax)

    return draw


def line_plot(
    series: dict[str, np.ndarray],
    title: str,
    xlabel: str,
    ylabel: str,
    xticks: list[str] | None = None,
) -> Callable:
    def draw(fig):
        ax = fig.add_subplot(111)
        for label, ys in series.items():
            ax.plot(range(len(ys)), ys, marker="o", label=label)
        if xticks is not None:
            ax.set_xticks(range(len(xticks)), xticks, rotation=45, ha="right")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if len(series) > 1:
            ax.legend()

    return draw
