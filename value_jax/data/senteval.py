"""SentEval probing tasks (Conneau et al. 2018): `<split>\\t<label>\\t<sentence>` files.

Sentences are already Moses-tokenised; tokens are the space-separated fields. The real files are
NOT shuffled within a partition (sentence_length.txt starts with hundreds of consecutive label-0
sentences of one novel), so a subset must be drawn with `stratified_sample`, never by taking the
first N lines.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from value_jax.data.errors import (
    DataFormatError,
    DataReport,
    PathLike,
    file_line,
    read_text_lines,
    report_or_new,
)

SPLITS = ("tr", "va", "te")

# Label sets per task. tree_depth: the data holds 5..11, the SentEval README says 5..12.
# top_constituents: the 19 most frequent top-constituent sequences plus OTHER (as listed by
# nyu-mll/jiant's SentEval task definitions).
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "bigram_shift": ("I", "O"),
    "coordination_inversion": ("I", "O"),
    "odd_man_out": ("C", "O"),
    "past_present": ("PAST", "PRES"),
    "subj_number": ("NN", "NNS"),
    "obj_number": ("NN", "NNS"),
    "tree_depth": tuple(str(d) for d in range(5, 13)),
    "top_constituents": (
        "ADVP_NP_VP_.",
        "CC_ADVP_NP_VP_.",
        "CC_NP_VP_.",
        "IN_NP_VP_.",
        "NP_ADVP_VP_.",
        "NP_NP_VP_.",
        "NP_PP_.",
        "NP_VP_.",
        "OTHER",
        "PP_NP_VP_.",
        "RB_NP_VP_.",
        "SBAR_NP_VP_.",
        "SBAR_VP_.",
        "S_CC_S_.",
        "S_NP_VP_.",
        "S_VP_.",
        "VBD_NP_VP_.",
        "VP_.",
        "WHADVP_SQ_.",
        "WHNP_SQ_.",
    ),
    "sentence_length": tuple(str(b) for b in range(6)),
}
TASKS = tuple(TASK_LABELS)


def sort_labels(labels) -> list[str]:
    """Numeric order when every label is an integer (tree_depth: 5 < 10), else string order."""
    labels = list(labels)
    if labels and all(x.lstrip("-").isdigit() for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


@dataclasses.dataclass
class ProbingSplit:
    sentences: list[list[str]]
    labels: list[str]
    label_ids: np.ndarray  # [N] int32, ids from ProbingData.label_to_id
    line_numbers: np.ndarray  # [N] int64, 1-based line in the source file

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class ProbingData:
    """One task's three partitions. `label_names[i]` is the label of id i: the labels present
    in the file, sorted (numerically for integer labels)."""

    task: str
    splits: dict[str, ProbingSplit]
    label_names: tuple[str, ...]

    @property
    def label_to_id(self) -> dict[str, int]:
        return {x: i for i, x in enumerate(self.label_names)}

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def read_probing_task(
    path: PathLike, task: Optional[str] = None, report: Optional[DataReport] = None
) -> ProbingData:
    """Reads `<task>.txt`. `task` defaults to the file stem; for one of `TASKS` every label must
    belong to the task's label set (else DataFormatError at file:line).

    Counts `blank_lines` (skipped), `repeated_spaces` (lines whose sentence had empty tokens,
    dropped from the token list), `known_labels_absent` (labels of a known task missing from the
    file: e.g. tree_depth's 12) and `empty_probing_splits` (a partition with no line). A line
    that is not 3 tab-separated fields, has an unknown split, an empty label or an empty sentence,
    or bytes that are not UTF-8, raises DataFormatError at file:line (1-based).
    """
    report = report_or_new(report)
    task = task or Path(path).stem
    known = TASK_LABELS.get(task)
    rows: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
    for i, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            report.count("blank_lines", example=file_line(path, i))
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataFormatError(
                path, f"{len(fields)} tab-separated fields", "3: split, label, sentence", line=i
            )
        split, label, sentence = fields
        if split not in rows:
            raise DataFormatError(path, f"split {split!r}", f"one of {SPLITS}", line=i)
        if not label or (known is not None and label not in known):
            raise DataFormatError(
                path,
                f"label {label!r}",
                f"one of {known}" if known else "a non-empty label",
                line=i,
            )
        tokens = sentence.split(" ")
        if "" in tokens:
            report.count("repeated_spaces", example=file_line(path, i))
            tokens = [t for t in tokens if t]
        if not tokens:
            raise DataFormatError(path, "an empty sentence", "at least one token", line=i)
        rows[split][0].append(tokens)
        rows[split][1].append(label)
        rows[split][2].append(i)
    for split, (sents, _, _) in rows.items():
        if not sents:
            report.count("empty_probing_splits", example=f"{Path(path).name}: {split}")
    present = sort_labels({x for _, labels, _ in rows.values() for x in labels})
    if known is not None:
        for x in known:
            if x not in present:
                report.count("known_labels_absent", example=f"{task}: {x}")
    to_id = {x: k for k, x in enumerate(present)}
    splits = {
        s: ProbingSplit(
            sents, labels, np.array([to_id[x] for x in labels], np.int32), np.array(lines, np.int64)
        )
        for s, (sents, labels, lines) in rows.items()
    }
    return ProbingData(task, splits, tuple(present))


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Largest-remainder apportionment of n over classes of the given sizes (never above a size)."""
    total = counts.sum()
    exact = counts * (n / total)
    quota = np.minimum(np.floor(exact).astype(np.int64), counts)
    rest = n - quota.sum()
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - quota[k]), k))
    while rest > 0:
        progressed = False
        for k in order:
            if rest > 0 and quota[k] < counts[k]:
                quota[k] += 1
                rest -= 1
                progressed = True
        if not progressed:
            break
    return quota


def stratified_sample(
    data: ProbingData, split: str, n: int, seed: int, report: Optional[DataReport] = None
) -> ProbingSplit:
    """A seeded random subset of `n` lines of `split`, each label represented in proportion to its
    share of the split (largest-remainder rounding). Lines come back in file order.
    Asking for more lines than the split holds returns all of them, counted as
    `sample_smaller_than_requested`.
    """
    report = report_or_new(report)
    src = data.splits[split]
    if n >= len(src):
        if n > len(src):
            report.count(
                "sample_smaller_than_requested", example=f"{data.task}/{split}: {len(src)} < {n}"
            )
        return src
    rng = np.random.default_rng(seed)
    classes = np.unique(src.label_ids)
    counts = np.array([(src.label_ids == c).sum() for c in classes])
    quota = _allocate(counts, n)
    chosen = []
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(src.label_ids == c)
        chosen.append(rng.choice(idx, int(q), replace=False))
    keep = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return ProbingSplit(
        [src.sentences[i] for i in keep],
        [src.labels[i] for i in keep],
        src.label_ids[keep],
        src.line_numbers[keep],
    )
