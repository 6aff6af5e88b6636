"""An experiment's data: which files (flags or the built-in demo), and the loaders over them.

Raw Flickr30k Entities / Visual Genome / SentEval files, or datasets prepared once as TFDS
array_record (`--tfds_data_dir`, `python -m experiments.prepare`). Every function takes the run's
`RunConfig`; none reads a flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from experiments.common import say, using_demo, vocab_path
from experiments.config import RunConfig


def needs_demo(cfg: RunConfig, *data_flags: str) -> bool:
    """Whether the built-in demo stands in for something. Without --checkpoint the demo
    checkpoint and vocabulary are used (data flags given still win); with --checkpoint every
    `data_flags` (and --vocab) is required: a real model never runs on demo data silently."""
    if using_demo(cfg):
        return True
    prepared_flags = ("flickr30k_root", "flickr30k_features", "vg_root")
    missing = [
        f"--{f}"
        for f in dict.fromkeys((*data_flags, "vocab"))
        if not getattr(cfg, f) and not (cfg.tfds_data_dir and f in prepared_flags)
    ]
    if missing:
        raise SystemExit(
            f"--checkpoint={cfg.checkpoint} needs {', '.join(missing)}: the demo "
            "data only runs with the demo checkpoint (no --checkpoint)"
        )
    return False


def _max_images(cfg: RunConfig):
    return cfg.max_images or None


def buckets(cfg: RunConfig):
    from value_jax.data.collate import DEFAULT_BUCKETS

    return "fit" if cfg.buckets == "fit" else DEFAULT_BUCKETS


def _load(cfg: RunConfig, loader_class, *args, **kwargs):
    """A loader; nothing left after filtering ends the run with the data report, not a trace."""
    from value_jax.data.errors import NoExamplesError

    try:
        return loader_class(*args, **kwargs)
    except NoExamplesError as e:
        raise SystemExit(
            f"{e}\n(flags: --max_images={cfg.max_images}, --split={cfg.split})"
        ) from None


def coref_sources(cfg: RunConfig, demo) -> tuple[str, str]:
    """(Flickr30k Entities root, region features) from the flags, or the demo's."""
    gold = cfg.region_source == "gold_in_features"
    return _sources(
        cfg,
        "flickr30k_root",
        "flickr30k_features",
        demo
        and (demo.flickr_root, demo.flickr_features_gold_tsv if gold else demo.flickr_features_tsv),
    )


def relation_sources(cfg: RunConfig, demo) -> tuple[str, str]:
    """(Visual Genome root, region features) from the flags, or the demo's."""
    return _sources(cfg, "vg_root", "vg_features", demo and (demo.vg_root, demo.vg_features_tsv))


def _sources(cfg: RunConfig, root_flag: str, features_flag: str, demo_paths) -> tuple[str, str]:
    root, features = getattr(cfg, root_flag), getattr(cfg, features_flag)
    if root:
        if not features:
            raise SystemExit(f"--{root_flag} needs --{features_flag}")
        return root, features
    say(f"no --{root_flag}: using the built-in demo data in {os.path.dirname(demo_paths[0])}")
    return demo_paths


def coref_loader(cfg: RunConfig, demo):
    """Flickr30k Entities captions + regions with coreference targets (also feeds fusion and
    modality, which need no targets); from the prepared dataset with --tfds_data_dir."""
    if cfg.tfds_data_dir:
        return prepared(cfg, "coref", demo)
    from value_jax.data.loaders import CorefLoader

    vocab, lowercase = vocab_path(cfg, demo)
    root, feats = coref_sources(cfg, demo)
    loader = _load(
        cfg,
        CorefLoader,
        root,
        feats,
        vocab,
        lowercase,
        split=cfg.split,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        region_source=cfg.region_source,
        iou_threshold=cfg.iou_threshold,
        max_images=_max_images(cfg),
        buckets=buckets(cfg),
    )
    loader.data_paths = (root, feats)
    return loader


def relation_loader(cfg: RunConfig, demo, captions="region"):
    if cfg.tfds_data_dir:
        return prepared(cfg, "relation", demo, captions)
    from value_jax.data.relation_loader import RelationLoader

    vocab, lowercase = vocab_path(cfg, demo)
    root, feats = relation_sources(cfg, demo)
    loader = _load(
        cfg,
        RelationLoader,
        root,
        feats,
        vocab,
        lowercase,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        iou_threshold=cfg.iou_threshold,
        captions=captions,
        max_images=_max_images(cfg),
        buckets=buckets(cfg),
    )
    loader.data_paths = (root, feats)
    return loader


