"""What every experiment shares: flags, the model (a converted checkpoint or the built-in demo),
the demo data, and writing results next to the flags that made them.

With no `--checkpoint` an experiment builds the demo checkpoint: a small deterministic model in
the ORIGINAL PyTorch layout (`checkpoints_convert.fake`), converted with the real converter —
so the demo exercises the same path a user's `Epoch20_LXRT.pth` or `uniter-base.pt` takes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_enum("model", "uniter", ["uniter", "lxmert"], "Which model to probe.")
flags.DEFINE_string("checkpoint", "", "A converted checkpoint directory (python -m "
                    "checkpoints_convert). Empty: the built-in demo checkpoint.")
flags.DEFINE_string("out_dir", "out", "Results go to <out_dir>/<analysis>/<model>/.")
flags.DEFINE_integer("batch_size", 8, "Examples per forward pass (a multiple of the device count "
                     "to shard the batch).")
flags.DEFINE_integer("seed", 0, "Seed of every random choice (negatives, baselines, probers).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Forward dtype; reductions stay "
                  "float32. bfloat16 is for TPUs/GPUs (it is slower on CPUs without bf16).")
flags.DEFINE_integer("max_images", 0, "Use at most this many images / sentences (0 = all).")
flags.DEFINE_boolean("resume", True, "Resume an interrupted run from its saved accumulators "
                     "(only when every input that changes a number is unchanged).")
flags.DEFINE_integer("checkpoint_every", 20, "Save the accumulators every this many batches.")
flags.DEFINE_enum("buckets", "fit", ["fit", "fixed"], "Static batch shapes: fitted to the "
                  "data (the least padding for at most 4 text x 7 region sizes) or the fixed "
                  "grid of value_jax.data.collate.DEFAULT_BUCKETS.")
flags.DEFINE_float("collect_budget_mb", 4096, "Host memory for the per-item features collected "
                   "for the probers; beyond it they are appended to files under <out_dir>/_state "
                   "(or _spill) and streamed from disk.")
flags.DEFINE_string("coordinator_address", "", "Several processes (hosts): host:port of process "
                    "0, passed to jax.distributed.initialize. Empty: one process, except on a "
                    "TPU pod slice, where initialize() finds its peers itself.")
flags.DEFINE_integer("num_processes", 1, "Several processes: how many take part.")
flags.DEFINE_integer("process_id", 0, "Several processes: this one's index (0 writes results).")
flags.DEFINE_string("vocab", "", "WordPiece vocab.txt (bert-base-cased for UNITER, "
                    "bert-base-uncased for LXMERT). Required with --checkpoint; empty with the "
                    "demo.")
flags.DEFINE_enum("lowercase", "auto", ["auto", "true", "false"], "Lowercase text before "
                  "WordPiece. auto: from the vocabulary (a vocab with cased entries, like "
                  "bert-base-cased, is used cased; an uncased one lowercased).")
flags.DEFINE_string("flickr30k_root", "", "Flickr30k Entities root (Sentences/, Annotations/, "
                    "val.txt). Empty: the demo data.")
flags.DEFINE_string("flickr30k_features", "", "Region features of the Flickr30k images (LXMERT "
                    "TSV, UNITER npz dir or LMDB, VOLTA LMDB).")
flags.DEFINE_string("split", "val", "Flickr30k Entities split.")
flags.DEFINE_enum("region_source", "iou", ["iou", "gold_in_features"], "How gold boxes become "
                  "regions: IoU alignment to detected boxes, or gold boxes present in the features.")
flags.DEFINE_float("iou_threshold", 0.5, "IoU needed to link a gold box to a detected region.")
flags.DEFINE_string("vg_root", "", "Visual Genome root (relationships.json, ...). Empty: demo.")
flags.DEFINE_string("vg_features", "", "Region features of the Visual Genome images.")
flags.DEFINE_string("tfds_data_dir", "", "Read the Flickr30k Entities and Visual Genome "
                    "examples from datasets prepared once by `python -m experiments.prepare` "
                    "(TFDS, array_record) under this folder instead of the raw files.")
flags.DEFINE_string("senteval_dir", "", "Directory of SentEval probing files. Empty: demo.")
flags.DEFINE_list("senteval_tasks", [], "SentEval tasks to probe (default: every file present).")
flags.DEFINE_boolean("fusion_include_special", False, "Fusion NMI: also cluster [CLS] and [SEP] "
                     "(VALUE does not say; default: words and regions only).")
flags.DEFINE_enum("sentence_pooling", "mean", ["mean", "cls"], "SentEval sentence embedding: mean "
                  "of the word tokens or the [CLS] state.")

flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be at least 1")
flags.register_validator("checkpoint_every", lambda v: v >= 1,
                         "--checkpoint_every must be at least 1")
flags.register_validator("max_images", lambda v: v >= 0,
                         "--max_images must be 0 (all) or a positive count")

DEMO_FEAT_DIM = 32
# Flags that never change a number: left out of the resume fingerprint.
NOT_IN_FINGERPRINT = ("out_dir", "resume", "checkpoint_every", "coordinator_address",
                      "process_id", "collect_budget_mb")


def using_demo() -> bool:
    return not FLAGS.checkpoint


def model_tag() -> str:
    return FLAGS.model


def result_dir(analysis: str) -> str:
    return os.path.join(FLAGS.out_dir, analysis, model_tag())


def demo_config(model_type: str, vocab_size: int):
    from value_jax.models import LxmertConfig, UniterConfig
    if model_type == "uniter":
        return UniterConfig.tiny(vocab_size=vocab_size, img_dim=DEMO_FEAT_DIM, hidden_size=48,
                                 num_heads=4, num_layers=4, intermediate_size=96,
                                 num_region_labels=1601)
    # The detector's real class counts, so the demo uses the real class-index convention.
    return LxmertConfig.tiny(vocab_size=vocab_size, visual_feat_dim=DEMO_FEAT_DIM, hidden_size=48,
                             num_heads=4, intermediate_size=96, l_layers=3, r_layers=2, x_layers=2,
                             num_object_labels=1600, num_attr_labels=400)


def build_demo_checkpoint(root: str, model_type: str, vocab_size: int, seed: int = 0) -> str:
    """A fake checkpoint in the original PyTorch layout, converted by the real converter.

    Cached under `root/checkpoints/<model>`; rebuilt if missing.
    """
    out = os.path.join(root, "checkpoints", model_type)
    config_path = os.path.join(out, "config.json")
    if os.path.isfile(config_path):
        import json
        with open(config_path) as f:
            cached = json.load(f)
        want = dataclasses.asdict(demo_config(model_type, vocab_size))
        if all(cached.get(k) == v for k, v in want.items()):
            return out
        say(f"rebuilding the demo checkpoint {out}: its config differs from this version's")
    from checkpoints_convert import convert_checkpoint
    from checkpoints_convert.fake import write_fake_checkpoint
    os.makedirs(os.path.join(root, "pytorch"), exist_ok=True)
    fmt, name = {"uniter": ("uniter", "uniter-demo.pt"), "lxmert": ("lxmert", "Epoch20_LXRT-demo.pth")}[model_type]
    # Query/key weights scaled so attention logits have std ~1.5: a BERT-style init gives
    # near-uniform maps, which make a dull demo.
    src = write_fake_checkpoint(os.path.join(root, "pytorch", name), fmt,
                                demo_config(model_type, vocab_size), seed=seed,
                                attention_score_std=1.5)
    num_heads = demo_config(model_type, vocab_size).num_heads
    convert_checkpoint(src, fmt, out, num_heads=num_heads, overwrite=True)
    return out


def vocab_path(demo) -> tuple[str, bool]:
    """(vocab file, lowercase). The demo: UNITER's vocab is cased, LXMERT's uncased. A user's
    `--vocab`: casing from `--lowercase`, by default from the vocabulary itself, so that an
    uncased BERT baseline loaded as `--model=uniter` is lowercased as it was trained."""
    if FLAGS.vocab:
        path = FLAGS.vocab
    elif demo is not None:
        path = demo.vocab_uncased if FLAGS.model == "lxmert" else demo.vocab_cased
    else:
        raise SystemExit("--checkpoint needs --vocab: the WordPiece vocab.txt the checkpoint was "
                         "trained with (bert-base-cased for UNITER, bert-base-uncased for LXMERT)")
    if FLAGS.lowercase != "auto":
        return path, FLAGS.lowercase == "true"
    return path, not vocab_is_cased(path)


def vocab_is_cased(path: str) -> bool:
    """True when the vocabulary holds cased word pieces (bert-base-cased has ~5,000 entries with
    capitals; bert-base-uncased none outside its [SPECIAL] tokens)."""
    from value_jax.data.tokenization import read_vocab
    pieces = [t for t in read_vocab(path) if not (t.startswith("[") and t.endswith("]"))]
    return any(any(c.isupper() for c in t) for t in pieces)


def load_model(demo=None):
    """`(model, params)` from `--checkpoint`, or the demo checkpoint; `--dtype` applied."""
    import value_jax
    from value_jax.data.tokenization import read_vocab
    init_distributed()
    path = FLAGS.checkpoint
    if not path:
        vocab, _ = vocab_path(demo)
        path = lead_first(lambda: build_demo_checkpoint(os.path.join(FLAGS.out_dir, "demo"),
                                                        FLAGS.model, len(read_vocab(vocab))))
        say(f"no --checkpoint given: using the built-in demo checkpoint {path} "
            "(random weights in the original PyTorch layout, converted)")
    model, params = value_jax.load(path)
    if model.config.model_type != FLAGS.model:
        raise SystemExit(f"--checkpoint {path} holds a {model.config.model_type} model but "
                         f"--model={FLAGS.model}")
    vocab, _ = vocab_path(demo)
    size = len(read_vocab(vocab))
    if size > model.config.vocab_size:
        raise SystemExit(f"--vocab {vocab} has {size} entries but the checkpoint {path} embeds "
                         f"only {model.config.vocab_size} token ids: the vocabulary does not "
                         "belong to this checkpoint")
    _inputs["checkpoint"] = {"path": os.path.abspath(path),
                             "id": value_jax.checkpoint.checkpoint_id(path)}
    _inputs["vocab"] = file_identity(vocab)
    if FLAGS.dtype != model.config.dtype:
        model = model.clone(config=dataclasses.replace(model.config, dtype=FLAGS.dtype))
    return model, params


# What this run read (checkpoint identity, data files): part of every state fingerprint.
_inputs: dict = {}


def file_identity(path: str) -> dict:
    """Identity of a data file or folder without reading it: path, size and modification time
    (of every file below a folder). A changed file makes saved state unusable."""
    import hashlib
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not os.path.isdir(path):
        return {"path": path, "missing": True}
    h, n = hashlib.sha256(), 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            if name.endswith(".idx.json") or name.endswith("-lock"):
                continue                     # our own offset index / lmdb's lock file
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
    return {"path": path, "files": n, "listing_sha256": h.hexdigest()}


def run_fingerprint(data_paths=()) -> dict:
    """The caller's part of a runner state fingerprint: checkpoint, vocab, data files, flags."""
    flags_now = {k: v for k, v in flag_values().items() if k not in NOT_IN_FINGERPRINT}
    return {"flags": flags_now, **_inputs,
            "data_files": {p: file_identity(p) for p in sorted(set(filter(None, data_paths)))}}


