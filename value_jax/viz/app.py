"""The Dash app over a store: example picker (and typed captions), head summary, attention from a
token over box overlays and words, the full attention matrix, hidden states, export.

    app = make_app(store, session)          # session: compute.Session, for typed captions
    server = serve(app, port=8050)          # a background thread; server.shutdown() stops it

Every callback reads one example lazily from the store and builds its figure from
`value_jax.viz.figures`; statistics come from the probes (`stats`). Element ids are stable
(the browser tests use them).

The Dash layout and its callbacks stay in one module (about 530 lines): each callback names
the layout's component ids.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import flask
import numpy as np
from dash import ALL, Dash, Input, Output, State, ctx, dcc, html, no_update

from value_jax.viz import export
from value_jax.viz import figures as F
from value_jax.viz import stats as S
from value_jax.viz import views as V

PREFIX = "/explore"
_SPAN = {
    "display": "inline-block",
    "padding": "2px 4px",
    "margin": "1px",
    "cursor": "pointer",
    "borderRadius": "3px",
    "border": "1px solid #ddd",
    "fontFamily": "monospace",
}


def image_url(store, example: int) -> str | None:
    return f"{PREFIX}/image/{example}" if store.examples[example].get("image") else None


def _example_options(store):
    return [
        {
            "label": f"{e['index']}: {e['caption']}" + (" (typed)" if e.get("added") else ""),
            "value": e["index"],
        }
        for e in store.examples
    ]


def _head_options(store):
    return [{"label": f"head {h + 1}", "value": str(h)} for h in range(store.meta["num_heads"])] + [
        {"label": "mean over heads", "value": "mean"}
    ]


def _head(value):
    return "mean" if value in (None, "mean") else int(value)


def _source(value):
    value = value or {"kind": "text", "pos": 1}
    return (value["kind"], int(value["pos"]))


def make_app(
    store,
    session=None,
    export_dir: str | None = None,
    title: str = "value_jax explorer",
    map_name: str | None = None,
    head: int = 0,
):
    """The app over `store`; `map_name` / `head` (0-based) are the first selection."""
    app = Dash(__name__, title=title, suppress_callback_exceptions=True)
    export_dir = export_dir or str(Path(store.path).parent / "export")
    _routes(app.server, store)
    groups = store.groups
    data0 = S.results(store, None)
    stat_options = [{"label": S.LABELS[k], "value": k} for k in S.available(store, data0)]
    first = 0 if len(store) else None
    app.layout = html.Div(
        style={"fontFamily": "sans-serif", "margin": "10px"},
        children=[
            html.H3(
                f"{title}: {store.model_type.upper()}, {len(store)} examples "
                f"(attention written query→key)"
            ),
            dcc.Store(id="source", data={"kind": "text", "pos": 1}),
            html.Div(
                id="example-picker",
                style={"display": "flex", "gap": "16px", "alignItems": "flex-start"},
                children=[
                    html.Img(id="thumb", style={"maxHeight": "110px", "border": "1px solid #ccc"}),
                    html.Div(
                        style={"flex": 1},
                        children=[
                            html.Label("Example"),
                            dcc.Dropdown(
                                id="example",
                                options=_example_options(store),
                                value=first,
                                clearable=False,
                            ),
                            html.Div(
                                id="caption", style={"margin": "6px 0", "fontStyle": "italic"}
                            ),
                            html.Div(
                                [
                                    dcc.Input(
                                        id="new-caption",
                                        type="text",
                                        placeholder=(
                                            "type a new caption for this image"
                                            if session
                                            else "typed captions need the model (run python -m experiments.explore)"
                                        ),
                                        disabled=session is None,
                                        style={"width": "60%"},
                                        debounce=False,
                                    ),
                                    html.Button(
                                        "Add caption", id="add-caption", disabled=session is None
                                    ),
                                    html.Span(id="add-status", style={"marginLeft": "8px"}),
                                ]
                            ),
                        ],
                    ),
                ],
            ),
            html.Hr(),
            html.H4("Head summary"),
            html.Div(
                style={"display": "flex", "gap": "12px"},
                children=[
                    dcc.Dropdown(
                        id="stat",
                        options=stat_options,
                        clearable=False,
                        value=next(
                            (o["value"] for o in stat_options if o["value"] == "coref_t2v"), "t2v"
                        ),
                        style={"width": "520px"},
                    ),
                    dcc.RadioItems(
                        id="scope",
                        options=[
                            {"label": " this example", "value": "example"},
                            {"label": " all examples (= results.json)", "value": "all"},
                        ],
                        value="all",
                        inline=True,
                    ),
                    dcc.Checklist(
                        id="zscore",
                        options=[{"label": " z-score across layers", "value": "z"}],
                        value=[],
                    ),
                ],
            ),
            dcc.Graph(id="head-summary"),
            html.Hr(),
            html.Div(
                id="attention-view",
                children=[
                    html.H4("Attention from a token"),
                    html.Div(
                        style={"display": "flex", "gap": "12px", "alignItems": "center"},
                        children=[
                            html.Label("map"),
                            dcc.Dropdown(
                                id="map",
                                options=store.map_names,
                                value=map_name or V.default_map(store),
                                clearable=False,
                                style={"width": "220px"},
                            ),
                            html.Label("head"),
                            dcc.Dropdown(
                                id="head",
                                options=_head_options(store),
                                value=str(head),
                                clearable=False,
                                style={"width": "180px"},
                            ),
                            html.Button("▶ play", id="play"),
                            dcc.Interval(id="ticker", interval=900, disabled=True),
                        ],
                    ),
                    html.Div(
                        "Click a word piece or a region (in the list or on the image):",
                        style={"margin": "6px 0"},
                    ),
                    html.Div(id="words"),
                    dcc.Graph(id="overlay", config={"displaylogo": False}),
                    html.Div(id="regions", style={"fontSize": "12px"}),
                ],
            ),
            html.Hr(),
            html.H4("Attention matrix"),
            dcc.Graph(id="matrix"),
            html.Hr(),
            html.Div(
                id="hidden-view",
                children=[
                    html.H4("Hidden states"),
                    dcc.Slider(
                        id="layer",
                        min=0,
                        max=max(len(groups) - 1, 0),
                        step=1,
                        value=max(len(groups) - 1, 0),
                        marks={i: g for i, g in enumerate(groups)},
                    ),
                    html.Div(
                        style={"display": "flex", "gap": "12px"},
                        children=[
                            html.Div(dcc.Graph(id="hidden"), style={"flex": 3}),
                            html.Div(
                                style={"flex": 1},
                                children=[
                                    html.Img(id="crop", style={"maxWidth": "200px"}),
                                    html.Div(id="hover-label"),
                                    html.H5(
                                        "Nearest neighbours across examples (cosine, hidden space)"
                                    ),
                                    html.Ol(id="neighbours"),
                                ],
                            ),
                        ],
                    ),
                ],
            ),
            dcc.Store(id="picked"),
            html.Hr(),
            html.Button("Export this example (PNG, SVG, JSON + npz, HTML)", id="export"),
            html.Div(id="export-status", style={"whiteSpace": "pre", "fontSize": "12px"}),
        ],
    )

    @app.callback(
        Output("thumb", "src"),
        Output("caption", "children"),
        Output("source", "data", allow_duplicate=True),
        Input("example", "value"),
        prevent_initial_call="initial_duplicate",
    )
    def pick_example(example):
        if example is None:
            return None, "", no_update
        info = store.examples[example]
        return image_url(store, example), info["caption"], {"kind": "text", "pos": 1}

    @app.callback(
        Output("head-summary", "figure"),
        Input("example", "value"),
        Input("stat", "value"),
        Input("scope", "value"),
        Input("zscore", "value"),
    )
    def head_summary(example, stat, scope, zscore):
        return F.head_summary(store, None if scope == "all" else example, stat, bool(zscore))

    @app.callback(
        Output("map", "value"),
        Output("head", "value"),
        Input("head-summary", "clickData"),
        prevent_initial_call=True,
    )
    def pick_head(click):
        if not click:
            return no_update, no_update
        point = click["points"][0]
        return point["y"], "mean" if point["x"] == "mean" else str(int(point["x"]) - 1)

    @app.callback(
        Output("source", "data"),
        Input({"type": "token", "index": ALL}, "n_clicks"),
        Input({"type": "region", "index": ALL}, "n_clicks"),
        Input("overlay", "clickData"),
        Input("ticker", "n_intervals"),
        State("source", "data"),
        State("example", "value"),
        prevent_initial_call=True,
    )
    def pick_source(_tokens, _regions, click, _tick, current, example):
        trig = ctx.triggered_id
        if trig == "ticker":
            n = store.examples[example]["n_text"]
            kind, pos = _source(current)
            return {"kind": "text", "pos": (pos + 1) % n if kind == "text" else 0}
        if trig == "overlay":
            if not click or "customdata" not in click["points"][0]:
                return no_update
            return {"kind": "region", "pos": int(click["points"][0]["customdata"][0])}
        if isinstance(trig, dict) and any(t["value"] for t in ctx.triggered):
            return {
                "kind": "text" if trig["type"] == "token" else "region",
                "pos": int(trig["index"]),
            }
        return no_update

    @app.callback(
        Output("ticker", "disabled"),
        Output("play", "children"),
        Input("play", "n_clicks"),
        State("ticker", "disabled"),
        prevent_initial_call=True,
    )
    def play(_, disabled):
        return (False, "⏸ pause") if disabled else (True, "▶ play")

    @app.callback(
        Output("overlay", "figure"),
        Output("words", "children"),
        Output("regions", "children"),
        Input("example", "value"),
        Input("map", "value"),
        Input("head", "value"),
        Input("source", "data"),
    )
    def attention_view(example, name, head, source):
        return attention_outputs(store, example, name, _head(head), _source(source))

    @app.callback(
        Output("matrix", "figure"),
        Input("example", "value"),
        Input("map", "value"),
        Input("head", "value"),
    )
    def matrix(example, name, head):
        return F.matrix(store, example, name, _head(head))

    @app.callback(
        Output("picked", "data"),
        Input("hidden", "clickData"),
        Input("layer", "value"),
        prevent_initial_call=True,
    )
    def pick_hidden(click, _layer):
        if ctx.triggered_id == "layer" or not click:
            return None
        data = click["points"][0].get("customdata")
        return None if data is None else int(data)

    @app.callback(
        Output("hidden", "figure"),
        Output("neighbours", "children"),
        Input("layer", "value"),
        Input("example", "value"),
        Input("picked", "data"),
    )
    def hidden(layer, example, picked):
        if not groups:
            return {}, []
        group = groups[int(layer)]
        if picked is None:
            # The first neighbour search on a layer builds its unit-norm table (~0.7 s for
            # 1,000 base examples): start it now, while the user looks at the projection.
            threading.Thread(target=store.nearest, args=(group, 0, 1), daemon=True).start()
        near = store.nearest(group, picked) if picked is not None else []
        _, rows, _ = store.hidden(group)
        items = []
        for r, sim in near:
            ex, kind, pos = (int(v) for v in rows[r])
            info = store.examples[ex]
            label = info["tokens"][pos] if kind == 0 else info["regions"][pos]
            items.append(html.Li(f"{label!r} in example {ex} ({info['caption'][:50]}): {sim:.3f}"))
        return F.hidden(store, group, example, picked, near), items

    @app.callback(
        Output("crop", "src"),
        Output("hover-label", "children"),
        Input("hidden", "hoverData"),
        State("layer", "value"),
        prevent_initial_call=True,
    )
    def hover(hover_data, layer):
        if not hover_data or hover_data["points"][0].get("customdata") is None:
            return no_update, no_update
        _, rows, _ = store.hidden(groups[int(layer)])
        ex, kind, pos = (int(v) for v in rows[int(hover_data["points"][0]["customdata"])])
        info = store.examples[ex]
        if kind == 0:
            return None, f"word piece {info['tokens'][pos]!r} of example {ex}"
        src = f"{PREFIX}/crop/{ex}/{pos}.png" if info.get("image") else None
        return src, f"region {info['regions'][pos]} of example {ex}"

    @app.callback(
        Output("example", "options"),
        Output("example", "value"),
        Output("add-status", "children"),
        Output("new-caption", "value"),
        Input("add-caption", "n_clicks"),
        Input("new-caption", "n_submit"),
        State("new-caption", "value"),
        State("example", "value"),
        prevent_initial_call=True,
    )
    def add_caption(_clicks, _submit, caption, example):
        if session is None or not (caption or "").strip() or example is None:
            return no_update, no_update, "type a caption first", no_update
        start = time.perf_counter()
        index = session.add_caption(store, example, caption)
        took = time.perf_counter() - start
        return (
            _example_options(store),
            index,
            f"added example {index} ({took * 1000:.0f} ms through the jitted model)",
            "",
        )

    @app.callback(
        Output("export-status", "children"),
        Input("export", "n_clicks"),
        State("example", "value"),
        State("map", "value"),
        State("head", "value"),
        State("source", "data"),
        State("stat", "value"),
        State("zscore", "value"),
        State("layer", "value"),
        prevent_initial_call=True,
    )
    def do_export(_, example, name, head, source, stat, zscore, layer):
        out = os.path.join(export_dir, f"example_{example}")
        paths = export_example(
            store,
            example,
            out,
            map_name=name,
            head=_head(head),
            source=_source(source),
            stat=stat,
            zscore=bool(zscore),
            group=groups[int(layer)] if groups else None,
        )
        return "wrote:\n" + "\n".join(paths)

    return app


def attention_outputs(store, example, name, head, source):
    """The overlay figure, the coloured words and the region chips of one selection."""
    rec_info = store.examples[example]
    kind, pos = source
    limit = rec_info["n_text"] if kind == "text" else rec_info["n_regions"]
    if pos >= limit:
        source = ("text", min(1, rec_info["n_text"] - 1))
    fig = F.overlay(store, example, name, head, source, image_url(store, example))
    words = []
    for i, (tok, colour, wgt) in enumerate(F.word_colours(store, example, name, head, source)):
        style = dict(_SPAN, background=colour)
        if source == ("text", i):
            style["border"] = "2px solid blue"
        words.append(
            html.Span(
                tok,
                id={"type": "token", "index": i},
                style=style,
                title=f"{wgt:.4f}",
                **{"data-weight": f"{wgt:.6f}"},
            )
        )
    chips = []
    for r, label in enumerate(rec_info["regions"]):
        style = dict(_SPAN, fontSize="11px")
        if source == ("region", r):
            style["border"] = "2px solid blue"
        chips.append(html.Span(label, id={"type": "region", "index": r}, style=style))
    return fig, words, chips


def export_example(store, example: int, out_dir, **selection) -> list[str]:
    """Every view (PNG + SVG), the data (JSON + npz) and the HTML page of one example."""
    from value_jax.viz import html as H

    paths = export.export_views(store, example, out_dir, **selection)
    paths += export.export_data(store, example, out_dir)
    paths.append(H.write_html(store, example, os.path.join(out_dir, f"example_{example}.html")))
    return paths


def _routes(server: flask.Flask, store) -> None:
    @server.route(f"{PREFIX}/image/<int:example>")
    def _image(example):
        path = store.examples[example].get("image")
        if not path or not os.path.isfile(path):
            flask.abort(404)
        return flask.send_file(os.path.abspath(path))

    @server.route(f"{PREFIX}/crop/<int:example>/<int:region>.png")
    def _crop(example, region):
        from PIL import Image

        path = store.examples[example].get("image")
        if not path or not os.path.isfile(path):
            flask.abort(404)
        x1, y1, x2, y2 = np.asarray(store.record(example)["boxes"][region], float)
        with Image.open(path) as im:
            crop = im.convert("RGB").crop((int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))))
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        buf.seek(0)
        return flask.send_file(buf, mimetype="image/png")


class _Server:
    def __init__(self, app, host: str, port: int):
        from werkzeug.serving import make_server

        self._srv = make_server(host, port, app.server, threaded=True)
        self.host, self.port = host, self._srv.server_port
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._srv.shutdown()
        self._thread.join(timeout=5)


def serve(app, host: str = "127.0.0.1", port: int = 8050) -> _Server:
    """Serves the app from a background thread (port 0: a free port); `.url`, `.shutdown()`."""
    return _Server(app, host, port)


__all__ = ["make_app", "serve", "attention_outputs", "export_example", "image_url"]
