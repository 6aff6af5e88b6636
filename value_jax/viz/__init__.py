"""The explorer: VL-InterpreT's views for region-box and two-stream models, on the Trace.

store.py    the on-disk store (LMDB records, float16 maps, memory-mapped hidden states)
compute.py  examples → one jitted pass per batch (the runner's step) → store records
sources.py  examples from Flickr30k Entities or a captions file, over any region features
stats.py    head statistics, from the probes' own finalize
views.py    what each view shows, as arrays (shared by the app and the exports)
export.py   PNG/SVG (matplotlib), JSON + npz
html.py     one self-contained HTML page per example
app.py      the Dash app
"""
