"""Visual Genome relations: VG annotations + region features -> `Example`s -> batches.

    loader = RelationLoader(vg_root, "vg_obj36.tsv", "vocab.txt", lowercase=True)

What `value_jax.data.loaders` says of every loader holds here (examples prepared up front,
features read per batch, deterministic draws, everything dropped counted in `loader.report`).
Each image is paired with a caption (`captions`: its region descriptions, a mismatched image's,
or none) and its sampled related / unrelated region pairs become the targets.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Optional, Union

import numpy as np

from value_jax.data import collate as C
from value_jax.data.alignment import iou, mismatched_caption_pairs
from value_jax.data.errors import DataReport, PathLike, report_or_new
from value_jax.data.features import RegionFeatureReader
from value_jax.data.loader_base import _check_text_len, _FeatureLoader, _RegionCache, pixel_boxes
from value_jax.data.tokenization import WordPieceTokenizer
from value_jax.data.visual_genome import (
    read_image_data,
    read_region_descriptions,
    read_relationships,
    sample_relation_pairs,
)

CAPTION_MODES = ("region", "mismatched", "none")


def _encode_caption(tokenizer, text: str, max_text_len: int, report) -> np.ndarray:
    return tokenizer.encode_words(text.split(), max_text_len, report).ids


def prepare_relations(
    vg_root: PathLike,
    features: RegionFeatureReader,
    tokenizer: WordPieceTokenizer,
    *,
    seed: int = 0,
    num_predicates: int = 32,
    max_pairs_per_predicate: int = 15000,
    max_same_type_per_image: int = 5,
    iou_threshold: float = 0.5,
    captions: str = "region",
    max_text_len: int = 64,
    max_images: Optional[int] = None,
    negative_ratio: float = 1.0,
    report: Optional[DataReport] = None,
) -> tuple[list[C.Example], tuple[str, ...]]:
    """One example per image: VALUE §3.4's sampled relation pairs as `rel.*` targets, and the
    predicate names (class id = position).

    Subject and object boxes go to their best-IoU detected region (IoU >= `iou_threshold`, else
    the pair is dropped). Negative pairs (round(`negative_ratio` x positives) per image) are
    ordered region pairs that no relation of the image (sampled or not) covers in either
    direction at the threshold; their `rel.pred` is -1. Text: a seeded dense caption of the image
    (`captions="region"`), one of another image (`"mismatched"`, VALUE's baseline), or none.
    Sampling runs over every image; `max_images` then keeps the first N image ids that have pairs.

    Counts `relation_pairs_without_region`, `relation_pairs_on_one_region`,
    `relation_pairs_duplicate_after_alignment`, `negatives_short`, `images_without_relation_pairs`,
    `images_without_captions` (text left empty), `images_without_size`, `image_size_mismatch`,
    plus the readers' and the sampler's counts.
    """
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    report = report_or_new(report)
    root = Path(vg_root)
    images = read_image_data(root / "image_data.json", report)
    relations = read_relationships(root / "relationships.json", report)
    sample = sample_relation_pairs(
        relations, num_predicates, max_pairs_per_predicate, max_same_type_per_image, seed, report
    )
    pred_id = {p: i for i, p in enumerate(sample.predicates)}
    sampled = collections.defaultdict(list)
    for r in sample.relations:
        sampled[r.image_id].append(r)
    # max(.., 0): a negative count keeps no image, as in prepare_coref (a plain slice would keep
    # all but the last |max_images|).
    image_ids = sorted(sampled)[: max(max_images, 0)] if max_images is not None else sorted(sampled)

    prepared = []  # (image_id, num_regions, targets)
    for image_id in image_ids:
        rec = features.get(str(image_id), report)
        if rec is None:
            continue
        info = images.get(image_id)
        if info is None and rec.box_units == "normalized":
            report.count("images_without_size", example=image_id)
            continue
        boxes = (
            pixel_boxes(rec, info.width, info.height, report)
            if info
            else rec.boxes.astype(np.float64)
        )
        targets = _relation_targets(
            image_id,
            sampled[image_id],
            relations.get(image_id, []),
            boxes,
            pred_id,
            iou_threshold,
            negative_ratio,
            seed,
            report,
        )
        if targets is None:
            report.count("images_without_relation_pairs", example=image_id)
            continue
        prepared.append((image_id, len(boxes), targets))

    texts = _relation_captions([p[0] for p in prepared], root, captions, seed, report)
    examples = [
        C.Example(
            str(image_id),
            _encode_caption(tokenizer, texts[image_id], max_text_len, report),
            targets,
            image_id=str(image_id),
            num_regions=n,
        )
        for image_id, n, targets in prepared
    ]
    return examples, sample.predicates


def _relation_targets(
    image_id, rels, all_rels, boxes, pred_id, threshold, negative_ratio, seed, report
):
    n = len(boxes)
    if n < 2:
        return None

    def region_of(box):
        ov = iou(np.asarray([box]), boxes)[0]
        best = int(ov.argmax())
        return best if ov[best] >= threshold else -1

    pos, seen = [], set()
    for r in rels:
        where = f"image {image_id} relationship {r.relationship_id} {r.predicate_norm!r}"
        s, o = region_of(r.subject.box_xyxy), region_of(r.object.box_xyxy)
        if s < 0 or o < 0:
            report.count("relation_pairs_without_region", example=where)
            continue
        if s == o:
            report.count("relation_pairs_on_one_region", example=where)
            continue
        key = (s, o, pred_id[r.predicate_norm])
        if key in seen:
            report.count("relation_pairs_duplicate_after_alignment", example=where)
            continue
        seen.add(key)
        pos.append(key)
    if not pos:
        return None
    # Every region pair that some annotated relation covers, either way round, is not a negative.
    subj = (
        iou(np.asarray([r.subject.box_xyxy for r in all_rels]).reshape(-1, 4), boxes) >= threshold
    )
    obj = iou(np.asarray([r.object.box_xyxy for r in all_rels]).reshape(-1, 4), boxes) >= threshold
    covered = (subj.T.astype(np.int64) @ obj.astype(np.int64)) > 0
    covered |= covered.T
    np.fill_diagonal(covered, True)
    for s, o, _ in pos:
        covered[s, o] = covered[o, s] = True
    cands = np.flatnonzero(~covered.reshape(-1))
    rng = C.example_rng(seed, "rel", image_id)
    n_neg = int(round(negative_ratio * len(pos)))
    neg = np.sort(rng.choice(cands, min(n_neg, len(cands)), replace=False))
    if len(neg) < n_neg:
        report.count("negatives_short", n_neg - len(neg), example=f"image {image_id}")
    items = pos + [(int(k // n), int(k % n), -1) for k in neg]
    return {
        "rel.subj": [it[0] for it in items],
        "rel.obj": [it[1] for it in items],
        "rel.pred": [it[2] for it in items],
        "rel.related": [it[2] >= 0 for it in items],
        "rel.mask": np.ones(len(items), bool),
    }


def _relation_captions(image_ids, root: Path, mode: str, seed: int, report) -> dict:
    if mode == "none":
        return {i: "" for i in image_ids}
    regions = read_region_descriptions(root / "region_descriptions.json", report)
    by_image = {i: [r.phrase for r in regions.get(i, []) if r.phrase.split()] for i in image_ids}
    texts = {}
    for i in image_ids:
        if not by_image[i]:
            report.count("images_without_captions", example=i)
            texts[i] = ""
    have = [i for i in image_ids if by_image[i]]
    if mode == "region":
        for i in have:
            texts[i] = by_image[i][
                int(C.example_rng(seed, "caption", i).integers(len(by_image[i])))
            ]
    elif len(have) >= 2:
        for pair in mismatched_caption_pairs(have, by_image, seed):
            texts[pair.image_id] = pair.caption
    else:
        for i in have:
            report.count(
                "images_without_captions", example=f"{i}: no other image to lend a caption"
            )
            texts[i] = ""
    return texts


class RelationLoader(_FeatureLoader):
    """Visual Genome relation batches (targets `rel.*`); `predicates` names each `rel.pred` id.
    See `prepare_relations`."""

    def __init__(
        self,
        vg_root: PathLike,
        features_path,
        vocab_path: PathLike,
        lowercase: bool,
        batch_size: int = 8,
        seed: int = 0,
        num_predicates: int = 32,
        max_pairs_per_predicate: int = 15000,
        max_same_type_per_image: int = 5,
        iou_threshold: float = 0.5,
        captions: str = "region",
        max_images: Optional[int] = None,
        report: Optional[DataReport] = None,
        *,
        max_text_len: int = 64,
        negative_ratio: float = 1.0,
        buckets: Union[C.Buckets, str] = C.DEFAULT_BUCKETS,
        overflow: str = "error",
        features_options: Optional[dict] = None,
    ):
        _check_text_len(max_text_len, buckets)
        report = report_or_new(report)
        reader = self._open(features_path, features_options)
        self.tokenizer = WordPieceTokenizer(vocab_path, lowercase)
        examples, self.predicates = prepare_relations(
            vg_root,
            reader,
            self.tokenizer,
            seed=seed,
            num_predicates=num_predicates,
            max_pairs_per_predicate=max_pairs_per_predicate,
            max_same_type_per_image=max_same_type_per_image,
            iou_threshold=iou_threshold,
            captions=captions,
            max_text_len=max_text_len,
            max_images=max_images,
            negative_ratio=negative_ratio,
            report=report,
        )
        self._require_examples(
            examples, f"the Visual Genome relations of {vg_root}", report, max_images
        )
        super().__init__(
            examples,
            batch_size,
            buckets=buckets,
            regions=_RegionCache(reader),
            overflow=overflow,
            report=report,
        )


__all__ = ["RelationLoader", "prepare_relations", "CAPTION_MODES"]
