"""PyTorch state dict -> Flax params, accounting for every key (big_vision's `merge_params` rule).

    sd = read_state_dict("Epoch20_LXRT.pth")
    result = convert_state_dict(sd, "lxmert")   # raises ConversionError(report) on any gap
    result.config, result.params, result.outputs, result.report

Every expected Flax leaf must be filled from the source (or be a declared zero-fill), every
source key must match a rule, be a tied duplicate (checked bit-equal, then dropped) or be a known
unused key; shapes are checked after the transform. A head group is either complete or absent.
Nothing is ever randomly initialised.

The report and the conversion steps that fill it stay in one module (about 490 lines): each step
writes one section of the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from checkpoints_convert.files import prepare_out, read_state_dict, to_numpy
from checkpoints_convert.tables import CONFIG_FROM_JSON, CONFIG_FROM_SHAPES, Layout, select_layout
from value_jax.models import build_model, param_shapes
from value_jax.models.configs import CONFIGS


class ConversionError(Exception):
    """A checkpoint that does not fill the model exactly; `.report` holds the full lists."""

    def __init__(self, report: "Report"):
        self.report = report
        super().__init__(report.format())


@dataclasses.dataclass
class Report:
    """Everything the conversion did, in full. `ok` iff there is nothing to refuse."""

    fmt: str
    layout: str
    source: str | None = None
    text_only: bool = False
    config_notes: list = dataclasses.field(default_factory=list)  # "field=value (why)"
    config_conflicts: list = dataclasses.field(default_factory=list)
    matched: list = dataclasses.field(default_factory=list)  # (source key, flax path)
    renamed: list = dataclasses.field(default_factory=list)  # (source key, canonical)
    missing: list = dataclasses.field(default_factory=list)  # (flax path, torch key)
    unexpected: list = dataclasses.field(default_factory=list)  # (source key, reason)
    mismatched: list = dataclasses.field(default_factory=list)  # (key, path, want, found)
    non_float: list = dataclasses.field(default_factory=list)  # (key, dtype)
    non_finite: list = dataclasses.field(default_factory=list)  # (key, nan, inf, size)
    unused: list = dataclasses.field(default_factory=list)  # (source key, reason)
    tied: list = dataclasses.field(default_factory=list)  # (dup, kept, status, ok)
    outputs_present: list = dataclasses.field(default_factory=list)
    outputs_absent: list = dataclasses.field(default_factory=list)
    partial_outputs: list = dataclasses.field(default_factory=list)  # (head, has, lacks)
    zero_filled: list = dataclasses.field(default_factory=list)  # flax paths

    @property
    def errors(self) -> int:
        return (
            len(self.config_conflicts)
            + len(self.missing)
            + len(self.unexpected)
            + len(self.mismatched)
            + len(self.non_float)
            + len(self.non_finite)
            + len(self.partial_outputs)
            + sum(1 for *_, ok in self.tied if not ok)
        )

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def format(self) -> str:
        lines = [
            f"checkpoint conversion: format={self.fmt} layout={self.layout}"
            + (f" source={self.source}" if self.source else "")
        ]
        if self.text_only:
            lines.append(
                f"text only: {self.fmt} has no region embedding, so UNITER's "
                "img_embeddings are filled with zeros and the model reads text alone."
            )
        lines.append("config:")
        lines += [f"  {n}" for n in self.config_notes]
        lines.append(f"matched: {len(self.matched)} tensors")
        if not self.matched and self.unexpected:
            lines.append(
                f"hint: not one tensor was filled; is {self.fmt} the right format? "
                f"(first unexpected keys: {[k for k, _ in self.unexpected[:3]]})"
            )
        if self.renamed:
            lines.append(
                f"renamed: {len(self.renamed)} source keys read under their canonical "
                f"name (prefix / old LayerNorm names), e.g. {self.renamed[0][0]} -> "
                f"{self.renamed[0][1]}"
            )
        lines.append(
            f"outputs present: {', '.join(self.outputs_present) or 'none'}; "
            f"absent: {', '.join(self.outputs_absent) or 'none'}"
        )

        def section(title, rows, fmt_row):
            lines.append(f"{title} ({len(rows)}):" if rows else f"{title}: none")
            lines.extend("  " + fmt_row(r) for r in rows)

        section("tied pairs checked", self.tied, lambda r: f"{r[0]} == {r[1]}: {r[2]}")
        section("unused", self.unused, lambda r: f"{r[0]}: {r[1]}")
        if self.zero_filled:
            section("zero-filled (no source tensor)", self.zero_filled, str)
        section("CONFIG CONFLICTS", self.config_conflicts, str)
        section("MISSING", self.missing, lambda r: f"{r[0]}  <- {r[1]}")
        section("UNEXPECTED", self.unexpected, lambda r: f"{r[0]}: {r[1]}")
        section(
            "MISMATCHED",
            self.mismatched,
            lambda r: f"{r[0]} -> {r[1]}: expected {list(r[2])}, found {list(r[3])}",
        )
        section(
            "NOT FLOATING POINT",
            self.non_float,
            lambda r: f"{r[0]}: {r[1]}, where a float weight belongs",
        )
        section(
            "NOT FINITE",
            self.non_finite,
            lambda r: f"{r[0]}: {r[1] + r[2]} of {r[3]} values ({r[1]} NaN, {r[2]} Inf)",
        )
        section(
            "PARTIAL OUTPUT HEADS",
            self.partial_outputs,
            lambda r: f"{r[0]}: has {r[1]}; lacks {r[2]}",
        )
        lines.append("result: OK" if self.ok else f"result: REFUSED ({self.errors} problems)")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record for the converted checkpoint's metadata."""
        return {
            "format": self.fmt,
            "layout": self.layout,
            "source": self.source,
            "text_only": self.text_only,
            "matched": len(self.matched),
            "outputs_present": self.outputs_present,
            "outputs_absent": self.outputs_absent,
            "tied_checked": [f"{d} == {k}: {s}" for d, k, s, _ in self.tied],
            "unused": [k for k, _ in self.unused],
            "zero_filled": self.zero_filled,
            "config": self.config_notes,
        }


