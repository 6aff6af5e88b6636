"""The run config: every flag an experiment takes, read once and passed down as one frozen value.

    def main(argv):
        cfg = RunConfig.from_flags()          # the only place a flag is read
        suite.run_flickr(cfg, model, params, demo, ...)

Every helper in `experiments` takes `cfg` (a `RunConfig`) and never reads `absl.flags`; tests
build a `RunConfig(...)` directly and call the same functions in-process. The flags shared by
every experiment are defined here, next to the dataclass whose defaults they are. A script's own
flags (`--mismatched`, the ablation's, the explorer's, ...) land in `cfg.script`, read-only.

One flag style throughout the project: `flags.DEFINE_*` at module level, values read through
`FLAGS` only in `main` (here: `RunConfig.from_flags`).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any, Mapping

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_enum("model", "uniter", ["uniter", "lxmert"], "Which model to probe.")
flags.DEFINE_string(
    "checkpoint",
    "",
    "A converted checkpoint directory (python -m "
    "checkpoints_convert). Empty: the built-in demo checkpoint.",
)
flags.DEFINE_string("out_dir", "out", "Results go to <out_dir>/<analysis>/<model>/.")
flags.DEFINE_integer(
    "batch_size",
    8,
    "Examples per forward pass (a multiple of the device count to shard the batch).",
)
flags.DEFINE_integer("seed", 0, "Seed of every random choice (negatives, baselines, probers).")
flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Forward dtype; reductions stay "
    "float32. bfloat16 is for TPUs/GPUs (it is slower on CPUs without bf16).",
)
flags.DEFINE_integer("max_images", 0, "Use at most this many images / sentences (0 = all).")
flags.DEFINE_boolean(
    "resume",
    True,
    "Resume an interrupted run from its saved accumulators "
    "(only when every input that changes a number is unchanged).",
)
flags.DEFINE_integer("checkpoint_every", 20, "Save the accumulators every this many batches.")
flags.DEFINE_enum(
    "buckets",
    "fit",
    ["fit", "fixed"],
    "Static batch shapes: fitted to the "
    "data (the least padding for at most 4 text x 7 region sizes) or the fixed "
    "grid of value_jax.data.collate.DEFAULT_BUCKETS.",
)
flags.DEFINE_float(
    "collect_budget_mb",
    4096,
    "Host memory for the per-item features collected "
    "for the probers; beyond it they are appended to files under <out_dir>/_state "
    "(or _spill) and streamed from disk.",
)
flags.DEFINE_string(
    "coordinator_address",
    "",
    "Several processes (hosts): host:port of process "
    "0, passed to jax.distributed.initialize. Empty: one process, except on a "
    "TPU pod slice, where initialize() finds its peers itself.",
)
flags.DEFINE_integer("num_processes", 1, "Several processes: how many take part.")
flags.DEFINE_integer("process_id", 0, "Several processes: this one's index (0 writes results).")
flags.DEFINE_string(
    "vocab",
    "",
    "WordPiece vocab.txt (bert-base-cased for UNITER, "
    "bert-base-uncased for LXMERT). Required with --checkpoint; empty with the "
    "demo.",
)
flags.DEFINE_enum(
    "lowercase",
    "auto",
    ["auto", "true", "false"],
    "Lowercase text before "
    "WordPiece. auto: from the vocabulary (a vocab with cased entries, like "
    "bert-base-cased, is used cased; an uncased one lowercased).",
)
flags.DEFINE_string(
    "flickr30k_root",
    "",
    "Flickr30k Entities root (Sentences/, Annotations/, val.txt). Empty: the demo data.",
)
flags.DEFINE_string(
    "flickr30k_features",
    "",
    "Region features of the Flickr30k images (LXMERT TSV, UNITER npz dir or LMDB, VOLTA LMDB).",
)
flags.DEFINE_string("split", "val", "Flickr30k Entities split.")
flags.DEFINE_enum(
    "region_source",
    "iou",
    ["iou", "gold_in_features"],
    "How gold boxes become "
    "regions: IoU alignment to detected boxes, or gold boxes present in the features.",
)
flags.DEFINE_float("iou_threshold", 0.5, "IoU needed to link a gold box to a detected region.")
flags.DEFINE_string("vg_root", "", "Visual Genome root (relationships.json, ...). Empty: demo.")
flags.DEFINE_string("vg_features", "", "Region features of the Visual Genome images.")
flags.DEFINE_string(
    "tfds_data_dir",
    "",
    "Read the Flickr30k Entities and Visual Genome "
    "examples from datasets prepared once by `python -m experiments.prepare` "
    "(TFDS, array_record) under this folder instead of the raw files.",
)
flags.DEFINE_string("senteval_dir", "", "Directory of SentEval probing files. Empty: demo.")
flags.DEFINE_list("senteval_tasks", [], "SentEval tasks to probe (default: every file present).")
flags.DEFINE_boolean(
    "fusion_include_special",
    False,
    "Fusion NMI: also cluster [CLS] and [SEP] "
    "(VALUE does not say; default: words and regions only).",
)
flags.DEFINE_enum(
    "sentence_pooling",
    "mean",
    ["mean", "cls"],
    "SentEval sentence embedding: mean of the word tokens or the [CLS] state.",
)

flags.DEFINE_integer(
    "bilinear_rank",
    0,
    "Rank of the Eq. 4 embedding prober's W_w, W_μ "
    "(0 = full rank, hidden x hidden, as VALUE; a smaller rank trains faster). "
    "Recorded in the results.",
    lower_bound=0,
)

flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be at least 1")
flags.register_validator(
    "checkpoint_every", lambda v: v >= 1, "--checkpoint_every must be at least 1"
)
flags.register_validator(
    "max_images", lambda v: v >= 0, "--max_images must be 0 (all) or a positive count"
)


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def _default(name: str):
    return _frozen(FLAGS[name].default)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of one run; the defaults are the flags' defaults."""

    # the model
    model: str = _default("model")
    checkpoint: str = _default("checkpoint")
    dtype: str = _default("dtype")
    vocab: str = _default("vocab")
    lowercase: str = _default("lowercase")
    # the run
    out_dir: str = _default("out_dir")
    batch_size: int = _default("batch_size")
    seed: int = _default("seed")
    max_images: int = _default("max_images")
    buckets: str = _default("buckets")
    resume: bool = _default("resume")
    checkpoint_every: int = _default("checkpoint_every")
    collect_budget_mb: float = _default("collect_budget_mb")
    # several processes
    coordinator_address: str = _default("coordinator_address")
    num_processes: int = _default("num_processes")
    process_id: int = _default("process_id")
    # data
    flickr30k_root: str = _default("flickr30k_root")
    flickr30k_features: str = _default("flickr30k_features")
    split: str = _default("split")
    region_source: str = _default("region_source")
    iou_threshold: float = _default("iou_threshold")
    vg_root: str = _default("vg_root")
    vg_features: str = _default("vg_features")
    tfds_data_dir: str = _default("tfds_data_dir")
    senteval_dir: str = _default("senteval_dir")
    senteval_tasks: tuple = _default("senteval_tasks")
    # analyses
    fusion_include_special: bool = _default("fusion_include_special")
    sentence_pooling: str = _default("sentence_pooling")
    bilinear_rank: int = _default("bilinear_rank")
    # the running script's own flags, by name
    script: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )

    @classmethod
    def from_flags(cls) -> "RunConfig":
        """The config of this process's parsed flags (call it in `main`, once)."""
        shared = {f.name for f in dataclasses.fields(cls)} - {"script"}
        values = {n: _frozen(FLAGS[n].value) for n in shared}
        script = {n: _frozen(FLAGS[n].value) for n in _script_flags() if n not in shared}
        return cls(**values, script=types.MappingProxyType(script))

    def flag_values(self) -> dict[str, Any]:
        """Every setting by flag name (written as flags.json next to the results)."""
        values = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "script"
        }
        values.update(self.script)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(values.items())}


def script_options(options_class, cfg: RunConfig):
    """A script's options dataclass (its own flags) from `cfg.script`; what is not there (the
    script's flags are not defined in this process, e.g. a test) keeps the dataclass default."""
    names = {f.name for f in dataclasses.fields(options_class)}
    return options_class(**{k: v for k, v in cfg.script.items() if k in names})


def _script_flags() -> list[str]:
    """Flags defined by the script run or by a module of `experiments`."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return sorted(
        {
            f.name
            for module, defined in FLAGS.flags_by_module_dict().items()
            if module in ("__main__", main_file) or module.split(".")[0] == "experiments"
            for f in defined
        }
    )
