"""What every experiment shares: the model (a converted checkpoint or the built-in demo), the demo
data, several processes, the runner with resumable state, and writing results next to the flags
that made them. Every function takes the run's `RunConfig` (`experiments.config`); the data
sources and loaders are in `experiments.inputs`.

With no `--checkpoint` an experiment builds the demo checkpoint: a small deterministic model in
the ORIGINAL PyTorch layout (`checkpoints_convert.fake`), converted with the real converter —
so the demo exercises the same path a user's `Epoch20_LXRT.pth` or `uniter-base.pt` takes.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from experiments.config import RunConfig

DEMO_FEAT_DIM = 32
# Flags that never change a number: left out of the resume fingerprint.
NOT_IN_FINGERPRINT = (
    "out_dir",
    "resume",
    "checkpoint_every",
    "coordinator_address",
    "process_id",
    "collect_budget_mb",
)


def using_demo(cfg: RunConfig) -> bool:
    return not cfg.checkpoint


def model_tag(cfg: RunConfig) -> str:
    return cfg.model


def result_dir(cfg: RunConfig, analysis: str) -> str:
    return os.path.join(cfg.out_dir, analysis, model_tag(cfg))


def demo_config(model_type: str, vocab_size: int):
    from value_jax.models import LxmertConfig, UniterConfig

    if model_type == "uniter":
        return UniterConfig.tiny(
            vocab_size=vocab_size,
            img_dim=DEMO_FEAT_DIM,
            hidden_size=48,
            num_heads=4,
            num_layers=4,
            intermediate_size=96,
            num_region_labels=1601,
        )
    # The detector's real class counts, so the demo uses the real class-index convention.
    return LxmertConfig.tiny(
        vocab_size=vocab_size,
        visual_feat_dim=DEMO_FEAT_DIM,
        hidden_size=48,
        num_heads=4,
        intermediate_size=96,
        l_layers=3,
        r_layers=2,
        x_layers=2,
        num_object_labels=1600,
        num_attr_labels=400,
    )


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
    fmt, name = {
        "uniter": ("uniter", "uniter-demo.pt"),
        "lxmert": ("lxmert", "Epoch20_LXRT-demo.pth"),
    }[model_type]
    # Query/key weights scaled so attention logits have std ~1.5: a BERT-style init gives
    # near-uniform maps, which make a dull demo.
    src = write_fake_checkpoint(
        os.path.join(root, "pytorch", name),
        fmt,
        demo_config(model_type, vocab_size),
        seed=seed,
        attention_score_std=1.5,
    )
    num_heads = demo_config(model_type, vocab_size).num_heads
    convert_checkpoint(src, fmt, out, num_heads=num_heads, overwrite=True)
    return out


def vocab_path(cfg: RunConfig, demo) -> tuple[str, bool]:
    """(vocab file, lowercase). The demo: the vocab of the model's released casing
    (`config.lowercase`: UNITER cased, LXMERT uncased). A user's `--vocab`: casing from
    `--lowercase`, by default from the vocabulary itself, so that an uncased BERT baseline loaded
    as `--model=uniter` is lowercased as it was trained."""
    from value_jax.models.configs import CONFIGS

    if cfg.vocab:
        path = cfg.vocab
    elif demo is not None:
        path = demo.vocab_uncased if CONFIGS[cfg.model].lowercase else demo.vocab_cased
    else:
        raise SystemExit(
            "--checkpoint needs --vocab: the WordPiece vocab.txt the checkpoint was "
            "trained with (bert-base-cased for UNITER, bert-base-uncased for LXMERT)"
        )
    if cfg.lowercase != "auto":
        return path, cfg.lowercase == "true"
    return path, not vocab_is_cased(path)


def vocab_is_cased(path: str) -> bool:
    """True when the vocabulary holds cased word pieces (bert-base-cased has ~5,000 entries with
    capitals; bert-base-uncased none outside its [SPECIAL] tokens)."""
    from value_jax.data.tokenization import read_vocab

    pieces = [t for t in read_vocab(path) if not (t.startswith("[") and t.endswith("]"))]
    return any(any(c.isupper() for c in t) for t in pieces)


def load_model(cfg: RunConfig, demo=None):
    """`(model, params)` from `--checkpoint`, or the demo checkpoint; `--dtype` applied."""
    import value_jax
    from value_jax.data.tokenization import read_vocab

    init_distributed(cfg)
    path = cfg.checkpoint
    if not path:
        vocab, _ = vocab_path(cfg, demo)
        path = lead_first(
            lambda: build_demo_checkpoint(
                os.path.join(cfg.out_dir, "demo"), cfg.model, len(read_vocab(vocab))
            )
        )
        say(
            f"no --checkpoint given: using the built-in demo checkpoint {path} "
            "(random weights in the original PyTorch layout, converted)"
        )
    model, params = value_jax.load(path)
    if model.config.model_type != cfg.model:
        raise SystemExit(
            f"--checkpoint {path} holds a {model.config.model_type} model but --model={cfg.model}"
        )
    vocab, _ = vocab_path(cfg, demo)
    size = len(read_vocab(vocab))
    if size > model.config.vocab_size:
        raise SystemExit(
            f"--vocab {vocab} has {size} entries but the checkpoint {path} embeds "
            f"only {model.config.vocab_size} token ids: the vocabulary does not "
            "belong to this checkpoint"
        )
    _inputs["checkpoint"] = {
        "path": os.path.abspath(path),
        "id": value_jax.checkpoint.checkpoint_id(path),
    }
    _inputs["vocab"] = file_identity(vocab)
    if cfg.dtype != model.config.dtype:
        model = model.clone(config=dataclasses.replace(model.config, dtype=cfg.dtype))
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
                continue  # our own offset index / lmdb's lock file
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
    return {"path": path, "files": n, "listing_sha256": h.hexdigest()}


def run_fingerprint(cfg: RunConfig, data_paths=()) -> dict:
    """The caller's part of a runner state fingerprint: checkpoint, vocab, data files, flags."""
    flags_now = {k: v for k, v in cfg.flag_values().items() if k not in NOT_IN_FINGERPRINT}
    return {
        "flags": flags_now,
        **_inputs,
        "data_files": {p: file_identity(p) for p in sorted(set(filter(None, data_paths)))},
    }


