"""Batch planning: every example into the smallest bucket that fits it, batches of one shape.

`plan_batches` is what `value_jax.data.collate` describes (buckets, overflow, split examples);
`collate.collate` then pads each planned batch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from value_jax.data.collate import (
    DEFAULT_BUCKETS,
    OVERFLOW_POLICIES,
    REGION_INDEX_TARGETS,
    TARGETS,
    TOKEN_TARGETS,
    BatchShape,
    Buckets,
    Example,
)
from value_jax.data.errors import DataReport, report_or_new


def _keep_items(ex: Example, keep: np.ndarray) -> Example:
    return ex.with_targets({k: (v[keep] if TARGETS[k].axes else v) for k, v in ex.targets.items()})


def _items_within(ex: Example, text_len: int, num_regions: int) -> np.ndarray:
    """`[P]` bool: items whose every region index and masked token position fits."""
    p = ex.num_items
    ok = np.ones(p, bool)
    for name in REGION_INDEX_TARGETS:
        if name in ex.targets:
            ok &= ex.targets[name] < num_regions
    for name, mask_name in TOKEN_TARGETS.items():
        if name in ex.targets:
            bad = ex.targets[mask_name] & (ex.targets[name] >= text_len)
            ok &= ~bad.any(axis=1)
    return ok


def _truncate(ex: Example, buckets: Buckets, report: DataReport) -> Optional[Example]:
    """Cuts text to the largest text bucket (keeping [SEP]) and regions to the largest region
    bucket; drops the items that pointed past either cut. None when no item is left."""
    t_max, r_max = buckets.text[-1], buckets.regions[-1]
    need = ex.needed()
    new = ex
    if need.text > t_max:
        ids = np.concatenate([ex.input_ids[: t_max - 1], ex.input_ids[-1:]])
        report.count("examples_truncated_text", example=f"{ex.id}: {need.text} > {t_max} ids")
        new = dataclasses.replace(new, input_ids=ids)
    if need.regions > r_max:
        report.count(
            "examples_truncated_regions", example=f"{ex.id}: {need.regions} > {r_max} regions"
        )
        new = dataclasses.replace(new, num_regions=r_max)
        if new.region_feats is not None:
            new = dataclasses.replace(
                new, region_feats=new.region_feats[:r_max], region_boxes=new.region_boxes[:r_max]
            )
    m_max = buckets.tokens[-1]
    if need.tokens > m_max:
        report.count(
            "examples_truncated_token_sets", example=f"{ex.id}: {need.tokens} > {m_max} slots"
        )
    if new.num_items:
        keep = _items_within(new, len(new.input_ids) - 1, new.num_regions)
        for name, mask_name in TOKEN_TARGETS.items():
            if name in new.targets:
                keep &= ~new.targets[mask_name][:, m_max:].any(axis=1)
        if not keep.all():
            report.count("items_dropped_by_truncation", int((~keep).sum()), example=ex.id)
            if not keep.any():
                report.count("examples_dropped_by_truncation", example=ex.id)
                return None
            new = _keep_items(new, keep)
        if need.tokens > m_max:
            new = new.with_targets(
                {
                    k: (v[:, :m_max] if TARGETS[k].axes == "PM" else v)
                    for k, v in new.targets.items()
                }
            )
    return new


def bucket_of(ex: Example, buckets: Buckets) -> Optional[BatchShape]:
    """The smallest bucket holding the example, or None if some size exceeds every bucket."""
    need = ex.needed()
    text = Buckets.smallest(buckets.text, need.text)
    regions = 1 if ex.num_regions == 0 else Buckets.smallest(buckets.regions, need.regions)
    items = 0 if need.items == 0 else Buckets.smallest(buckets.items, need.items)
    tokens = 0 if need.tokens == 0 else Buckets.smallest(buckets.tokens, need.tokens)
    if None in (text, regions, items, tokens):
        return None
    return BatchShape(text, regions, items, tokens)


def _too_large(ex: Example, buckets: Buckets) -> str:
    need = ex.needed()
    parts = []
    for name, n, sizes in (
        ("text ids", need.text, buckets.text),
        ("regions", need.regions, buckets.regions),
        ("tokens per item", need.tokens, buckets.tokens),
    ):
        if n > sizes[-1]:
            parts.append(f"{n} {name} > {sizes[-1]}")
    return (
        f"example {ex.id!r} does not fit the largest bucket ({'; '.join(parts)}); raise the "
        "limit (max_text_len, Buckets) or pass overflow='truncate' to cut it, counted"
    )


@dataclasses.dataclass
class BatchPlan:
    """One batch to collate: its static shape and its examples with their source positions."""

    shape: BatchShape
    examples: list[Example]
    indices: list[int]


def plan_batches(
    examples: Sequence[Example],
    batch_size: int,
    buckets: Buckets = DEFAULT_BUCKETS,
    overflow: str = "error",
    report: Optional[DataReport] = None,
) -> list[BatchPlan]:
    """Assigns each example its smallest text, region and item bucket and cuts each bucket's
    examples, in input order, into batches of at most `batch_size` (padded to exactly that by
    `collate`); the token width M is one for the whole plan, the smallest token bucket that fits
    every example. Buckets come in ascending order of shape.

    Counts `examples_split_over_items` (rows added by splitting, no item lost) and, with
    overflow="truncate", `examples_truncated_text`, `examples_truncated_regions`,
    `examples_truncated_token_sets`, `items_dropped_by_truncation`, `examples_dropped_by_truncation`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    report = report_or_new(report)
    p_max = buckets.items[-1]
    placed: list[tuple[BatchShape, Example, int]] = []
    for index, ex in enumerate(examples):
        parts = [ex]
        if ex.num_items > p_max:
            n_parts = -(-ex.num_items // p_max)
            report.count(
                "examples_split_over_items",
                n_parts - 1,
                example=f"{ex.id}: {ex.num_items} items > {p_max}",
            )
            parts = []
            for k in range(n_parts):
                part = _keep_items(ex, np.arange(k * p_max, min((k + 1) * p_max, ex.num_items)))
                parts.append(dataclasses.replace(part, id=f"{ex.id}#{k}", item_offset=k * p_max))
        for part in parts:
            shape = bucket_of(part, buckets)
            if shape is None:
                if overflow == "error":
                    raise ValueError(_too_large(part, buckets))
                part = _truncate(part, buckets, report)
                if part is None:
                    continue
                shape = bucket_of(part, buckets)
            placed.append((shape, part, index))
    # One token width for the whole plan: it costs nothing in the forward pass, and a width per
    # batch would multiply the compiled shapes.
    width = max((shape.tokens for shape, _, _ in placed), default=0)
    groups: dict[BatchShape, tuple[list[Example], list[int]]] = {}
    for shape, part, index in placed:
        exs, idx = groups.setdefault(shape._replace(tokens=width), ([], []))
        exs.append(part)
        idx.append(index)
    plans = []
    for shape in sorted(groups):
        exs, idx = groups[shape]
        for start in range(0, len(exs), batch_size):
            plans.append(
                BatchPlan(shape, exs[start : start + batch_size], idx[start : start + batch_size])
            )
    return plans