def flag_values() -> dict:
    """The flags this run used (written as flags.json next to the results): every flag defined
    by a module of `experiments` or by the script run."""
    names = [f.name for module, defined in FLAGS.flags_by_module_dict().items()
             if module == "__main__" or module.split(".")[0] == "experiments"
             or module == getattr(sys.modules.get("__main__"), "__file__", None)
             for f in defined]
    return {n: FLAGS[n].value for n in sorted(set(names))}


def write(result, analysis: str | None = None) -> str:
    """Writes the result's files (process 0 only) and prints its tables."""
    from value_jax.probes.results import write_result
    out = result_dir(analysis or result.name)
    if not is_lead():
        return out
    files = write_result(result, out, flag_values())
    say(f"wrote {', '.join(os.path.basename(f) for f in files)} to {out}")
    print(result.to_markdown())
    return out


def say(msg: str) -> None:
    if _distributed["done"] and not is_lead():
        return
    print(msg, file=sys.stderr, flush=True)


# ---- data ---------------------------------------------------------------------------------

DEMO_IMAGES = 30  # Flickr30k demo images (a third land in val)


def demo_data():
    from value_jax.data.demo import make_demo_data
    init_distributed()
    return lead_first(lambda: make_demo_data(os.path.join(FLAGS.out_dir, "demo", "data"), seed=0,
                                             n_images=DEMO_IMAGES, feat_dim=DEMO_FEAT_DIM))


