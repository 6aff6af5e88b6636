"""One probing experiment: seeded (optionally grouped) splits, a control task, the scores.

* `split_indices`: train/dev/test by seed, whole groups (images) kept on one side.
* Control tasks (Hewitt & Liang 2019): `control_labels`, `selectivity`.
* `train_prober`: split -> fit (`classifiers.fit_linear` for Eq. 3 features, `fit_bilinear` for
  Eq. 4 embedding pairs) -> evaluate (-> control task) -> `ProbeResult`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from value_jax.probes.classifiers import (
    CollectedRows,
    evaluate,
    evaluate_bilinear,
    fit_bilinear,
    fit_linear,
)


def control_labels(type_ids, labels, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Control task of Hewitt & Liang (2019): `[N]` labels where every distinct `type_ids` value
    gets one label drawn from the task's empirical label distribution, so only memorising types
    can solve it. For pair tasks the type is the caller's choice (e.g. the phrase's head word, or
    a (phrase, region class) id); the same type keeps its label across train/dev/test."""
    type_ids, labels = np.asarray(type_ids), np.asarray(labels)
    if type_ids.ndim != 1 or type_ids.shape != labels.shape:
        raise ValueError(f"type_ids {type_ids.shape} and labels {labels.shape} must both be [N]")
    if labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be non-empty ints in [0, {num_classes})")
    prior = np.bincount(labels, minlength=num_classes) / labels.size
    types, inverse = np.unique(type_ids, return_inverse=True)
    return rng.choice(num_classes, size=types.size, p=prior)[inverse].astype(labels.dtype)


def selectivity(task_acc, control_acc):
    """Hewitt & Liang's selectivity: task accuracy minus control-task accuracy (elementwise)."""
    return np.asarray(task_acc, np.float64) - np.asarray(control_acc, np.float64)


def split_indices(
    n: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), groups=None
) -> tuple:
    """Seeded split of `range(n)` into `len(fractions)` sorted index arrays.

    With `groups` (`[n]`, e.g. image ids) whole groups are shuffled and each lands in the split
    where its middle sample falls, so no group straddles two splits and sizes are close to the
    fractions when groups are small. With at least as many groups as splits no split is left
    empty: an empty split takes the last-drawn group of the split holding the most groups (a
    handful of images still gives train, dev and test).
    """
    fractions = np.asarray(fractions, np.float64)
    if (
        fractions.ndim != 1
        or fractions.size < 2
        or np.any(fractions < 0)
        or not np.isclose(fractions.sum(), 1.0)
    ):
        raise ValueError(
            f"fractions must be >= 2 non-negative numbers summing to 1, got {fractions.tolist()}"
        )
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions)[:-1]
    if groups is None:
        return tuple(
            np.sort(p) for p in np.split(rng.permutation(n), np.round(bounds * n).astype(int))
        )
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must be [n] = [{n}], got {groups.shape}")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = rng.permutation(counts.size)
    middle = (np.cumsum(counts[order]) - counts[order] / 2) / n
    split_of_group = np.empty(counts.size, np.int64)
    split_of_group[order] = np.searchsorted(bounds, middle, side="right")
    if counts.size >= fractions.size:
        for k in range(fractions.size):
            if not np.any(split_of_group == k):
                donor = np.argmax(np.bincount(split_of_group, minlength=fractions.size))
                split_of_group[order[np.flatnonzero(split_of_group[order] == donor)[-1]]] = k
    split = split_of_group[inverse]
    return tuple(np.flatnonzero(split == k) for k in range(fractions.size))


