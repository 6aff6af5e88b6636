"""Cross-modal input ablation data (Frank, Bugliarello & Elliott 2021): Flickr30k Entities phrases
with their gold boxes, aligned to detected regions, collated per ablation setting.

    data = prepare_ablation(flickr_root, "flickr30k_obj36.tsv", tokenizer, split="val")
    loader = AblationLoader(data, [Vis4Lang("none"), Vis4Lang("object", 0.5)], batch_size=16,
                            model_type="uniter", head_classes=1601)
    for batch, targets in loader: ...

One example per (sentence, phrase whose chain has >= 1 gold box), as the reference
`load_annotations` builds them (14,433 on val). Overlaps follow the reference exactly: IoT =
intersection / GOLD-box area and IoU, each the max over the phrase's gold boxes, with VOLTA's
inclusive-pixel `+1` areas (`pixel_inclusive=True`); a region is ablated or masked when its
overlap is strictly greater than the threshold.

Settings (one row per setting and example; rows of several settings share batches):
  Vis4Lang(kind, threshold)  the phrase's word pieces become [MASK] (labels: the original ids);
      regions ablated — none; `object`: IoT > threshold; `all`: every real region; `outside`: a
      control ablating the regions that overlap no gold box at all — get the DATASET-MEAN
      feature (per-example weighting like the reference `_avg_feature`), never zeros.
  Lang4Vis(text, threshold)  text none / phrase ([MASK] on the phrase) / all ([MASK] on every
      word piece, [CLS]/[SEP] kept); regions with IoT > threshold are masked as in pre-training:
      features zeroed, plus `region_masked=1` for UNITER (its mask embedding); the target is
      the masked region of highest IoU. Examples with no masked region have no target: they are
      left out, counted as `lang4vis_no_region_masked`. The reference code (with its global
      [IMG] region first, as in every config it ships) adds a loss of 0.0 for them, so its means
      include them; `AblationLoader.unmasked_counts` gives their numbers so that
      `probes.ablation.Lang4VisProbe(average="reference")` can average the same way.
CTRL models' global [IMG] region (never ablated, recomputed as the regions' mean) is not
modelled: the original UNITER and LXMERT have none.

Class indices: `object_ids` are 0-based over the detector's 1600 foreground classes; in the
1601-way `cls_prob` (background at column 0) the same class sits at `object_ids + 1`.

Counted in `data.report`, never dropped silently: the readers' counts (notvisual_phrases,
phrases_without_box, images_without_features, truncated_sentences, ...), `phrases_truncated`
(a phrase cut off by max_text_len), `phrases_of_unknown_type`, `images_without_regions`,
`images_without_object_ids`, `lang4vis_no_region_masked`.

This module prepares the examples (`prepare_ablation`, `AblationData`, the settings, `summary`);
`AblationLoader`, which collates them per setting, is in `value_jax.data.ablation_loader`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import numpy as np

from value_jax.data.alignment import phrase_overlap
from value_jax.data.errors import (
    DataFormatError,
    DataReport,
    PathLike,
    read_text_lines,
    report_or_new,
)
from value_jax.data.features import NUM_OBJECT_CLASSES, RegionFeatureReader, dataset_mean_feature
from value_jax.data.flickr30k import PHRASE_TYPES, Flickr30kEntities, coref_links, sentence_place
from value_jax.data.loader_base import open_features, pixel_boxes
from value_jax.data.tokenization import WordPieceTokenizer, phrase_piece_span

VISION_ABLATIONS = ("none", "object", "all", "outside")
TEXT_ABLATIONS = ("none", "phrase", "all")
# The reference task config (`xm-influence_test_tasks.yml`): max_seq_length 38.
DEFAULT_MAX_TEXT_LEN = 38
_COUNTERS = (
    "notvisual_phrases",
    "phrases_without_box",
    "images_without_features",
    "examples_without_features",
    "images_without_regions",
    "images_without_object_ids",
    "phrases_of_unknown_type",
    "phrases_truncated",
    "truncated_sentences",
)


@dataclasses.dataclass
class ImageRegions:
    """Detected regions of one image (shared by all of its examples).

    features [R, F] float32; boxes [R, 4] absolute pixels; normalized_boxes [R, 4] x1/W, y1/H,
    x2/W, y2/H; cls_prob [R, 1601] (background at 0) or None; object_ids [R] 0-based over the
    1600 foreground classes and object_conf [R], or None when the features hold neither.
    """

    image_id: str
    features: np.ndarray
    boxes: np.ndarray
    normalized_boxes: np.ndarray
    cls_prob: Optional[np.ndarray]
    object_ids: Optional[np.ndarray]
    object_conf: Optional[np.ndarray]

    @property
    def num_regions(self) -> int:
        return len(self.features)


@dataclasses.dataclass
class AblationExample:
    """One (sentence, phrase) example. `id` cites it as `<image id>.txt:<1-based line> phrase
    <1-based phrase of the caption>` (`flickr30k.sentence_place`); `sentence_index` and
    `phrase_index` are 0-based. `span` is the phrase's half-open word-piece span in
    `input_ids` (`[CLS] ... [SEP]`); `iot` / `iou` `[R]` are the max over the phrase's gold boxes;
    `label_class` is the detector class (0-based over 1600) the head noun matched, or -1."""

    id: str
    image_id: str
    sentence_index: int
    phrase_index: int
    phrase: str
    entity_type: str
    input_ids: np.ndarray
    span: tuple[int, int]
    regions: ImageRegions
    iot: np.ndarray
    iou: np.ndarray
    head_noun: str
    label_match: bool = False
    label_class: int = -1

    @property
    def type_id(self) -> int:
        return PHRASE_TYPES.index(self.entity_type)


@dataclasses.dataclass
class AblationData:
    examples: list[AblationExample]
    mean_feature: np.ndarray
    mask_id: int
    pad_id: int
    report: DataReport
    label_match_vocab: bool = False

    def label_match_subset(self) -> "AblationData":
        """The LabelMatch examples only (the mean feature stays the full set's)."""
        if not self.label_match_vocab:
            raise ValueError(
                "LabelMatch needs the detector's objects_vocab.txt (pass objects_vocab)"
            )
        return dataclasses.replace(self, examples=[e for e in self.examples if e.label_match])


# ---------------------------------------------------------------------------------------------
# LabelMatch.


def read_objects_vocab(path: PathLike) -> dict[str, int]:
    """`objects_vocab.txt` (one class per line, synonyms comma-separated) -> lower-cased name ->
    0-based class (first line wins). A `__background__` first line (the 1601-line copies) is
    skipped so indices stay 0-based over the foreground classes."""
    lines = read_text_lines(path)
    if lines and lines[0].strip() == "__background__":
        lines = lines[1:]
    if len(lines) != NUM_OBJECT_CLASSES:
        raise DataFormatError(path, f"{len(lines)} classes", f"{NUM_OBJECT_CLASSES} (VG objects)")
    names: dict[str, int] = {}
    for k, line in enumerate(lines):
        for name in line.split(","):
            names.setdefault(name.strip().lower(), k)
    return names


def head_noun(phrase_words: Sequence[str]) -> str:
    """The phrase's last word, lower-cased (Flickr30k phrases end with their head noun)."""
    return phrase_words[-1].lower()


def match_label(noun: str, vocab: dict[str, int]) -> int:
    """Detector class of `noun` or of `noun` without a plural `s`; -1 when neither is a label."""
    for form in (noun, noun[:-1] if noun.endswith("s") and len(noun) > 1 else None):
        if form and form in vocab:
            return vocab[form]
    return -1


# ---------------------------------------------------------------------------------------------
# Preparation.


def _image_regions(rec, annotation, report) -> ImageRegions:
    boxes = pixel_boxes(rec, annotation.width, annotation.height, report)
    return ImageRegions(
        annotation.image_id,
        rec.features.astype(np.float32),
        boxes,
        rec.normalized_boxes(),
        rec.cls_prob,
        rec.object_ids,
        rec.object_conf,
    )


def prepare_ablation(
    flickr_root: PathLike,
    features: Union[PathLike, RegionFeatureReader],
    tokenizer: WordPieceTokenizer,
    *,
    split: str = "val",
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    max_images: Optional[int] = None,
    objects_vocab: Optional[PathLike] = None,
    pixel_inclusive: bool = True,
    features_options: Optional[dict] = None,
    report: Optional[DataReport] = None,
) -> AblationData:
    """Every (sentence, phrase with >= 1 gold box) example of `split`, with its regions.

    `max_images` keeps the first N images of the split file. `objects_vocab` enables the
    LabelMatch flag. The dataset-mean feature averages the regions of every example's image,
    an image counting once per example, as the reference does.
    """
    report = report_or_new(report)
    reader = open_features(features, features_options)
    vocab = read_objects_vocab(objects_vocab) if objects_vocab else None
    examples: list[AblationExample] = []
    try:
        images = Flickr30kEntities(flickr_root).iter_images(split, report)
        for n, (sentences, annotation) in enumerate(images):
            if max_images is not None and n >= max_images:
                break
            links = coref_links(sentences, annotation, report)
            if not links:
                continue
            rec = reader.get(annotation.image_id, report)
            if rec is None:
                report.count("examples_without_features", len(links), example=annotation.image_id)
                continue
            if rec.num_boxes == 0:
                report.count("images_without_regions", example=annotation.image_id)
                continue
            regions = _image_regions(rec, annotation, report)
            if regions.object_ids is None:
                report.count("images_without_object_ids", example=annotation.image_id)
            encodings = {}
            for link in links:
                s, p = link.sentence, link.phrase
                where = f"{sentence_place(s)} {p.text!r}"
                if p.type not in PHRASE_TYPES:
                    report.count("phrases_of_unknown_type", example=f"{where} {p.type}")
                    continue
                if s.index not in encodings:
                    encodings[s.index] = tokenizer.encode_words(s.words, max_text_len, report)
                enc = encodings[s.index]
                span = phrase_piece_span(enc, p.first_word_index, p.num_words)
                if span is None:
                    report.count("phrases_truncated", example=where)
                    continue
                gold = [np.asarray(link.boxes, np.float64)]
                iot = phrase_overlap(gold, regions.boxes, "iot", pixel_inclusive)[0]
                iou = phrase_overlap(gold, regions.boxes, "iou", pixel_inclusive)[0]
                noun = head_noun(s.words[p.word_span[0] : p.word_span[1]])
                label = match_label(noun, vocab) if vocab is not None else -1
                examples.append(
                    AblationExample(
                        f"{sentence_place(s)} phrase {link.phrase_index + 1}",
                        s.image_id,
                        s.index,
                        link.phrase_index,
                        p.text,
                        p.type,
                        enc.ids,
                        span,
                        regions,
                        iot.astype(np.float32),
                        iou.astype(np.float32),
                        noun,
                        label >= 0,
                        label,
                    )
                )
        if not examples:
            raise ValueError(
                f"no ablation example in {flickr_root} split {split!r} with features "
                f"{getattr(reader, 'path', reader)}; data report: {report.summary_lines()}"
            )
        mean = dataset_mean_feature(reader, [e.image_id for e in examples], report)
        for (
            name
        ) in _COUNTERS:  # listed even at zero, so a reader of the report sees they were checked
            report.count(name, 0)
    finally:
        if reader is not features:
            reader.close()
    return AblationData(
        examples, mean, tokenizer.mask_id, tokenizer.pad_id, report, vocab is not None
    )


# ---------------------------------------------------------------------------------------------
# Settings and the ablated inputs of one example.


@dataclasses.dataclass(frozen=True)
class Vis4Lang:
    kind: str = "none"
    threshold: float = 0.5

    def __post_init__(self):
        if self.kind not in VISION_ABLATIONS:
            raise ValueError(
                f"vision ablation must be one of {VISION_ABLATIONS}, got {self.kind!r}"
            )

    @property
    def name(self) -> str:
        return f"object@{self.threshold:.2f}" if self.kind == "object" else self.kind

    def ablated(self, ex: AblationExample) -> np.ndarray:
        """`[R]` bool: the regions whose features become the dataset mean."""
        r = ex.regions.num_regions
        if self.kind == "none":
            return np.zeros(r, bool)
        if self.kind == "all":
            return np.ones(r, bool)
        if self.kind == "outside":
            return ex.iot <= 0.0
        return ex.iot > self.threshold


@dataclasses.dataclass(frozen=True)
class Lang4Vis:
    text: str = "none"
    threshold: float = 0.5

    def __post_init__(self):
        if self.text not in TEXT_ABLATIONS:
            raise ValueError(f"text ablation must be one of {TEXT_ABLATIONS}, got {self.text!r}")

    @property
    def name(self) -> str:
        return self.text

    def masked(self, ex: AblationExample) -> np.ndarray:
        return ex.iot > self.threshold


def target_region(ex: AblationExample, masked: np.ndarray) -> int:
    """The masked region with the highest IoU with a gold box (-1 when none is masked)."""
    if not masked.any():
        return -1
    return int(np.argmax(np.where(masked, ex.iou, -np.inf)))


def masked_text(ex: AblationExample, what: str, mask_id: int) -> np.ndarray:
    ids = ex.input_ids.copy()
    if what == "phrase":
        ids[ex.span[0] : ex.span[1]] = mask_id
    elif what == "all":
        ids[1:-1] = mask_id
    return ids


def fold_classes(probs: Optional[np.ndarray], object_id: int, num_foreground: int):
    """Maps the detector's 1600 foreground classes onto a head with `num_foreground` of them
    (class k -> k mod num_foreground; background stays at column 0). Only for the demo's tiny
    heads: a real checkpoint's head matches the detector and nothing is folded."""
    if num_foreground == NUM_OBJECT_CLASSES:
        return probs, object_id
    folded = None
    if probs is not None:
        folded = np.zeros(num_foreground + 1, np.float32)
        folded[0] = probs[0]
        np.add.at(folded, 1 + np.arange(NUM_OBJECT_CLASSES) % num_foreground, probs[1:])
    return folded, object_id % num_foreground


def summary(data: AblationData) -> dict:
    """Example counts per entity type, LabelMatch size and, on LabelMatch, how often the
    detector's top class at the best-IoU region equals the phrase's label (Frank et al. §6)."""
    types = {t: 0 for t in PHRASE_TYPES}
    agree = n_match = n_scored = 0
    for ex in data.examples:
        types[ex.entity_type] += 1
        n_match += ex.label_match
        if ex.label_match and ex.regions.object_ids is not None:
            n_scored += 1
            agree += int(ex.regions.object_ids[int(np.argmax(ex.iou))] == ex.label_class)
    out = {
        "examples": len(data.examples),
        "per_type": types,
        "images": len({e.image_id for e in data.examples}),
    }
    if data.label_match_vocab:
        out["label_match_examples"] = n_match
        out["detector_top1_agrees_with_label"] = agree / n_scored if n_scored else math.nan
    return out