_distributed = {"done": False}


def init_distributed() -> None:
    """Joins the other processes (`--coordinator_address`, `--num_processes`, `--process_id`;
    on a multi-host TPU slice without them, JAX's own detection). Called once, before anything
    touches a JAX device; a no-op for a one-process run."""
    if _distributed["done"]:
        return
    _distributed["done"] = True
    import jax
    if FLAGS.coordinator_address or FLAGS.num_processes > 1:
        if not FLAGS.coordinator_address:
            raise SystemExit("--num_processes > 1 needs --coordinator_address=host:port")
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise SystemExit(f"--process_id={FLAGS.process_id} is not in [0, "
                             f"{FLAGS.num_processes})")
        if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu").split(","):
            # CPU devices of several processes reduce through gloo (TPU/GPU have their own).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def is_lead() -> bool:
    """Process 0: the one that writes results (every process computes the same ones)."""
    import jax
    return jax.process_index() == 0


def lead_first(make):
    """`make()` on process 0, then on the others once it is done (they find its files on a
    shared file system, or make their own)."""
    import jax
    if jax.process_count() == 1:
        return make()
    from jax.experimental import multihost_utils
    value = make() if is_lead() else None
    multihost_utils.sync_global_devices("value_jax lead_first")
    return value if is_lead() else make()