# ---- prepared datasets (TFDS, array_record) ------------------------------------------------


def tfds_builder(
    cfg: RunConfig, kind: str, demo, captions: str = "region", with_sources: bool = False
):
    """The TFDS builder of this run's settings under --tfds_data_dir. Its config name carries
    the model, a hash of every preparation setting and of the vocabulary's content, so a
    dataset prepared with other settings or another vocabulary is never read as this one."""
    import hashlib
    import json

    from value_jax.data import tfds_builders as T

    vocab, lowercase = vocab_path(cfg, demo)
    common_kw = dict(
        vocab=os.path.abspath(vocab),
        lowercase=lowercase,
        seed=cfg.seed,
        iou_threshold=cfg.iou_threshold,
        max_images=_max_images(cfg),
    )
    if kind == "coref":
        cls, paths = T.ValueCoref, coref_sources(cfg, demo) if with_sources else ("", "")
        config = T.CorefConfig(
            name="x",
            flickr_root=os.path.abspath(paths[0] or "."),
            features=os.path.abspath(paths[1] or "."),
            splits=(cfg.split,),
            region_source=cfg.region_source,
            **common_kw,
        )
    else:
        cls, paths = T.ValueRelations, relation_sources(cfg, demo) if with_sources else ("", "")
        config = T.RelationConfig(
            name="x",
            vg_root=os.path.abspath(paths[0] or "."),
            features=os.path.abspath(paths[1] or "."),
            captions=captions,
            **common_kw,
        )
    with open(vocab, "rb") as f:
        key = json.dumps(
            [T.prepared_with(config), hashlib.sha256(f.read()).hexdigest()], sort_keys=True
        )
    name = f"{cfg.model}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    config = dataclasses.replace(config, name=name, description=f"prepared for {cfg.model}: {key}")
    with quiet_tfds():
        return cls(config=config, data_dir=os.path.abspath(cfg.tfds_data_dir))


@contextlib.contextmanager
def quiet_tfds():
    """TFDS logs every builder it constructs at WARNING/INFO; the run's own lines say enough."""
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    tfds.disable_progress_bar()
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def prepared(cfg: RunConfig, kind: str, demo, captions: str = "region"):
    """A loader over the prepared records (region features read per batch from the records)."""
    from value_jax.data.tfds_builders import prepared_loader

    builder = tfds_builder(cfg, kind, demo, captions)
    if not builder.is_prepared():
        raise SystemExit(
            f"--tfds_data_dir={cfg.tfds_data_dir} holds no {kind} dataset "
            f"prepared with these settings ({builder.builder_config.name}): run "
            "`python -m experiments.prepare` with the same --model, --vocab, "
            "data and setting flags first"
        )
    split = cfg.split if kind == "coref" else builder.SPLIT
    with quiet_tfds():
        loader = prepared_loader(builder, split, cfg.batch_size, lazy=True, buckets=buckets(cfg))
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


def senteval_loaders(cfg: RunConfig, demo, feat_dim):
    """{task: SentEvalLoader} for `--senteval_tasks` (default: every task file present)."""
    from value_jax.data.loaders import SentEvalLoader
    from value_jax.data.senteval import TASKS

    vocab, lowercase = vocab_path(cfg, demo)
    if cfg.senteval_dir:
        root = cfg.senteval_dir
    else:
        say(f"no --senteval_dir: using the built-in demo data in {demo.root}")
        root = demo.senteval_dir
    tasks = cfg.senteval_tasks or [
        t for t in TASKS if os.path.isfile(os.path.join(root, f"{t}.txt"))
    ]
    if not tasks:
        raise SystemExit(f"no SentEval task files (<task>.txt) in {root}")
    loaders = {}
    for t in tasks:
        path = os.path.join(root, f"{t}.txt")
        loaders[t] = _load(
            cfg,
            SentEvalLoader,
            path,
            t,
            vocab,
            lowercase,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            per_split=_max_images(cfg),
            feat_dim=feat_dim,
            buckets=buckets(cfg),
        )
        loaders[t].data_paths = (path,)
    return loaders
