"""The ablation's batches: one row per (setting, example), shapes bucketed, targets per direction.

    loader = AblationLoader(data, [Vis4Lang("none"), Vis4Lang("object", 0.5)], batch_size=16,
                            model_type="uniter", head_classes=1601)

`data` comes from `value_jax.data.ablation_data.prepare_ablation`; the settings and what they
ablate or mask are defined there too.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np

from value_jax.batch import Batch
from value_jax.data import collate as C
from value_jax.data.ablation_data import (
    AblationData,
    Lang4Vis,
    Vis4Lang,
    fold_classes,
    masked_text,
    target_region,
)
from value_jax.data.features import NUM_OBJECT_CLASSES
from value_jax.data.flickr30k import PHRASE_TYPES
from value_jax.models.configs import CONFIGS


class AblationLoader:
    """`(Batch, targets)` batches for a list of settings of ONE kind (all Vis4Lang or all
    Lang4Vis), shapes bucketed (text length, regions) and batches padded to `batch_size`.

    Targets, `[B]` unless noted (padding rows: valid False, setting -1):
      common     setting (index into `settings`), type (PHRASE_TYPES index), valid, label_match,
                 example_index
      Vis4Lang   labels / label_mask [B, T] (original ids at the phrase, True there), num_ablated
      Lang4Vis   target_region, target_object (0-based foreground class of the head), target_conf,
                 target_probs [B, head_classes] (1601-way heads only) and has_probs, num_masked

    `head_classes` is the size of the model's region-classification head: 1601 (UNITER `mrc`,
    background at 0) or 1600 (LXMERT `obj`). A smaller head (the demo) needs `fold=True`.
    """

    def __init__(
        self,
        data: AblationData,
        settings: Sequence[Union[Vis4Lang, Lang4Vis]],
        batch_size: int,
        model_type: str,
        *,
        head_classes: Optional[int] = None,
        fold: bool = False,
        buckets: C.Buckets = C.DEFAULT_BUCKETS,
    ):
        kinds = {type(s) for s in settings}
        if len(kinds) != 1:
            raise ValueError(
                f"one loader takes settings of one kind, got {sorted(k.__name__ for k in kinds)}"
            )
        self.data, self.settings, self.batch_size = data, list(settings), batch_size
        self.model_type, self.buckets = model_type, buckets
        self.vision = kinds.pop() is Vis4Lang
        self.head_classes = head_classes
        if not self.vision:
            background = CONFIGS[model_type].mrc_background
            if head_classes is None:
                raise ValueError(
                    "Lang4Vis needs head_classes (the model's region-classification head size)"
                )
            self.num_foreground = head_classes - int(background)
            self.background = background
            if self.num_foreground != NUM_OBJECT_CLASSES and not fold:
                raise ValueError(
                    f"the {model_type} head has {self.num_foreground} foreground classes, "
                    f"the detector {NUM_OBJECT_CLASSES}; pass fold=True only for a demo model"
                )
        rows = []
        for s_idx, setting in enumerate(self.settings):
            for e_idx, ex in enumerate(data.examples):
                if not self.vision:
                    if ex.regions.object_ids is None:
                        raise ValueError(
                            f"image {ex.image_id}: the features hold no object ids "
                            "(objects_id / cls_prob), needed for MRC targets"
                        )
                    if not setting.masked(ex).any():
                        if s_idx == 0:
                            data.report.count("lang4vis_no_region_masked", example=ex.id)
                        continue
                rows.append((s_idx, e_idx))
        if not self.vision:
            data.report.count("lang4vis_no_region_masked", 0)
        groups: dict[tuple, list] = {}
        for s_idx, e_idx in rows:
            ex = data.examples[e_idx]
            shape = (
                C.Buckets.smallest(buckets.text, len(ex.input_ids)),
                C.Buckets.smallest(buckets.regions, ex.regions.num_regions),
            )
            if None in shape:
                raise ValueError(
                    f"example {ex.id}: {len(ex.input_ids)} ids / {ex.regions.num_regions} "
                    f"regions exceed the largest bucket {buckets.text[-1]} / "
                    f"{buckets.regions[-1]}"
                )
            groups.setdefault(shape, []).append((s_idx, e_idx))
        self.plans = [
            (shape, members[i : i + batch_size])
            for shape, members in sorted(groups.items())
            for i in range(0, len(members), batch_size)
        ]

    def __len__(self) -> int:
        return len(self.plans)

    def unmasked_counts(self, types: Sequence[str] = PHRASE_TYPES) -> dict:
        """Lang4Vis: per setting, the examples left out because no region is masked, as
        `{"count": [S][len(types)] per entity type, "label_match": [S] LabelMatch examples}`."""
        if self.vision:
            raise ValueError(
                "unmasked_counts is for Lang4Vis settings (vision-for-language "
                "ablates, it masks no region)"
            )
        count = np.zeros((len(self.settings), len(types)), np.int64)
        label_match = np.zeros(len(self.settings), np.int64)
        for s_idx, setting in enumerate(self.settings):
            for ex in self.data.examples:
                if not setting.masked(ex).any():
                    count[s_idx, list(types).index(ex.entity_type)] += 1
                    label_match[s_idx] += ex.label_match
        return {"count": count.tolist(), "label_match": label_match.tolist()}

    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        for shape, members in self.plans:
            yield self.collate(shape, members)

    def collate(self, shape: tuple[int, int], members) -> tuple[Batch, dict]:
        b, (t, r) = self.batch_size, shape
        f = len(self.data.mean_feature)
        ids = np.full((b, t), self.data.pad_id, np.int32)
        text_mask = np.zeros((b, t), np.int32)
        feats = np.zeros((b, r, f), np.float32)
        boxes = np.zeros((b, r, 4), np.float32)
        region_mask = np.zeros((b, r), np.int32)
        region_masked = np.zeros((b, r), np.int32)
        tg = {
            "setting": np.full(b, -1, np.int32),
            "type": np.zeros(b, np.int32),
            "valid": np.zeros(b, bool),
            "label_match": np.zeros(b, bool),
            C.EXAMPLE_INDEX: np.full(b, -1, np.int32),
        }
        if self.vision:
            tg.update(
                labels=np.zeros((b, t), np.int32),
                label_mask=np.zeros((b, t), bool),
                num_ablated=np.zeros(b, np.float32),
            )
        else:
            n_probs = self.head_classes if self.background else 1
            tg.update(
                target_region=np.zeros(b, np.int32),
                target_object=np.zeros(b, np.int32),
                target_conf=np.zeros(b, np.float32),
                has_probs=np.zeros(b, bool),
                target_probs=np.zeros((b, n_probs), np.float32),
                num_masked=np.zeros(b, np.float32),
            )
        for i, (s_idx, e_idx) in enumerate(members):
            ex, setting = self.data.examples[e_idx], self.settings[s_idx]
            reg = ex.regions
            row_feats = reg.features.copy()
            tg["setting"][i], tg["type"][i], tg["valid"][i] = s_idx, ex.type_id, True
            tg["label_match"][i], tg[C.EXAMPLE_INDEX][i] = ex.label_match, e_idx
            if self.vision:
                text = masked_text(ex, "phrase", self.data.mask_id)
                ablate = setting.ablated(ex)
                row_feats[ablate] = self.data.mean_feature
                tg["labels"][i, ex.span[0] : ex.span[1]] = ex.input_ids[ex.span[0] : ex.span[1]]
                tg["label_mask"][i, ex.span[0] : ex.span[1]] = True
                tg["num_ablated"][i] = ablate.sum()
            else:
                text = masked_text(ex, setting.text, self.data.mask_id)
                masked = setting.masked(ex)
                row_feats[masked] = 0.0
                if CONFIGS[self.model_type].region_mask_embedding:
                    region_masked[i, : reg.num_regions] = masked
                k = target_region(ex, masked)
                probs = reg.cls_prob[k] if (self.background and reg.cls_prob is not None) else None
                probs, obj = fold_classes(probs, int(reg.object_ids[k]), self.num_foreground)
                tg["target_region"][i], tg["target_object"][i] = k, obj
                tg["target_conf"][i] = reg.object_conf[k] if reg.object_conf is not None else 1.0
                tg["num_masked"][i] = masked.sum()
                if probs is not None:
                    tg["target_probs"][i], tg["has_probs"][i] = probs, True
            ids[i], text_mask[i] = C.pad_text(text, t, self.data.pad_id)
            feats[i], boxes[i], region_mask[i] = C.pad_regions(row_feats, reg.normalized_boxes, r)
        return Batch.create(ids, text_mask, feats, boxes, region_mask, region_masked), tg