def needs_demo(*data_flags: str) -> bool:
    """Whether the built-in demo stands in for something. Without --checkpoint the demo
    checkpoint and vocabulary are used (data flags given still win); with --checkpoint every
    `data_flags` (and --vocab) is required: a real model never runs on demo data silently."""
    if using_demo():
        return True
    prepared_flags = ("flickr30k_root", "flickr30k_features", "vg_root")
    missing = [f"--{f}" for f in dict.fromkeys((*data_flags, "vocab")) if not FLAGS[f].value
               and not (FLAGS.tfds_data_dir and f in prepared_flags)]
    if missing:
        raise SystemExit(f"--checkpoint={FLAGS.checkpoint} needs {', '.join(missing)}: the demo "
                         "data only runs with the demo checkpoint (no --checkpoint)")
    return False


def _max_images():
    return FLAGS.max_images or None


def buckets():
    from value_jax.data.collate import DEFAULT_BUCKETS
    return "fit" if FLAGS.buckets == "fit" else DEFAULT_BUCKETS


def _load(loader_class, *args, **kwargs):
    """A loader; nothing left after filtering ends the run with the data report, not a trace."""
    from value_jax.data.errors import NoExamplesError
    try:
        return loader_class(*args, **kwargs)
    except NoExamplesError as e:
        raise SystemExit(f"{e}\n(flags: --max_images={FLAGS.max_images}, "
                         f"--split={FLAGS.split})") from None


