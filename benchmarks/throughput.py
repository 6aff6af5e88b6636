"""End-to-end throughput of `experiments.all`'s two data passes, stage by stage, and the
projected wall time of the full Flickr30k Entities + Visual Genome run.

    python benchmarks/throughput.py                          # >= 1,000 captions, UNITER-base
    python benchmarks/throughput.py --captions=200 --vg_images=30 --layers=4   # quick

Generates Flickr30k-shaped data (the demo generator: 5 captions per image, 36 regions of 2,048
features per image, a third of the images in the val split) and Visual-Genome-shaped data, then
times, on a base-size model with random weights:

  read+collate     building the loader (annotations, alignment, tokenization) and collating
                   every batch, from the raw files and from the prepared TFDS records;
  forward+probes   the jitted pass (forward, Trace, every probe step of `all`'s Flickr30k pass:
                   fusion, modality, image-to-text, coreference, head summary; the relation
                   probe for VG), compilation excluded (every batch shape, targets included,
                   is compiled before the timing);
  spill            writing the collected features to disk, as the runner does beyond its
                   memory budget (every full run does), flushed to the disk;
  probers          each probe's finalize (the attention/embedding probers train here).

Examples/s per stage, then the projection for 158,915 captions (31,783 images) and
--full_vg_images Visual Genome images (VG's items capped at VALUE's sampling, 2 x 32 predicates
x 15,000 pairs). Reading, the spill and the linear (Eq. 3) probers scale linearly in examples
or items (the spilled bytes are charged twice: written, and read back once from the disk at
the rate they were written; the probers' timings read them from the page cache). The forward
passes scale by batches: each batch shape's time per batch times the batches its rows fill at
full size (the last batch of every bucket is padded: a small run pays that padding many times
over, the full run about once per bucket), plus one compilation of every shape the buckets
allow. The Eq. 4 probers do not scale linearly: at full size every epoch is capped at
`epoch_items` train items and early stopping scores `stopping_dev_items` dev items, so a probe
costs (its epochs) x (one capped epoch, timed here at that size for each input width) plus one
evaluation of all its items; a layer whose in-memory fit would exceed the memory budget at full
size reads its rows streamed from the collected arrays, and is charged the streamed epoch, the
streamed evaluation and a statistics pass, timed here from a memmap. Each probe is assumed to
run as many epochs as it ran here (at least patience + 1; the lower bound is printed too). The
same cost model applied to this run's sizes is printed next to the measured prober time, and
how many probes would stream at full size.
Targets: < 6 h on the 2-core CPU, < 15 min on one GPU.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "uniter", ["uniter", "lxmert"], "Which model (base size).")
flags.DEFINE_integer("captions", 1000, "Val captions of the generated Flickr30k data (at least).")
flags.DEFINE_integer("vg_images", 100, "Generated Visual Genome images.")
flags.DEFINE_integer("layers", 0, "Encoder layers (0: the base model's).")
flags.DEFINE_integer("batch_size", 32, "Examples per batch.")
flags.DEFINE_integer(
    "full_captions", 158915, "Captions of the full run (all of Flickr30k Entities)."
)
flags.DEFINE_integer(
    "full_vg_images",
    108077,
    "VG images of the full run (every image; an upper bound, VALUE's sampling keeps fewer).",
)
flags.DEFINE_integer("feat_dim", 2048, "Detector feature size of the generated data.")
flags.DEFINE_integer(
    "timing_repeats", 2, "Timings of each Eq. 4 epoch cost after the compiling one (the least)."
)
flags.DEFINE_string("dir", None, "Where to generate the data (default: a new temp dir).")


def _model(model_type, vocab_size, layers, feat_dim=2048):
    """The base-size model with random weights; `layers` > 0: that many encoder layers (LXMERT:
    language layers, and half as many relational and cross layers)."""
    import jax

    from value_jax.models import LxmertConfig, UniterConfig, build_model, init_params

    if model_type == "uniter":
        cfg = UniterConfig(
            vocab_size=vocab_size,
            img_dim=feat_dim,
            **({"num_layers": layers} if layers else {}),
        )
    else:
        cfg = LxmertConfig(
            vocab_size=vocab_size,
            visual_feat_dim=feat_dim,
            **(
                {
                    "l_layers": layers,
                    "r_layers": max(1, layers // 2),
                    "x_layers": max(1, layers // 2),
                }
                if layers
                else {}
            ),
        )
    model = build_model(cfg)
    return model, init_params(model, jax.random.PRNGKey(0))


def _collate_all(loader):
    start = time.perf_counter()
    batches = list(loader)
    return batches, time.perf_counter() - start


class _FitLog:
    """Records, inside it, every prober fit (`probing.fit_linear` / `fit_bilinear`, task and
    control: kind, probes, width, rank, train and dev items, epochs per probe, seconds) and every
    Eq. 4 evaluation (`probing.evaluate_bilinear`: probes, width, rank, items, seconds)."""

    def __init__(self):
        self.fits, self.scored = [], []

    def __enter__(self):
        import jax

        from value_jax.probes import probing

        self._saved = probing.fit_linear, probing.fit_bilinear, probing.evaluate_bilinear

        def timed(fn, record):
            def run(*args, **kwargs):
                start = time.perf_counter()
                out = jax.block_until_ready(fn(*args, **kwargs))
                record(out, args, kwargs, time.perf_counter() - start)
                return out

            return run

        def fit(kind):
            def record(probe, args, kwargs, seconds):
                x = args[0]
                self.fits.append(
                    dict(
                        kind=kind,
                        probes=x.shape[0],
                        width=x.shape[-1],
                        rank=kwargs.get("rank") or x.shape[-1],
                        train=x.shape[1],
                        dev=args[2 if kind == "linear" else 3].shape[1],
                        epochs=[int(e) for e in probe.record.epochs_run],
                        patience=kwargs.get("patience"),
                        seconds=seconds,
                    )
                )

            return record

        def scored(_, args, kwargs, seconds):
            probe, e_i = args[0], args[1]
            self.scored.append(
                dict(
                    fit=len(self.fits) - 1,  # train_prober scores what it last fitted
                    probes=e_i.shape[0],
                    width=e_i.shape[-1],
                    rank=probe.weights["w_i"].shape[-1],
                    items=e_i.shape[1],
                    seconds=seconds,
                )
            )

        probing.fit_linear = timed(probing.fit_linear, fit("linear"))
        probing.fit_bilinear = timed(probing.fit_bilinear, fit("bilinear"))
        probing.evaluate_bilinear = timed(probing.evaluate_bilinear, scored)
        return self

    def __exit__(self, *exc):
        from value_jax.probes import probing

        probing.fit_linear, probing.fit_bilinear, probing.evaluate_bilinear = self._saved


def _epoch_costs(widths, batch_size=256, repeats=2):
    """Per (width, rank): seconds of one capped Eq. 4 epoch (EPOCH_ITEMS train items in
    minibatches of `batch_size`, and the dev check on STOPPING_DEV_ITEMS items) and of
    evaluating one item, for one probe, timed on random data of that size (epochs: the least
    of `repeats` timings after the compiling one: this host's vary by ~20%); with `streamed_`
    the same with the rows read from a memmap (`CollectedRows`), as fits beyond the memory
    budget read them, plus `streamed_stats`, the statistics pass per train item."""
    import jax
    import numpy as np

    from value_jax.probes import classifiers as C

    out = {}
    n, m = C.EPOCH_ITEMS, C.STOPPING_DEV_ITEMS
    for width, rank in sorted(widths):
        rng = np.random.default_rng(0)
        e_i, e_j = rng.normal(size=(2, 1, n + m, width)).astype(np.float32)
        y = rng.integers(0, 2, n + m).astype(np.int32)
        with tempfile.TemporaryDirectory() as tmp:
            disk = []
            for name, x in (("i", e_i), ("j", e_j)):
                x[0].tofile(os.path.join(tmp, name))
                disk.append(np.memmap(os.path.join(tmp, name), np.float32, "r", shape=x[0].shape))
            rows = [C.CollectedRows(x, np.arange(n + m)) for x in disk]
            out[(width, rank)] = c = {}
            for prefix, (x_i, x_j), split in (
                ("", (e_i, e_j), lambda x, lo, hi: x[:, lo:hi]),
                ("streamed_", rows, lambda x, lo, hi: x.subset(np.arange(lo, hi))),
            ):
                parts = [split(x, lo, hi) for lo, hi in ((0, n), (n, n + m)) for x in (x_i, x_j)]
                args = (*parts[:2], y[:n], *parts[2:], y[n:], 2)
                times = {1: math.inf, 3: math.inf}
                for epochs in (1, 3) * (1 + repeats):  # the first call of each compiles
                    start = time.perf_counter()
                    probe = C.fit_bilinear(
                        *args,
                        jax.random.PRNGKey(0),
                        rank=rank,
                        max_epochs=epochs,
                        patience=epochs,
                        batch_size=batch_size,
                    )
                    jax.block_until_ready(probe.weights)
                    times[epochs] = min(times[epochs], time.perf_counter() - start)
                jax.block_until_ready(C.evaluate_bilinear(probe, x_i, x_j, y))  # compile
                start = time.perf_counter()
                jax.block_until_ready(C.evaluate_bilinear(probe, x_i, x_j, y))
                c[prefix + "epoch"] = (times[3] - times[1]) / 2
                c[prefix + "item"] = (time.perf_counter() - start) / (n + m)
            C._row_stats(rows[0].subset(np.arange(n)), C.STREAM_ROWS)  # compile
            start = time.perf_counter()
            C._row_stats(rows[0].subset(np.arange(n)), C.STREAM_ROWS)
            c["streamed_stats"] = 2 * (time.perf_counter() - start) / n  # e_i and e_j
    return out


def _streams(fit, scale):
    """Whether the logged Eq. 4 fit, at `scale` x its items, reads its rows streamed (one
    layer's in-memory fit beyond the budget, as `pair_probers._fit_layers` decides)."""
    from value_jax.probes import pair_probers as PP

    items = int((fit["train"] + 2 * fit["dev"]) * scale)  # train + dev + test
    return PP._fit_memory(items, fit["width"]) > PP.EMBEDDING_PROBER_BUDGET_BYTES


def _project_probers(log, scale, costs):
    """Seconds of the logged fits and evaluations at `scale` x their items (see the module
    docstring), and the same with every Eq. 4 probe at patience + 1 epochs."""
    from value_jax.probes import classifiers as C

    total = lower = 0.0
    for f in log.fits:
        if f["kind"] == "linear" or f["train"] * scale < C.EPOCH_ITEMS:
            total += f["seconds"] * scale
            lower += f["seconds"] * scale
            continue
        c = costs[(f["width"], f["rank"])]
        prefix = "streamed_" if _streams(f, scale) else ""
        stats = f["probes"] * f["train"] * scale * c["streamed_stats"] if prefix else 0.0
        total += sum(f["epochs"]) * c[prefix + "epoch"] + stats
        lower += f["probes"] * (f["patience"] + 1) * c[prefix + "epoch"] + stats
    scoring = 0.0
    for e in log.scored:
        prefix = "streamed_" if _streams(log.fits[e["fit"]], scale) else ""
        c = costs[(e["width"], e["rank"])]
        scoring += e["probes"] * e["items"] * scale * c[prefix + "item"]
    return total + scoring, lower + scoring


def _model_at_run_size(log, costs):
    """The cost model of `_project_probers` at the logged fits' own sizes (uncapped epochs)."""
    from value_jax.probes import classifiers as C

    total = 0.0
    for f in log.fits:
        if f["kind"] == "linear":
            total += f["seconds"]
            continue
        c = costs[(f["width"], f["rank"])]
        train_share = (f["train"] // 256 * 256) / C.EPOCH_ITEMS
        dev_share = min(f["dev"], C.STOPPING_DEV_ITEMS) / C.STOPPING_DEV_ITEMS
        dev_item_cost = C.STOPPING_DEV_ITEMS * c["item"]
        epoch = (c["epoch"] - dev_item_cost) * train_share + dev_item_cost * dev_share
        total += sum(f["epochs"]) * epoch
    return total + sum(
        e["probes"] * e["items"] * costs[(e["width"], e["rank"])]["item"] for e in log.scored
    )


def _shape_key(batch, targets):
    """The shapes of every array of a batch and its targets: one XLA compilation each."""
    import jax

    return tuple(
        (str(path), leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path((batch, targets))
        if hasattr(leaf, "shape")
    )


def _pass(model, params, batches, probes):
    """(seconds of the timed pass, finalize seconds per probe, collected items, `_FitLog`,
    {batch shape: [batches, real rows, seconds]}, {batch shape: compilation seconds},
    `_spill_seconds`) — every shape compiled before the timing."""
    import jax
    import numpy as np

    from value_jax.data.collate import EXAMPLE_INDEX
    from value_jax.runner import _shard, data_mesh, make_step
    from value_jax.state import Accumulator
    from value_jax.trace import Layout

    layout = Layout.from_config(model.config)
    for p in probes:
        p.bind(layout)
    mesh = data_mesh()
    step = make_step(model, probes)
    shapes, compile_seconds = {}, {}
    for batch, targets in batches:  # compile every shape once, untimed
        key = _shape_key(batch, targets)
        if key not in shapes:
            shapes[key] = [0, 0, 0.0]
            begin = time.perf_counter()
            jax.block_until_ready(step(params, _shard(batch, mesh), _shard(targets, mesh)))
            compile_seconds[key] = time.perf_counter() - begin
    accs = {p.name: Accumulator(p.collect_keys) for p in probes}
    start = time.perf_counter()
    for batch, targets in batches:
        begin = time.perf_counter()
        for name, s in jax.device_get(
            step(params, _shard(batch, mesh), _shard(targets, mesh))
        ).items():
            accs[name].update(s)
        entry = shapes[_shape_key(batch, targets)]
        entry[0] += 1
        entry[1] += int(np.sum(np.asarray(targets[EXAMPLE_INDEX]) >= 0))
        entry[2] += time.perf_counter() - begin
    forward = time.perf_counter() - start
    spill = _spill_seconds(accs)
    for key, (n, _, seconds) in shapes.items():  # the first call less one timed call
        compile_seconds[key] = max(compile_seconds[key] - seconds / n, 0.0)
    finalize, items = {}, 0
    with _FitLog() as log:
        for p in probes:
            start = time.perf_counter()
            stats = accs[p.name].result()
            p.finalize(stats, {"batches": len(batches), "devices": 1})
            finalize[p.name] = time.perf_counter() - start
            items += max((len(stats[k]) for k in p.collect_keys if k in stats), default=0)
    return forward, finalize, items, log, shapes, compile_seconds, spill


def _spill_seconds(accs):
    """`(seconds, bytes)` of writing every collected row to disk as the runner spills them
    beyond `--collect_budget_mb` (`state.Accumulator.spill`), flushed to the disk (`fsync`)
    so that the page cache does not hide what a full run, far larger than memory, pays."""
    from value_jax.state import Accumulator

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        nbytes = 0
        for name, acc in accs.items():
            copy = Accumulator(acc.collect_keys, os.path.join(tmp, name))
            for key, c in acc.collected.items():
                copy.collected[key].parts = list(c.parts)
                copy.collected[key].dtype, copy.collected[key].trail = c.dtype, c.trail
            copy.spill()
            for c in copy.collected.values():
                for path in c.files() if c.rows_on_disk else ():
                    nbytes += os.path.getsize(path)
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
        return time.perf_counter() - start, nbytes


def _spill_line(spill):
    seconds, nbytes = spill
    return (
        f"{nbytes / 1e9:.2f} GB in {seconds:.1f} s ({nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
    )


def _shapes_line(shapes, batch_size):
    batches = sum(n for n, _, _ in shapes.values())
    rows = sum(r for _, r, _ in shapes.values())
    return (
        f"{len(shapes)} batch shapes, each compiled before the timing; {rows} of "
        f"{batches * batch_size} rows real"
    )


def _project_compile(compile_seconds, buckets, region_sizes):
    """Seconds of compiling the jitted pass in the full run: the mean compilation here times
    every (text, item) bucket at each region size seen (the full run may meet shapes this run
    did not)."""
    mean = sum(compile_seconds.values()) / max(len(compile_seconds), 1)
    return mean * len(buckets.text) * len(buckets.items) * max(len(region_sizes), 1)


def _project_forward(shapes, scale, batch_size):
    """Seconds of the jitted pass at `scale` x the examples: each batch shape's mean seconds
    per batch times the batches its rows fill at that scale (a bucket's last batch is padded,
    which a small run pays many times over and the full run about once per bucket)."""
    return sum(
        math.ceil(rows * scale / batch_size) * seconds / n for n, rows, seconds in shapes.values()
    )


def main(argv):
    del argv
    import jax

    from value_jax.data import tfds_builders as T
    from value_jax.data.demo import make_demo_data
    from value_jax.data.loaders import CorefLoader
    from value_jax.data.relation_loader import RelationLoader
    from value_jax.data.tokenization import read_vocab
    from value_jax.models.configs import CONFIGS
    from value_jax.probes.coref import CorefProbe
    from value_jax.probes.fusion import FusionProbe
    from value_jax.probes.head_summary import HeadSummaryProbe
    from value_jax.probes.modality import ImageToTextProbe, ModalityProbe
    from value_jax.probes.relation import RelationProbe

    root = FLAGS.dir or tempfile.mkdtemp(prefix="throughput-")
    images = 3 * math.ceil(FLAGS.captions / 5)
    start = time.perf_counter()
    demo = make_demo_data(
        os.path.join(root, "data"),
        n_images=images,
        feat_dim=FLAGS.feat_dim,
        n_vg_images=FLAGS.vg_images,
    )
    print(
        f"data: {images} Flickr30k-shaped images, {FLAGS.vg_images} VG images under {root} "
        f"({time.perf_counter() - start:.0f} s to generate)",
        flush=True,
    )
    uncased = CONFIGS[FLAGS.model].lowercase
    vocab = demo.vocab_uncased if uncased else demo.vocab_cased
    model, params = _model(FLAGS.model, len(read_vocab(vocab)), FLAGS.layers, FLAGS.feat_dim)
    print(
        f"model: {FLAGS.model}, {jax.devices()[0].device_kind}, batch {FLAGS.batch_size}",
        flush=True,
    )

    rows = {}
    # ---- Flickr30k pass -------------------------------------------------------------------
    start = time.perf_counter()
    loader = CorefLoader(
        demo.flickr_root, demo.flickr_features_tsv, vocab, uncased, batch_size=FLAGS.batch_size
    )
    batches, collate = _collate_all(loader)
    raw_read = time.perf_counter() - start
    n = len(loader.examples)
    config = T.CorefConfig(
        name="bench",
        flickr_root=demo.flickr_root,
        features=demo.flickr_features_tsv,
        vocab=vocab,
        lowercase=uncased,
    )
    builder = T.ValueCoref(config=config, data_dir=os.path.join(root, "tfds"))
    start = time.perf_counter()
    builder.download_and_prepare()
    prepare = time.perf_counter() - start
    start = time.perf_counter()
    prepared = T.prepared_loader(builder, "val", FLAGS.batch_size, lazy=True)
    _collate_all(prepared)
    prepared_read = time.perf_counter() - start
    probes = [FusionProbe(), CorefProbe(types=loader.types), HeadSummaryProbe()]
    if model.config.single_stream:
        probes += [ModalityProbe(), ImageToTextProbe()]
    forward, finalize, items, log_f, shapes_f, compile_f, spill_f = _pass(
        model, params, batches, probes
    )
    rows["flickr"] = dict(
        examples=n,
        read=raw_read,
        prepared_read=prepared_read,
        prepare=prepare,
        forward=forward,
        probers=sum(finalize.values()),
        items=items,
        shapes=shapes_f,
        compile=compile_f,
        spill=spill_f,
        buckets=loader.buckets,
        regions={b.region_feats.shape[1] for b, _ in batches},
    )
    print(
        f"Flickr30k pass, {n} captions ({items} collected coreference items):\n"
        f"  read+collate, raw files      {n / raw_read:8.1f} captions/s  ({raw_read:.1f} s, "
        f"of which collate {collate:.1f} s)\n"
        f"  read+collate, prepared TFDS  {n / prepared_read:8.1f} captions/s  "
        f"({prepared_read:.1f} s; preparing once took {prepare:.1f} s)\n"
        f"  forward+probes               {n / forward:8.1f} captions/s  ({forward:.1f} s; "
        f"{_shapes_line(shapes_f, FLAGS.batch_size)})\n"
        f"  spill to disk (fsync)        {_spill_line(spill_f)}\n"
        f"  probers (finalize)           {sum(finalize.values()):8.1f} s  "
        + ", ".join(f"{k} {v:.1f} s" for k, v in finalize.items()),
        flush=True,
    )

    # ---- Visual Genome pass ---------------------------------------------------------------
    start = time.perf_counter()
    vg = RelationLoader(
        demo.vg_root, demo.vg_features_tsv, vocab, uncased, batch_size=FLAGS.batch_size
    )
    vg_batches, _ = _collate_all(vg)
    vg_read = time.perf_counter() - start
    forward_vg, finalize_vg, items_vg, log_v, shapes_v, compile_v, spill_v = _pass(
        model, params, vg_batches, [RelationProbe(vg.predicates)]
    )
    m = len(vg.examples)
    rows["vg"] = dict(
        examples=m,
        read=vg_read,
        forward=forward_vg,
        probers=sum(finalize_vg.values()),
        items=items_vg,
        shapes=shapes_v,
        compile=compile_v,
        spill=spill_v,
        buckets=vg.buckets,
        regions={b.region_feats.shape[1] for b, _ in vg_batches},
    )
    print(
        f"Visual Genome pass, {m} images ({items_vg} pairs):\n"
        f"  read+collate   {m / vg_read:8.1f} images/s\n"
        f"  forward+probes {m / forward_vg:8.1f} images/s  ({forward_vg:.1f} s; "
        f"{_shapes_line(shapes_v, FLAGS.batch_size)})\n"
        f"  spill to disk  {_spill_line(spill_v)}\n"
        f"  probers        {sum(finalize_vg.values()):8.1f} s",
        flush=True,
    )

    # ---- projection -----------------------------------------------------------------------
    f, v = rows["flickr"], rows["vg"]
    scale_f, scale_v = FLAGS.full_captions / f["examples"], FLAGS.full_vg_images / v["examples"]
    # VALUE's sampling keeps at most 15,000 pairs of each of 32 predicates, as many negatives.
    scale_v_items = min(v["items"] * scale_v, 2 * 32 * 15000) / max(v["items"], 1)
    costs = _epoch_costs(
        {(x["width"], x["rank"]) for x in log_f.fits + log_v.fits if x["kind"] != "linear"},
        repeats=FLAGS.timing_repeats,
    )
    print(
        "\nOne capped Eq. 4 epoch, one probe: "
        + ", ".join(
            f"width {w} rank {r}: {c['epoch']:.2f} s (+ {c['item'] * 1e6:.1f} µs per item evaluated)"
            for (w, r), c in costs.items()
        )
        + "\nStreamed from a memmap: "
        + ", ".join(
            f"width {w}: {c['streamed_epoch']:.2f} s (+ {c['streamed_item'] * 1e6:.1f} µs per "
            f"item evaluated, {c['streamed_stats'] * 1e6:.1f} µs per train item for the statistics)"
            for (w, r), c in costs.items()
        )
    )
    print(
        f"Cost model at this run's sizes: Flickr30k probers {_model_at_run_size(log_f, costs):.0f} s "
        f"(measured {f['probers']:.0f} s), VG {_model_at_run_size(log_v, costs):.0f} s "
        f"(measured {v['probers']:.0f} s)"
    )
    probers_f, lower_f = _project_probers(log_f, scale_f, costs)
    probers_v, lower_v = _project_probers(log_v, scale_v_items, costs)
    stages = {
        "Flickr30k read+collate (prepared)": f["prepared_read"] * scale_f,
        "Flickr30k forward+probes": _project_forward(f["shapes"], scale_f, FLAGS.batch_size),
        "Flickr30k probers": probers_f,
        "VG read+collate (raw)": v["read"] * scale_v,
        "VG forward+probes": _project_forward(v["shapes"], scale_v, FLAGS.batch_size),
        "VG probers": probers_v,
        "Flickr30k spilled features (write, read once)": 2 * f["spill"][0] * scale_f,
        "VG spilled features (write, read once)": 2 * v["spill"][0] * scale_v_items,
        "compilations (every possible shape)": sum(
            _project_compile(r["compile"], r["buckets"], r["regions"]) for r in (f, v)
        ),
    }
    total = sum(stages.values())
    print(
        f"\nProjected full run ({FLAGS.full_captions} captions + {FLAGS.full_vg_images} VG "
        f"images, {v['items'] * scale_v_items:.0f} VG pairs) on this machine: {total / 3600:.2f} h"
    )
    for name, secs in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {name:46s} {secs / 3600:6.2f} h  ({100 * secs / total:4.1f} %)")
    raw_total = total - stages["Flickr30k read+collate (prepared)"] + f["read"] * scale_f
    print(f"  (from the raw Flickr30k files instead: {raw_total / 3600:.2f} h)")
    lower = total - probers_f - probers_v + lower_f + lower_v
    print(f"  (every Eq. 4 probe stopping at patience + 1 epochs: {lower / 3600:.2f} h)")
    # Host memory of the Eq. 4 fits at full size: a layer whose in-memory fit would exceed the
    # budget is streamed from the collected arrays (bounded by the epoch cap:
    # benchmarks/prober_memory.py); the others hold at most the budget.
    from value_jax.probes import pair_probers as PP

    fits = [
        (x, scale)
        for log, scale in ((log_f, scale_f), (log_v, scale_v_items))
        for x in log.fits
        if x["kind"] != "linear"
    ]
    streamed = sum(x["probes"] for x, scale in fits if _streams(x, scale))
    print(
        f"  (memory: {streamed} of {sum(x['probes'] for x, _ in fits)} Eq. 4 probes at full size "
        f"stream their rows; every other fit holds at most "
        f"{PP.EMBEDDING_PROBER_BUDGET_BYTES / 2**30:.0f} GiB)"
    )


if __name__ == "__main__":
    app.run(main)