@dataclasses.dataclass
class ConversionResult:
    config: Any
    params: dict
    outputs: tuple
    report: Report


# ---- config ------------------------------------------------------------------------------------


def _load_model_config(model_config) -> dict:
    if model_config is None:
        return {}
    if isinstance(model_config, Mapping):
        return dict(model_config)
    with open(model_config) as f:
        return json.load(f)


def _infer(
    shapes: dict[str, tuple],
    model_type: str,
    num_heads=None,
    model_config=None,
    text_only: bool = False,
):
    """`(config, notes, conflicts)` from canonical key -> shape."""
    cls = CONFIGS[model_type]
    defaults = cls()
    values, notes, conflicts = {}, [], []
    for field, (key, axis) in CONFIG_FROM_SHAPES[model_type].items():
        if axis is None:
            pattern = re.escape(key).replace(r"\{i\}", r"(\d+)") + r"\."
            idx = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
            if idx:
                values[field] = max(idx) + 1
                notes.append(f"{field}={values[field]} (highest {{i}} in {key}.*, plus one)")
                continue
        elif key in shapes and len(shapes[key]) > axis:
            values[field] = int(shapes[key][axis])
            notes.append(f"{field}={values[field]} (from {key} {list(shapes[key])})")
            continue
        values[field] = getattr(defaults, field)
        no_regions = text_only and field in ("img_dim", "pos_dim")
        why = "the source has no region embedding" if no_regions else f"{key} absent"
        notes.append(f"{field}={values[field]} (default: {why})")

    mc = _load_model_config(model_config)
    for json_key, field in CONFIG_FROM_JSON[model_type].items():
        if json_key in mc and mc[json_key] != values[field]:
            conflicts.append(
                f"model_config {json_key}={mc[json_key]} but the checkpoint gives "
                f"{field}={values[field]}"
            )
    if mc.get("hidden_act", "gelu") != "gelu":
        conflicts.append(f"model_config hidden_act={mc['hidden_act']!r}: these models use erf GELU")
    eps = mc.get("layer_norm_eps", 1e-12)
    if abs(float(eps) - 1e-12) > 1e-15:
        conflicts.append(f"model_config layer_norm_eps={eps}: these models use 1e-12")

    json_heads = mc.get("num_attention_heads")
    if json_heads is not None and not isinstance(json_heads, int):
        conflicts.append(f"model_config num_attention_heads={json_heads!r} is not an integer")
        json_heads = None
    if num_heads is not None and json_heads is not None and int(json_heads) != int(num_heads):
        conflicts.append(
            f"--num_heads={num_heads} but model_config num_attention_heads={json_heads}"
        )
    if num_heads is not None:
        values["num_heads"] = int(num_heads)
        notes.append(f"num_heads={num_heads} (given)")
    elif json_heads is not None:
        values["num_heads"] = int(json_heads)
        notes.append(f"num_heads={json_heads} (model_config num_attention_heads)")
    else:
        values["num_heads"] = max(1, values["hidden_size"] // 64)
        notes.append(
            f"num_heads={values['num_heads']} (GUESSED as hidden_size // 64; the "
            "checkpoint cannot tell: pass --num_heads or --model_config to be sure)"
        )
    if values["hidden_size"] % values["num_heads"]:
        conflicts.append(
            f"hidden_size={values['hidden_size']} is not divisible by "
            f"num_heads={values['num_heads']}"
        )
    return cls(**values), notes, conflicts


def infer_config(state_dict, fmt: str, num_heads=None, model_config=None):
    """The model config a `fmt` state dict implies: sizes from tensor shapes; `num_heads` from
    the argument, else `model_config` (a JSON path or dict) `num_attention_heads`, else
    hidden_size // 64. Raises ValueError when `model_config` contradicts the tensors."""
    layout = select_layout(fmt, state_dict)
    shapes = {}
    for k, v in state_dict.items():
        c = layout.canonical(k)
        if c is not None:
            shapes[c] = tuple(v.shape)
    config, _, conflicts = _infer(
        shapes, layout.model_type, num_heads, model_config, layout.text_only
    )
    if conflicts:
        raise ValueError("; ".join(conflicts))
    return config


# ---- conversion --------------------------------------------------------------------------------


def _canonicalise(state_dict, layout: Layout, report: Report) -> dict[str, tuple[str, Any]]:
    """canonical key -> (source key, value); keys without a required prefix are unexpected."""
    canon = {}
    for key, value in state_dict.items():
        c = layout.canonical(key)
        if c is None:
            prefixes = [p for p, _ in layout.prefixes]
            report.unexpected.append((key, f"{layout.name} keys start with one of {prefixes}"))
            continue
        if c in canon:
            report.unexpected.append((key, f"duplicate of {canon[c][0]} (both are {c})"))
            continue
        if c != key:
            report.renamed.append((key, c))
        canon[c] = (key, value)
    return canon


def _classify(canon, layout: Layout, report: Report) -> list:
    """`(canonical, rule, flax path)` per key a rule maps; tied duplicates are left for
    `_check_tied`; the rest is unused (known) or unexpected."""
    tied = {t.duplicate for t in layout.tied}
    candidates = []
    for c, (key, _) in canon.items():
        rule, path = layout.rule_for(c)
        if rule is not None:
            candidates.append((c, rule, path))
        elif c in tied:
            continue
        elif (reason := layout.unused_reason(c)) is not None:
            report.unused.append((key, reason))
        else:
            report.unexpected.append((key, "no rule matches it"))
    return candidates


def _outputs_present(candidates, canon, layout: Layout, report: Report):
    """An output head is present iff a key only it needs is there; shared keys follow their
    output heads."""
    all_outputs = CONFIGS[layout.model_type].outputs
    has = {h: [] for h in all_outputs}
    for c, rule, _ in candidates:
        if len(rule.outputs) == 1 and rule.outputs[0] in has:
            has[rule.outputs[0]].append(canon[c][0])
    for t in layout.tied:
        if t.duplicate in canon and len(t.outputs) == 1:
            has[t.outputs[0]].append(canon[t.duplicate][0])
    outputs = tuple(h for h in all_outputs if has[h])
    report.outputs_present = list(outputs)
    report.outputs_absent = [h for h in all_outputs if not has[h]]
    return outputs, has


def _fill(candidates, canon, expected, layout: Layout, config, outputs, has, report: Report):
    """Flax path -> float32 array; records matched, mismatched, non-float, non-finite,
    missing, partial outputs."""
    filled: dict[str, np.ndarray] = {}
    refused: set[str] = set()  # present but unusable paths: reported, not also missing
    orphans: dict[tuple, list] = {}  # keys shared by output heads that are all absent
    for c, rule, path in candidates:
        key, value = canon[c]
        if path not in expected:
            if rule.required:
                report.unexpected.append(
                    (
                        key,
                        f"-> {path}, which the {config.model_type} "
                        "config has no place for (layer beyond the config?)",
                    )
                )
            else:
                orphans.setdefault(rule.outputs, []).append(key)
            continue
        arr = rule.transform.apply(to_numpy(value, key))
        usable = arr.shape == tuple(expected[path])
        if not usable:
            report.mismatched.append(
                (key, path, rule.transform.source_shape(expected[path]), tuple(value.shape))
            )
        if not np.issubdtype(arr.dtype, np.floating):  # never cast an int8/bool weight silently
            report.non_float.append((key, str(arr.dtype)))
            usable = False
        elif not (finite := np.isfinite(arr)).all():
            nan = int(np.isnan(arr).sum())
            report.non_finite.append((key, nan, int(arr.size - finite.sum()) - nan, arr.size))
            usable = False
        if not usable:
            refused.add(path)
            continue
        filled[path] = np.ascontiguousarray(arr, dtype=np.float32)
        report.matched.append((key, path))

    lacks = {h: [] for h in outputs}
    for path, shape in expected.items():
        if path in filled or path in refused:
            continue
        if any(path.startswith(p) for p in layout.zero_fill):
            filled[path] = np.zeros(shape, np.float32)
            report.zero_filled.append(path)
            continue
        rule = next((r for r in layout.rules if r.match_flax(path) is not None), None)
        torch_key = layout.source_spelling(rule.match_flax(path)) if rule else "(no rule fills it)"
        report.missing.append((path, torch_key))
        # Every expected leaf belongs to the encoder or to a head found present.
        for h in rule.outputs if rule else ():
            if h in lacks:
                lacks[h].append(torch_key)
    report.partial_outputs = [(h, has[h], miss) for h, miss in lacks.items() if miss]
    for group, keys in orphans.items():
        report.partial_outputs.append(
            ("/".join(group), keys, [f"the decoder of one of {list(group)}"])
        )
    return filled


def _check_tied(canon, layout: Layout, outputs, report: Report) -> None:
    """Each tied duplicate must equal its kept tensor bit for bit; it is then dropped."""
    for t in layout.tied:
        if t.duplicate not in canon:
            if any(h in outputs for h in t.outputs):
                report.tied.append((t.duplicate, t.kept, "duplicate absent (shared storage)", True))
            continue
        dup_key, dup = canon[t.duplicate]
        if t.kept not in canon:
            report.tied.append((dup_key, t.kept, "the kept tensor is absent", False))
            continue
        kept_key, kept = canon[t.kept]
        a, b = to_numpy(dup, dup_key), to_numpy(kept, kept_key)
        if a.shape != b.shape:
            status, ok = f"DIFFER: shapes {list(a.shape)} vs {list(b.shape)}", False
        elif not np.array_equal(a, b, equal_nan=True):  # a NaN is reported once, as NOT FINITE
            status, ok = f"DIFFER: max |diff| {float(np.max(np.abs(a - b))):.3g}", False
        else:
            status, ok = "equal, dropped", True
        report.tied.append((dup_key, kept_key, status, ok))


def convert_state_dict(
    state_dict, fmt: str, config=None, num_heads=None, model_config=None, source: str | None = None
) -> ConversionResult:
    """Maps a `fmt` state dict (torch tensors or numpy arrays) onto the Flax params tree.

    Raises `ConversionError` (message = the full report) on any missing encoder leaf, unexpected
    key, shape mismatch, non-floating-point or non-finite weight, partially present head,
    differing tied pair or config conflict.
    """
    layout = select_layout(fmt, state_dict)
    report = Report(fmt, layout.name, source, layout.text_only)
    canon = _canonicalise(state_dict, layout, report)
    shapes = {c: tuple(v.shape) for c, (_, v) in canon.items()}
    if config is None:
        config, report.config_notes, report.config_conflicts = _infer(
            shapes, layout.model_type, num_heads, model_config, layout.text_only
        )
    else:
        if config.model_type != layout.model_type:
            raise ValueError(
                f"format {fmt} converts to {layout.model_type}, got a {config.model_type} config"
            )
        if num_heads is not None:
            config = dataclasses.replace(config, num_heads=int(num_heads))
        report.config_notes = [f"{k}={v} (given)" for k, v in dataclasses.asdict(config).items()]
    if report.config_conflicts:
        raise ConversionError(report)

    candidates = _classify(canon, layout, report)
    outputs, has = _outputs_present(candidates, canon, layout, report)
    expected = {
        "/".join(k): v.shape
        for k, v in flatten_dict(param_shapes(build_model(config, outputs))).items()
    }
    filled = _fill(candidates, canon, expected, layout, config, outputs, has, report)
    _check_tied(canon, layout, outputs, report)

    order = {k: i for i, k in enumerate(state_dict)}
    report.unexpected.sort(key=lambda r: order.get(r[0], -1))
    if not report.ok:
        raise ConversionError(report)
    params = unflatten_dict({tuple(p.split("/")): v for p, v in filled.items()})
    return ConversionResult(config, params, outputs, report)


def convert_file(src: str, fmt: str, num_heads=None, model_config=None) -> ConversionResult:
    """`convert_state_dict(read_state_dict(src), fmt, ...)` with the source named in the report."""
    return convert_state_dict(
        read_state_dict(src),
        fmt,
        num_heads=num_heads,
        model_config=model_config,
        source=os.path.abspath(src),
    )


def convert_checkpoint(
    src: str, fmt: str, out: str, num_heads=None, model_config=None, overwrite: bool = False
) -> ConversionResult:
    """Converts `src` and writes `out` (config.json + orbax params) atomically.

    Before reading `src`: `FileExistsError` when `out` exists and `overwrite` is False, or when
    `out` is not a checkpoint directory; `CheckpointFileError` when `out` cannot be written or
    `src` is not a readable, intact checkpoint file. Then `ConversionError`, with nothing written,
    when the checkpoint does not fill the model. A text-only result (format `bert`) is marked
    `text_only: true` in the directory's conversion metadata.
    """
    from value_jax.checkpoint import save  # orbax is only needed when writing

    prepare_out(out, overwrite)
    result = convert_file(src, fmt, num_heads=num_heads, model_config=model_config)
    extra = {
        "source": os.path.abspath(src),
        "format": fmt,
        "text_only": result.report.text_only,
        "report": result.report.summary(),
    }
    save(out, result.config, result.params, result.outputs, extra=extra, overwrite=overwrite)
    return result
