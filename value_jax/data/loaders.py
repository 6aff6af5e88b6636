"""Loaders: real files -> prepared `Example`s -> `(Batch, targets)` batches of static shapes.

    loader = CorefLoader(flickr_root, "flickr30k_obj36.tsv", "vocab.txt", lowercase=True)
    for batch, targets in loader:          # len(loader) batches; loader.report holds the counts
        ...

Each loader prepares every example up front (text ids, region indices, target arrays: small)
and reads region features per batch from the features file, so memory stays at a few batches of
features. Preparation is deterministic: every random choice (negative pairs, random baselines,
the caption paired with an image) draws from a generator keyed by the seed and the example's own
ids (`collate.example_rng`). IoU is computed in pixels on absolute boxes; the Batch gets the
boxes normalised by the image size.

Everything dropped or changed is counted in `loader.report` (a `DataReport`): the readers' counts
(notvisual_phrases, phrases_without_box, images_without_features, images_with_nonfinite_features,
truncated_sentences, over_per_image_cap, ...) plus the ones named in each `prepare_*` docstring.
A loader left with no example at all raises `errors.NoExamplesError` (a ValueError) whose message
says "no examples left" and lists the report, so a caller never runs the probes on nothing.

Where the loaders live: `loader_base` holds what every loader builds on (`ExampleLoader`,
`open_features`, `pixel_boxes`, the region cache); this module the coreference and SentEval
loaders; `relation_loader` the Visual Genome relations loader (`RelationLoader`,
`prepare_relations`). `ExampleLoader`, `open_features` and `pixel_boxes` are also part of this
module's interface (`__all__`).

Example ids cite their source as `<file>:<1-based line>` where there is one (a caption:
`<image id>.txt:<line>`, a SentEval sentence: `<task>.txt:<line>`), else the image id.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Optional, Union

import numpy as np

from value_jax.data import collate as C
from value_jax.data.alignment import match_gold_boxes, phrase_overlap
from value_jax.data.errors import DataReport, PathLike, file_line, report_or_new
from value_jax.data.features import RegionFeatureReader
from value_jax.data.flickr30k import PHRASE_TYPES, Flickr30kEntities, coref_links, sentence_place
from value_jax.data.loader_base import (
    ExampleLoader,
    _check_text_len,
    _FeatureLoader,
    _RegionCache,
    _require_examples,
    open_features,
    pixel_boxes,
)
from value_jax.data.senteval import SPLITS, read_probing_task, stratified_sample
from value_jax.data.tokenization import WordPieceTokenizer, phrase_piece_span

REGION_SOURCES = ("iou", "gold_in_features")


# ---------------------------------------------------------------------------------------------
# Coreference (Flickr30k Entities).


def prepare_coref(
    flickr_root: PathLike,
    features: RegionFeatureReader,
    tokenizer: WordPieceTokenizer,
    *,
    split: str = "val",
    seed: int = 0,
    region_source: str = "iou",
    iou_threshold: float = 0.5,
    max_text_len: int = 64,
    max_images: Optional[int] = None,
    negative_ratio: float = 1.0,
    report: Optional[DataReport] = None,
) -> list[C.Example]:
    """One example per caption with >= 1 usable link: the `coref.*` targets of VALUE §3.3.

    A link is a (region, phrase) pair: `region_source="iou"` links a phrase to every detected
    region whose IoU with one of its gold boxes is >= `iou_threshold`; `"gold_in_features"`
    links it to the regions that ARE its gold boxes (features that include them, matched within
    half a pixel). Per linked phrase, round(`negative_ratio` x links) negative items pair it with
    regions below the threshold for every gold box of the phrase. Every item also gets a random
    region not linked to the phrase (rand_region) and the tokens of a random other phrase of the
    caption that is not in its chain (rand_tokens; all-False mask when there is none: a
    coreferent phrase would not be a random baseline). `max_images` keeps the first N images of
    the split file, with or without features.

    Counts `phrases_truncated` (cut off by max_text_len), `phrases_of_unknown_type`,
    `phrases_without_region` (no region passes the threshold / gold box not in features),
    `negatives_short` (fewer negative regions than asked), `items_without_random_phrase`,
    `captions_without_links`, `image_size_mismatch`, plus the readers' counts.
    """
    if region_source not in REGION_SOURCES:
        raise ValueError(f"region_source must be one of {REGION_SOURCES}, got {region_source!r}")
    report = report_or_new(report)
    examples = []
    images = Flickr30kEntities(flickr_root).iter_images(split, report)
    for n_image, (sentences, annotation) in enumerate(images):
        if max_images is not None and n_image >= max_images:  # max_images <= 0: none
            break
        rec = features.get(annotation.image_id, report)
        if rec is None:
            continue
        boxes = pixel_boxes(rec, annotation.width, annotation.height, report)
        links_of = collections.defaultdict(list)
        for link in coref_links(sentences, annotation, report):
            links_of[link.sentence_index].append(link)
        for s in sentences:
            ex = _coref_caption(
                s,
                links_of[s.index],
                boxes,
                tokenizer,
                seed,
                region_source,
                iou_threshold,
                max_text_len,
                negative_ratio,
                report,
            )
            if ex is None:
                if links_of[s.index]:
                    report.count("captions_without_links", example=sentence_place(s))
                continue
            examples.append(ex)
    return examples


def _coref_caption(
    s, links, boxes, tokenizer, seed, region_source, threshold, max_text_len, negative_ratio, report
) -> Optional[C.Example]:
    if not links:
        return None
    enc = tokenizer.encode_words(s.words, max_text_len, report)
    spans = [phrase_piece_span(enc, p.first_word_index, p.num_words) for p in s.phrases]
    rng = C.example_rng(seed, "coref", s.image_id, s.index)
    n_regions = len(boxes)
    items = []  # (region, span, type, linked, rand_region, rand_span)
    for link in links:
        where = f"{sentence_place(s)} {link.phrase.text!r}"
        span = spans[link.phrase_index]
        if span is None:
            report.count("phrases_truncated", example=where)
            continue
        if link.phrase.type not in PHRASE_TYPES:
            report.count("phrases_of_unknown_type", example=f"{where} {link.phrase.type}")
            continue
        overlap = phrase_overlap([np.asarray(link.boxes, np.float64)], boxes)[0]
        if region_source == "iou":
            linked = np.flatnonzero(overlap >= threshold)
        else:
            found = match_gold_boxes(np.asarray(link.boxes, np.float64), boxes, report=report)
            linked = np.unique(found[found >= 0])
        if len(linked) == 0:
            report.count("phrases_without_region", example=where)
            continue
        candidates = np.setdiff1d(np.flatnonzero(overlap < threshold), linked)
        n_neg = int(round(negative_ratio * len(linked)))
        negatives = np.sort(rng.choice(candidates, min(n_neg, len(candidates)), replace=False))
        if len(negatives) < n_neg:
            report.count("negatives_short", n_neg - len(negatives), example=where)
        not_linked = np.setdiff1d(np.arange(n_regions), linked)
        others = [
            spans[k]
            for k, p in enumerate(s.phrases)
            if k != link.phrase_index
            and spans[k] is not None
            and p.chain_id != link.phrase.chain_id
        ]
        type_id = PHRASE_TYPES.index(link.phrase.type)
        for region, is_link in [(int(r), True) for r in linked] + [
            (int(r), False) for r in negatives
        ]:
            pool = not_linked if len(not_linked) else np.arange(n_regions)
            rand_region = int(pool[rng.integers(len(pool))])
            rand_span = others[int(rng.integers(len(others)))] if others else None
            if rand_span is None:
                report.count("items_without_random_phrase", example=where)
            items.append((region, span, type_id, is_link, rand_region, rand_span))
    if not items:
        return None
    width = max(max(e - b for b, e in (it[1], it[5] or (0, 0))) for it in items)
    p = len(items)
    tokens = np.zeros((p, width), np.int32)
    token_mask = np.zeros((p, width), bool)
    rand_tokens = np.zeros((p, width), np.int32)
    rand_mask = np.zeros((p, width), bool)
    for i, (_, span, _, _, _, rand_span) in enumerate(items):
        n = span[1] - span[0]
        tokens[i, :n], token_mask[i, :n] = np.arange(*span), True
        if rand_span is not None:
            n = rand_span[1] - rand_span[0]
            rand_tokens[i, :n], rand_mask[i, :n] = np.arange(*rand_span), True
    targets = {
        "coref.region": [it[0] for it in items],
        "coref.tokens": tokens,
        "coref.token_mask": token_mask,
        "coref.type": [it[2] for it in items],
        "coref.linked": [it[3] for it in items],
        "coref.mask": np.ones(p, bool),
        "coref.rand_region": [it[4] for it in items],
        "coref.rand_tokens": rand_tokens,
        "coref.rand_token_mask": rand_mask,
    }
    return C.Example(
        sentence_place(s), enc.ids, targets, image_id=s.image_id, num_regions=n_regions
    )


class CorefLoader(_FeatureLoader):
    """Flickr30k Entities coreference batches (targets `coref.*`). See `prepare_coref`.

    `features_path` is any region-feature file `open_region_features` reads (or an open reader);
    `features_options` go to it. `types` lists the entity type of each `coref.type` id.
    """

    types = PHRASE_TYPES

    def __init__(
        self,
        flickr_root: PathLike,
        features_path,
        vocab_path: PathLike,
        lowercase: bool,
        split: str = "val",
        batch_size: int = 8,
        seed: int = 0,
        region_source: str = "iou",
        iou_threshold: float = 0.5,
        max_text_len: int = 64,
        max_images: Optional[int] = None,
        report: Optional[DataReport] = None,
        *,
        negative_ratio: float = 1.0,
        buckets: Union[C.Buckets, str] = C.DEFAULT_BUCKETS,
        overflow: str = "error",
        features_options: Optional[dict] = None,
    ):
        _check_text_len(max_text_len, buckets)
        report = report_or_new(report)
        reader = self._open(features_path, features_options)
        self.tokenizer = WordPieceTokenizer(vocab_path, lowercase)
        examples = prepare_coref(
            flickr_root,
            reader,
            self.tokenizer,
            split=split,
            seed=seed,
            region_source=region_source,
            iou_threshold=iou_threshold,
            max_text_len=max_text_len,
            max_images=max_images,
            negative_ratio=negative_ratio,
            report=report,
        )
        self._require_examples(
            examples, f"the Flickr30k Entities {split} split of {flickr_root}", report, max_images
        )
        super().__init__(
            examples,
            batch_size,
            buckets=buckets,
            regions=_RegionCache(reader),
            overflow=overflow,
            report=report,
        )


# ---------------------------------------------------------------------------------------------
# SentEval.


def senteval_file(path: PathLike, task: str) -> Path:
    """`path` itself when it is a file, else `<path>/<task>.txt`."""
    path = Path(path)
    return path if path.is_file() else path / f"{task}.txt"


def prepare_senteval(
    path: PathLike,
    task: str,
    tokenizer: WordPieceTokenizer,
    *,
    seed: int = 0,
    per_split: Optional[int] = None,
    max_text_len: int = 64,
    report: Optional[DataReport] = None,
) -> tuple[list[C.Example], tuple[str, ...]]:
    """One text-only example per sentence (`senteval.*` targets: label id, split 0 tr / 1 va /
    2 te), tr then va then te in file order; `per_split` draws a seeded stratified sample of each
    split. Returns the examples and the label names (label id = position)."""
    report = report_or_new(report)
    file = senteval_file(path, task)
    data = read_probing_task(file, task, report)
    examples = []
    for split_id, split in enumerate(SPLITS):
        part = (
            data.splits[split]
            if per_split is None
            else stratified_sample(data, split, per_split, seed, report)
        )
        for tokens, label, line in zip(part.sentences, part.label_ids, part.line_numbers):
            ids = tokenizer.encode_words(tokens, max_text_len, report).ids
            examples.append(
                C.Example(
                    file_line(file, int(line)),
                    ids,
                    {
                        "senteval.label": int(label),
                        "senteval.split": split_id,
                        "senteval.mask": True,
                    },
                )
            )
    return examples, data.label_names


class SentEvalLoader(ExampleLoader):
    """SentEval probing batches, text only: one dummy region of width `feat_dim` with
    region_mask 0 (the probes read only text states). `labels` names each label id."""

    def __init__(
        self,
        path: PathLike,
        task: str,
        vocab_path: PathLike,
        lowercase: bool,
        batch_size: int = 8,
        seed: int = 0,
        per_split: Optional[int] = None,
        max_text_len: int = 64,
        report: Optional[DataReport] = None,
        *,
        feat_dim: int = 2048,
        buckets: Union[C.Buckets, str] = C.DEFAULT_BUCKETS,
        overflow: str = "error",
    ):
        _check_text_len(max_text_len, buckets)
        report = report_or_new(report)
        self.task = task
        self.tokenizer = WordPieceTokenizer(vocab_path, lowercase)
        examples, self.labels = prepare_senteval(
            path,
            task,
            self.tokenizer,
            seed=seed,
            per_split=per_split,
            max_text_len=max_text_len,
            report=report,
        )
        _require_examples(examples, f"SentEval task {task} in {senteval_file(path, task)}", report)
        super().__init__(
            examples,
            batch_size,
            buckets=buckets,
            feat_dim=feat_dim,
            overflow=overflow,
            report=report,
        )


__all__ = [
    "ExampleLoader",
    "CorefLoader",
    "SentEvalLoader",
    "prepare_coref",
    "prepare_senteval",
    "open_features",
    "pixel_boxes",
    "senteval_file",
]
