"""`python -m checkpoints_convert --src=PATH --format=FMT --out=DIR`: convert, report, write.

Prints the full report. On any problem (missing, unexpected or mismatched key, non-float or
non-finite weight, partial head, differing tied pair, config conflict) it prints the report to
stderr, writes nothing at `--out` and exits 1. A `--src` or `--out` it cannot use (unreadable,
truncated or corrupt file, a folder, an unwritable parent, an `--out` that is not a checkpoint
directory) is one line on stderr, found before any conversion work, and exit 1. SIGINT/SIGTERM
remove the temporary folder and exit 130/143.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging

from checkpoints_convert.convert import ConversionError, convert_checkpoint
from checkpoints_convert.files import prepare_out
from checkpoints_convert.tables import FORMATS

FLAGS = flags.FLAGS

flags.DEFINE_string("src", None, "PyTorch checkpoint (.pt/.pth/.bin or .safetensors).")
flags.DEFINE_enum("format", None, list(FORMATS), "Source layout.")
flags.DEFINE_string("out", None, "Output directory (written atomically).")
flags.DEFINE_integer(
    "num_heads",
    None,
    "Attention heads; the tensors cannot tell (default: model_config, else hidden_size // 64).",
)
flags.DEFINE_string(
    "model_config",
    None,
    "UNITER/HF-style config JSON (num_attention_heads, l_layers, ...), "
    "checked against the tensors.",
)
flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an existing --out checkpoint directory (never a folder holding anything else).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name in ("src", "format", "out"):
        if FLAGS[name].value is None:
            raise app.UsageError(f"--{name} is required")
    logging.set_verbosity(
        logging.WARNING
    )  # orbax logs every write step at INFO; the report says it all
    try:
        for stale in prepare_out(FLAGS.out, FLAGS.overwrite):
            print(f"removed {stale}, left by an interrupted conversion", file=sys.stderr)
        result = convert_checkpoint(
            FLAGS.src, FLAGS.format, FLAGS.out, FLAGS.num_heads, FLAGS.model_config, FLAGS.overwrite
        )
    except ConversionError as e:
        print(e.report.format(), file=sys.stderr)
        print(f"\nREFUSED: nothing written at {FLAGS.out}", file=sys.stderr)
        sys.exit(1)
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM while writing (value_jax.checkpoint)
        name = str(e) or "SIGINT"
        print(f"interrupted by {name}: nothing written at {FLAGS.out}", file=sys.stderr)
        sys.exit(128 + getattr(signal, name, signal.SIGINT))
    print(result.report.format())
    print(
        f"\nwrote {os.path.abspath(FLAGS.out)} ({result.config.model_type}, outputs: "
        f"{', '.join(result.outputs) or 'none'})"
    )
    if result.report.text_only:
        print(
            f"note: --format={FLAGS.format} converts the text path only; the region "
            "embedding is zeros, so use this model on text alone.",
            file=sys.stderr,
        )


if __name__ == "__main__":
    app.run(main)
