"""`python -m experiments.explore --model=uniter|lxmert`: the interactive explorer.

Runs the examples through the model (one jitted pass per batch), writes them to a store under
`<out_dir>/explore/<model>/store`, and serves VL-InterpreT's views for region boxes and two
streams on http://127.0.0.1:<port>/. With no data flags: the built-in demo, whose planted heads
send each key word to its object's box (UNITER layer 3 head 2, LXMERT cross1.l2v head 2).

Data (one of):
  --flickr30k_root DIR --flickr30k_features FILE [--images DIR]   Flickr30k Entities captions
  --captions FILE --features FILE [--images DIR]                   `image_id<TAB>caption` lines
Region features: LXMERT TSV, UNITER npz dir or LMDB, VOLTA LMDB. `--objects_vocab` (VG
objects_vocab.txt) names the regions by their detector class.
On a remote machine: `ssh -L 8050:127.0.0.1:8050 user@host`, then open http://127.0.0.1:8050/.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import app, flags

from experiments import common, config
from experiments.common import say
from experiments.config import RunConfig

flags.adopt_module_key_flags(config)  # --help lists the shared flags

flags.DEFINE_integer("port", 8050, "Port of the app on --host (0: any free port).")
flags.DEFINE_string(
    "host", "127.0.0.1", "Interface to serve on (loopback: reach it through an SSH port forward)."
)
flags.DEFINE_boolean(
    "export_only",
    False,
    "Write the store (and the exports of the first "
    "--export_examples examples) and exit without serving.",
)
flags.DEFINE_integer(
    "export_examples", 1, "With --export_only: examples exported as PNG/SVG, JSON + npz and HTML."
)
flags.DEFINE_string("features", "", "Region features for --captions (TSV, npz dir, LMDB).")
flags.DEFINE_string("captions", "", "Captions file: one `image_id<TAB>caption` a line.")
flags.DEFINE_string("images", "", "Folder of the images, `<image_id>.jpg|png` (or COCO names).")
flags.DEFINE_string(
    "objects_vocab", "", "Detector class names (VG objects_vocab.txt) to label regions."
)
flags.DEFINE_enum(
    "projection",
    "pca",
    ["pca", "umap"],
    "Hidden-state projection (umap needs umap-learn; falls back to PCA).",
)


@dataclasses.dataclass(frozen=True)
class ExploreOptions:
    """The explorer's own flags (`cfg.script`), with the flags' defaults."""

    port: int = flags.FLAGS["port"].default
    host: str = flags.FLAGS["host"].default
    export_only: bool = flags.FLAGS["export_only"].default
    export_examples: int = flags.FLAGS["export_examples"].default
    features: str = flags.FLAGS["features"].default
    captions: str = flags.FLAGS["captions"].default
    images: str = flags.FLAGS["images"].default
    objects_vocab: str = flags.FLAGS["objects_vocab"].default
    projection: str = flags.FLAGS["projection"].default


# The demo's planted head per model (0-based head 1): what the app opens on.
PLANTED = {"uniter": "layer3", "lxmert": "cross1.l2v"}


def _session_and_examples(cfg: RunConfig, opts: ExploreOptions):
    import value_jax
    from value_jax.data.tokenization import WordPieceTokenizer
    from value_jax.viz import compute, sources

    max_images = cfg.max_images or None
    if common.using_demo(cfg):
        if cfg.flickr30k_root or opts.captions:
            raise SystemExit(
                "data flags need --checkpoint (and --vocab): the demo data runs "
                "with the demo checkpoint only"
            )
        from value_jax.data.demo import make_explore_demo

        root = os.path.join(cfg.out_dir, "demo", "explore", cfg.model)
        demo = make_explore_demo(root, cfg.model)
        say(
            f"no --checkpoint: using the built-in explorer demo in {root} (planted heads: "
            + f"{PLANTED[cfg.model]} head 2 sends each key word to its boxes)"
        )
        model, params = value_jax.load(demo.checkpoint)
        tokenizer = WordPieceTokenizer(demo.vocab, demo.lowercase)
        regions = sources.open_regions(demo.features, labels=demo.region_labels)
        infos = sources.flickr_examples(
            demo.flickr_root,
            regions,
            tokenizer,
            demo.images,
            split=cfg.split,
            max_images=max_images,
            seed=cfg.seed,
        )
    else:
        if not cfg.vocab:
            raise SystemExit(
                "--checkpoint needs --vocab: the WordPiece vocab.txt the checkpoint "
                "was trained with (bert-base-cased for UNITER, bert-base-uncased "
                "for LXMERT)"
            )
        model, params = common.load_model(cfg, None)
        vocab, lowercase = common.vocab_path(cfg, None)
        tokenizer = WordPieceTokenizer(vocab, lowercase)
        if opts.captions:
            if not opts.features:
                raise SystemExit("--captions needs --features (the region features of its images)")
            regions = sources.open_regions(opts.features, opts.objects_vocab)
            infos = sources.caption_examples(
                opts.captions, regions, tokenizer, opts.images, max_examples=max_images
            )
        elif cfg.flickr30k_root:
            if not cfg.flickr30k_features:
                raise SystemExit("--flickr30k_root needs --flickr30k_features")
            regions = sources.open_regions(cfg.flickr30k_features, opts.objects_vocab)
            infos = sources.flickr_examples(
                cfg.flickr30k_root,
                regions,
                tokenizer,
                opts.images,
                split=cfg.split,
                max_images=max_images,
                seed=cfg.seed,
            )
        else:
            raise SystemExit(
                "--checkpoint needs data: --captions FILE --features FILE, or "
                "--flickr30k_root DIR --flickr30k_features FILE"
            )
    if not infos:
        raise SystemExit("no examples to explore: the data flags left nothing")
    session = compute.Session(model, params, tokenizer, regions, batch_size=cfg.batch_size)
    return session, infos


def main(argv):
    del argv
    cfg = RunConfig.from_flags()
    run(cfg, config.script_options(ExploreOptions, cfg))


def run(cfg: RunConfig, opts: ExploreOptions):
    from value_jax.viz import compute
    from value_jax.viz.store import open_store, store_bytes

    base = os.path.join(cfg.out_dir, "explore", cfg.model)
    store_dir = os.path.join(base, "store")
    session, infos = _session_and_examples(cfg, opts)
    say(
        f"[explore] running {len(infos)} examples through {cfg.model} (batches of {cfg.batch_size})"
    )
    facts = compute.write_store(session, infos, store_dir, projection=opts.projection, log=say)
    size = store_bytes(store_dir)
    say(
        f"[explore] wrote {facts['examples']} examples to {store_dir} in {facts['seconds']:.1f} s "
        f"({size / max(facts['examples'], 1) / 1e6:.2f} MB per example)"
    )
    store = open_store(store_dir)
    # The demo opens on its planted head (0-based head 1); other data on the first map.
    planted = (PLANTED[cfg.model], 1) if common.using_demo(cfg) else (None, 0)
    if opts.export_only:
        from value_jax.viz.app import export_example

        for i in range(min(opts.export_examples, len(store))):
            out = os.path.join(base, "export", f"example_{i}")
            rec = store.record(i)
            named = [
                p
                for p, t in enumerate(rec["tokens"])
                if any(t in label.split()[1:] for label in rec["regions"])
            ]
            paths = export_example(
                store,
                i,
                out,
                map_name=planted[0],
                head=planted[1],
                source=("text", named[0] if named else 1),
            )
            say(f"[explore] exported example {i}: {len(paths)} files in {out}")
        return
    from value_jax.viz.app import make_app, serve

    server = serve(
        make_app(
            store,
            session,
            export_dir=os.path.join(base, "export"),
            map_name=planted[0],
            head=planted[1],
        ),
        opts.host,
        opts.port,
    )
    say(
        f"[explore] serving the explorer at {server.url} (Ctrl-C stops it; from another machine: "
        f"ssh -L {server.port}:127.0.0.1:{server.port} <this host>, then open "
        f"http://127.0.0.1:{server.port}/)"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    app.run(main)