def write(cfg: RunConfig, result, analysis: str | None = None) -> str:
    """Writes the result's files (process 0 only) and prints its tables."""
    from value_jax.probes.results import write_result

    out = result_dir(cfg, analysis or result.name)
    if not is_lead():
        return out
    files = write_result(result, out, cfg.flag_values())
    say(f"wrote {', '.join(os.path.basename(f) for f in files)} to {out}")
    print(result.to_markdown())
    return out


def say(msg: str) -> None:
    if _distributed["done"] and not is_lead():
        return
    print(msg, file=sys.stderr, flush=True)


# ---- data ---------------------------------------------------------------------------------

DEMO_IMAGES = 30  # Flickr30k demo images (a third land in val)


def demo_data(cfg: RunConfig):
    from value_jax.data.demo import make_demo_data

    init_distributed(cfg)
    return lead_first(
        lambda: make_demo_data(
            os.path.join(cfg.out_dir, "demo", "data"),
            seed=0,
            n_images=DEMO_IMAGES,
            feat_dim=DEMO_FEAT_DIM,
        )
    )


_distributed = {"done": False}


def init_distributed(cfg: RunConfig) -> None:
    """Joins the other processes (`--coordinator_address`, `--num_processes`, `--process_id`;
    on a multi-host TPU slice without them, JAX's own detection). Called once, before anything
    touches a JAX device; a no-op for a one-process run."""
    if _distributed["done"]:
        return
    _distributed["done"] = True
    import jax

    if cfg.coordinator_address or cfg.num_processes > 1:
        if not cfg.coordinator_address:
            raise SystemExit("--num_processes > 1 needs --coordinator_address=host:port")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise SystemExit(f"--process_id={cfg.process_id} is not in [0, {cfg.num_processes})")
        if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu").split(","):
            # CPU devices of several processes reduce through gloo (TPU/GPU have their own).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
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


def run(cfg: RunConfig, model, params, loader, probes, analysis: str, data_paths=()):
    """The runner with this run's resumable state under `<out_dir>/_state/<pass>/<model>`,
    fingerprinted by the checkpoint, `data_paths`, the flags and the loader's examples."""
    from value_jax.runner import NoBatchesError, run_probes

    state = os.path.join(cfg.out_dir, "_state", analysis, model_tag(cfg)) if cfg.resume else None
    report = getattr(loader, "report", None)
    if report is not None:
        for line in report.summary_lines():
            say(f"[{analysis}] data: {line}")
    try:
        results = run_probes(
            model,
            params,
            loader,
            probes,
            state_dir=state,
            label=analysis,
            checkpoint_every=cfg.checkpoint_every,
            collect_budget_mb=cfg.collect_budget_mb,
            spill_dir=None
            if state
            else os.path.join(cfg.out_dir, "_spill", analysis, model_tag(cfg)),
            fingerprint=run_fingerprint(cfg, (*data_paths, *getattr(loader, "data_paths", ()))),
        )
    except NoBatchesError:
        lines = "\n  ".join(report.summary_lines()) if report is not None else "(no data report)"
        raise SystemExit(
            f"[{analysis}] no examples left after reading and filtering the data "
            f"(--max_images={cfg.max_images}). Data report:\n  {lines}"
        ) from None
    if report is not None:
        for r in results.values():
            r.data["data_report"] = report.to_dict()
    return results