def coref_sources(demo) -> tuple[str, str]:
    """(Flickr30k Entities root, region features) from the flags, or the demo's."""
    if FLAGS.flickr30k_root:
        if not FLAGS.flickr30k_features:
            raise SystemExit("--flickr30k_root needs --flickr30k_features")
        return FLAGS.flickr30k_root, FLAGS.flickr30k_features
    say(f"no --flickr30k_root: using the built-in demo data in {demo.root}")
    return demo.flickr_root, (demo.flickr_features_gold_tsv if FLAGS.region_source ==
                              "gold_in_features" else demo.flickr_features_tsv)


def relation_sources(demo) -> tuple[str, str]:
    """(Visual Genome root, region features) from the flags, or the demo's."""
    if FLAGS.vg_root:
        if not FLAGS.vg_features:
            raise SystemExit("--vg_root needs --vg_features")
        return FLAGS.vg_root, FLAGS.vg_features
    say(f"no --vg_root: using the built-in demo data in {demo.root}")
    return demo.vg_root, demo.vg_features_tsv


def coref_loader(demo):
    """Flickr30k Entities captions + regions with coreference targets (also feeds fusion and
    modality, which need no targets); from the prepared dataset with --tfds_data_dir."""
    if FLAGS.tfds_data_dir:
        return prepared("coref", demo)
    from value_jax.data.loaders import CorefLoader
    vocab, lowercase = vocab_path(demo)
    root, feats = coref_sources(demo)
    loader = _load(CorefLoader, root, feats, vocab, lowercase, split=FLAGS.split,
                   batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                   region_source=FLAGS.region_source, iou_threshold=FLAGS.iou_threshold,
                   max_images=_max_images(), buckets=buckets())
    loader.data_paths = (root, feats)
    return loader


def relation_loader(demo, captions="region"):
    if FLAGS.tfds_data_dir:
        return prepared("relation", demo, captions)
    from value_jax.data.loaders import RelationLoader
    vocab, lowercase = vocab_path(demo)
    root, feats = relation_sources(demo)
    loader = _load(RelationLoader, root, feats, vocab, lowercase, batch_size=FLAGS.batch_size,
                   seed=FLAGS.seed, iou_threshold=FLAGS.iou_threshold, captions=captions,
                   max_images=_max_images(), buckets=buckets())
    loader.data_paths = (root, feats)
    return loader


# ---- prepared datasets (TFDS, array_record) ------------------------------------------------

def tfds_builder(kind: str, demo, captions: str = "region", with_sources: bool = False):
    """The TFDS builder of this run's settings under --tfds_data_dir. Its config name carries
    the model, a hash of every preparation setting and of the vocabulary's content, so a
    dataset prepared with other settings or another vocabulary is never read as this one."""
    import hashlib
    import json
    from value_jax.data import tfds_builders as T
    vocab, lowercase = vocab_path(demo)
    common_kw = dict(vocab=os.path.abspath(vocab), lowercase=lowercase, seed=FLAGS.seed,
                     iou_threshold=FLAGS.iou_threshold, max_images=_max_images())
    if kind == "coref":
        cls, paths = T.ValueCoref, coref_sources(demo) if with_sources else ("", "")
        config = T.CorefConfig(name="x", flickr_root=os.path.abspath(paths[0] or "."),
                               features=os.path.abspath(paths[1] or "."), splits=(FLAGS.split,),
                               region_source=FLAGS.region_source, **common_kw)
    else:
        cls, paths = T.ValueRelations, relation_sources(demo) if with_sources else ("", "")
        config = T.RelationConfig(name="x", vg_root=os.path.abspath(paths[0] or "."),
                                  features=os.path.abspath(paths[1] or "."), captions=captions,
                                  **common_kw)
    with open(vocab, "rb") as f:
        key = json.dumps([T.prepared_with(config), hashlib.sha256(f.read()).hexdigest()],
                         sort_keys=True)
    name = f"{FLAGS.model}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    config = dataclasses.replace(config, name=name,
                                 description=f"prepared for {FLAGS.model}: {key}")
    with quiet_tfds():
        return cls(config=config, data_dir=os.path.abspath(FLAGS.tfds_data_dir))