@dataclasses.dataclass
class ProbeResult:
    """Accuracies (fractions in [0, 1]) per probe, e.g. per layer (`names`: the layer names, e.g. "layer1").

    best_epoch is 0-based; majority_acc is the test accuracy of always predicting the most
    frequent train label; control_* fields are set when a control task was run."""

    names: list
    train_acc: list
    dev_acc: list
    test_acc: list
    best_epoch: list
    epochs_run: list
    num_classes: int
    num_train: int
    num_dev: int
    num_test: int
    majority_acc: float
    control_test_acc: Optional[list] = None
    selectivity: Optional[list] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_prober(
    features_or_pairs,
    labels,
    *,
    num_classes: Optional[int] = None,
    seed: int = 0,
    fractions=(0.8, 0.1, 0.1),
    groups=None,
    control_type_ids=None,
    names: Optional[Sequence[str]] = None,
    **fit_kwargs,
) -> ProbeResult:
    """Split -> fit -> evaluate (-> control task) for one probing experiment.

    Args:
      features_or_pairs: `[P, N, F]` (or `[N, F]`) features for `fit_linear`, or a pair
        `(e_i, e_j)` of `[P, N, D]` (or `[N, D]`) embeddings for `fit_bilinear`, or a pair of
        `CollectedRows` (one probe, streamed from the collected arrays).
      labels: `[N]` ints, shared by all probes. num_classes: default `max(labels) + 1`.
      seed: drives the split, the probe key and the control labels.
      groups: `[N]` ids no split may share (e.g. image ids). control_type_ids: `[N]` type ids.
      fit_kwargs: passed to `fit_linear` / `fit_bilinear`.
    """
    bilinear = isinstance(features_or_pairs, (tuple, list))
    streamed = bilinear and all(isinstance(a, CollectedRows) for a in features_or_pairs)
    if streamed:  # one probe's rows, read on demand: split by index, never copied whole
        arrays = list(features_or_pairs)
        part = lambda idx: [a.subset(idx) for a in arrays]
    else:
        arrays = [
            np.asarray(a, np.float32)
            for a in (features_or_pairs if bilinear else [features_or_pairs])
        ]
        arrays = [a[None] if a.ndim == 2 else a for a in arrays]
        part = lambda idx: [a[:, idx] for a in arrays]
    labels = np.asarray(labels)
    n, num_probes = labels.shape[0], arrays[0].shape[0]
    names = list(names) if names is not None else [str(p) for p in range(num_probes)]
    if (
        labels.ndim != 1
        or any(a.shape[:2] != (num_probes, n) for a in arrays)
        or len(names) != num_probes
    ):
        raise ValueError(
            f"need labels [N], features [P, N, F] and P names; got labels "
            f"{labels.shape}, features {[a.shape for a in arrays]}, "
            f"{len(names)} names"
        )
    num_classes = int(num_classes or labels.max() + 1)
    splits = split_indices(n, seed, fractions, groups)
    if len(splits) != 3 or min(len(s) for s in splits) == 0:
        raise ValueError(
            f"need non-empty train/dev/test splits, got sizes "
            f"{[len(s) for s in splits]} from fractions {list(fractions)}"
        )
    fit, score = (fit_bilinear, evaluate_bilinear) if bilinear else (fit_linear, evaluate)

    def fit_and_score(y, scored=splits):
        train, dev = splits[0], splits[1]
        probe = fit(
            *part(train),
            y[train],
            *part(dev),
            y[dev],
            num_classes,
            jax.random.PRNGKey(seed),
            **fit_kwargs,
        )
        return probe, [
            np.asarray(score(probe, *part(idx), y[idx]), np.float64).tolist() for idx in scored
        ]

    probe, (train_acc, dev_acc, test_acc) = fit_and_score(labels)
    majority = np.argmax(np.bincount(labels[splits[0]], minlength=num_classes))
    result = ProbeResult(
        names=names,
        train_acc=train_acc,
        dev_acc=dev_acc,
        test_acc=test_acc,
        best_epoch=np.asarray(probe.record.best_epoch).tolist(),
        epochs_run=np.asarray(probe.record.epochs_run).tolist(),
        num_classes=num_classes,
        num_train=len(splits[0]),
        num_dev=len(splits[1]),
        num_test=len(splits[2]),
        majority_acc=float(np.mean(labels[splits[2]] == majority)),
    )
    if control_type_ids is not None:
        control = control_labels(control_type_ids, labels, num_classes, np.random.default_rng(seed))
        # Only its test accuracy is reported: train and dev are not scored (at Flickr30k
        # scale scoring them would cost ~0.1 h of a full run).
        result.control_test_acc = fit_and_score(control, scored=splits[2:])[1][0]
        result.selectivity = selectivity(test_acc, result.control_test_acc).tolist()
    return result