@contextlib.contextmanager
def quiet_tfds():
    """TFDS logs every builder it constructs at WARNING/INFO; the run's own lines say enough."""
    from absl import logging as absl_logging
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def prepared(kind: str, demo, captions: str = "region"):
    """A loader over the prepared records (region features read per batch from the records)."""
    from value_jax.data.tfds_builders import prepared_loader
    builder = tfds_builder(kind, demo, captions)
    if not builder.is_prepared():
        raise SystemExit(f"--tfds_data_dir={FLAGS.tfds_data_dir} holds no {kind} dataset "
                         f"prepared with these settings ({builder.builder_config.name}): run "
                         "`python -m experiments.prepare` with the same --model, --vocab, "
                         "data and setting flags first")
    split = FLAGS.split if kind == "coref" else builder.SPLIT
    with quiet_tfds():
        loader = prepared_loader(builder, split, FLAGS.batch_size, lazy=True, buckets=buckets())
    if not loader.examples:
        raise SystemExit(f"{builder.data_dir}: the prepared {split} split holds no example")
    say(f"[{kind}] reading the prepared dataset {builder.data_dir}")
    meta = builder.info.metadata
    if kind == "coref":
        loader.types = tuple(meta["types"])
    else:
        loader.predicates = tuple(meta["predicates"])
    loader.data_paths = (str(builder.data_dir),)
    return loader


def senteval_loaders(demo, feat_dim):
    """{task: SentEvalLoader} for `--senteval_tasks` (default: every task file present)."""
    from value_jax.data.loaders import SentEvalLoader
    from value_jax.data.senteval import TASKS
    vocab, lowercase = vocab_path(demo)
    if FLAGS.senteval_dir:
        root = FLAGS.senteval_dir
    else:
        say(f"no --senteval_dir: using the built-in demo data in {demo.root}")
        root = demo.senteval_dir
    tasks = FLAGS.senteval_tasks or [t for t in TASKS if os.path.isfile(os.path.join(root, f"{t}.txt"))]
    if not tasks:
        raise SystemExit(f"no SentEval task files (<task>.txt) in {root}")
    loaders = {}
    for t in tasks:
        path = os.path.join(root, f"{t}.txt")
        loaders[t] = _load(SentEvalLoader, path, t, vocab, lowercase, batch_size=FLAGS.batch_size,
                                    seed=FLAGS.seed, per_split=_max_images(), feat_dim=feat_dim,
                                    buckets=buckets())
        loaders[t].data_paths = (path,)
    return loaders


def feat_dim(model) -> int:
    c = model.config
    return c.img_dim if c.model_type == "uniter" else c.visual_feat_dim


def run(model, params, loader, probes, analysis: str, data_paths=()):
    """The runner with this run's resumable state under `<out_dir>/_state/<pass>/<model>`,
    fingerprinted by the checkpoint, `data_paths`, the flags and the loader's examples."""
    from value_jax.runner import NoBatchesError, run_probes
    state = os.path.join(FLAGS.out_dir, "_state", analysis, model_tag()) if FLAGS.resume else None
    report = getattr(loader, "report", None)
    if report is not None:
        for line in report.summary_lines():
            say(f"[{analysis}] data: {line}")
    try:
        results = run_probes(model, params, loader, probes, state_dir=state, label=analysis,
                             checkpoint_every=FLAGS.checkpoint_every,
                             collect_budget_mb=FLAGS.collect_budget_mb,
                             spill_dir=None if state else os.path.join(
                                 FLAGS.out_dir, "_spill", analysis, model_tag()),
                             fingerprint=run_fingerprint(
                                 (*data_paths, *getattr(loader, "data_paths", ()))))
    except NoBatchesError:
        lines = "\n  ".join(report.summary_lines()) if report is not None else "(no data report)"
        raise SystemExit(f"[{analysis}] no examples left after reading and filtering the data "
                         f"(--max_images={FLAGS.max_images}). Data report:\n  {lines}")
    if report is not None:
        for r in results.values():
            r.data["data_report"] = report.to_dict()
    return results
