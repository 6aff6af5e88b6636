"""TFDS builders for the PREPARED coreference and relation examples, in array_record format:
they build and read back without TensorFlow.

    builder = ValueCoref(config="lxmert", data_dir=DATA_DIR)   # array_record by default
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL))
    source = builder.as_data_source("val")                # random access, numpy dicts
    loader = prepared_loader(builder, "val", batch_size=8)  # the same batches CorefLoader gives

One record per caption (coreference) or per image (relations), produced by the same
`loaders.prepare_coref` / `relation_loader.prepare_relations` the loaders use, plus the image's region features
and normalised boxes: ids, text ids, regions and the target arrays before batching. TFDS shuffles
records at write time, so each keeps its `id` and its `index` in the loader's order;
`read_examples` restores that order. The type / predicate names and the preparation's
`DataReport` are in `builder.info.metadata`.

Paths in a config are relative to `manual_dir` (see `MANUAL_DOWNLOAD_INSTRUCTIONS`) unless
absolute. Records never hold empty 2-D arrays: TFDS 4.9 decodes an empty multi-dimensional
tensor to the wrong shape, and every record has >= 1 item and >= 1 token slot.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from value_jax.data import collate as C
from value_jax.data import loaders as L
from value_jax.data.errors import DataReport
from value_jax.data.flickr30k import PHRASE_TYPES
from value_jax.data.relation_loader import prepare_relations
from value_jax.data.tokenization import WordPieceTokenizer

_COMMON_INSTRUCTIONS = """
Region features: any format `value_jax.data.features.open_region_features` reads (LXMERT TSV
file, UNITER npz directory or LMDB, VOLTA LMDB), for the same images, BUTD boxes in pixels (or
UNITER's normalised boxes). Vocabulary: the BERT `vocab.txt` of the model to probe
(bert-base-cased for UNITER with lowercase=False, bert-base-uncased for LXMERT with
lowercase=True). Paths in the builder config are relative to manual_dir unless absolute.
"""


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _resolve(dl_manager, path: str) -> str:
    return path if os.path.isabs(path) else os.fspath(dl_manager.manual_dir / path)


def _tensor(rank: int, dtype, width: Optional[int] = None):
    if rank == 1:
        return tfds.features.Tensor(shape=(None,), dtype=dtype)
    if width is not None:
        return tfds.features.Tensor(shape=(None, width), dtype=dtype)
    # Two unknown dimensions need a byte encoding in TFDS.
    return tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding="bytes")


def _features(analysis: str) -> tfds.features.FeaturesDict:
    spec = {
        "id": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int64),
        "image_id": tfds.features.Text(),
        "input_ids": _tensor(1, np.int32),
        "region_feats": _tensor(2, np.float32),
        "region_boxes": _tensor(2, np.float32, width=4),
    }
    for name, t in C.TARGETS.items():
        if name.startswith(analysis + "."):
            spec[name] = _tensor(len(t.axes), t.dtype)
    return tfds.features.FeaturesDict(spec)


def _record(ex: C.Example, index: int, reader) -> dict:
    rec = reader[ex.image_id]
    feats, boxes = rec.features, rec.normalized_boxes()
    if len(feats) != ex.num_regions or len(feats) == 0:
        raise ValueError(
            f"example {ex.id!r}: {len(feats)} regions in the features, {ex.num_regions} prepared"
        )
    out = {
        "id": ex.id,
        "index": index,
        "image_id": ex.image_id,
        "input_ids": ex.input_ids,
        "region_feats": feats.astype(np.float32),
        "region_boxes": boxes.astype(np.float32),
    }
    out.update(ex.targets)
    return out


def read_examples(builder: tfds.core.DatasetBuilder, split: str) -> list[C.Example]:
    """Every record of `split` as an `Example` carrying its regions, in the loader's order."""
    source = builder.as_data_source(split)
    rows = sorted((source[i] for i in range(len(source))), key=lambda r: int(r["index"]))
    out = []
    for r in rows:
        targets = {k: np.asarray(v) for k, v in r.items() if k in C.TARGETS}
        out.append(
            C.Example(
                _text(r["id"]),
                np.asarray(r["input_ids"]),
                targets,
                image_id=_text(r["image_id"]),
                region_feats=np.asarray(r["region_feats"]),
                region_boxes=np.asarray(r["region_boxes"]),
            )
        )
    return out


def prepared_loader(
    builder: tfds.core.DatasetBuilder, split: str, batch_size: int, lazy: bool = False, **kwargs
) -> L.ExampleLoader:
    """Batches of the prepared records (`kwargs` go to `ExampleLoader`: buckets, overflow).

    `lazy`: region features stay in the records and are read when a batch is collated (only
    that batch's records), so memory does not grow with the dataset; the loader's `report` is
    the one stored at preparation."""
    if not lazy:
        return L.ExampleLoader(read_examples(builder, split), batch_size, **kwargs)
    source = builder.as_data_source(split)
    light, first_record = [], {}
    for i in range(len(source)):
        r = source[i]
        image_id = _text(r["image_id"])
        first_record.setdefault(image_id, i)
        targets = {k: np.asarray(v) for k, v in r.items() if k in C.TARGETS}
        light.append(
            (
                int(r["index"]),
                C.Example(
                    _text(r["id"]),
                    np.asarray(r["input_ids"]),
                    targets,
                    image_id=image_id,
                    num_regions=len(r["region_feats"]),
                ),
            )
        )
    examples = [e for _, e in sorted(light, key=lambda p: p[0])]

    @functools.lru_cache(maxsize=64)
    def regions(image_id: str):
        r = source[first_record[image_id]]
        return np.asarray(r["region_feats"], np.float32), np.asarray(r["region_boxes"], np.float32)

    report = DataReport.from_dict(builder.info.metadata.get("report", {}).get(split, {}))
    return L.ExampleLoader(examples, batch_size, regions=regions, report=report, **kwargs)


def prepared_with(config: tfds.core.BuilderConfig) -> dict:
    """The preparation settings of a builder config (its fields but name/description/paths)."""
    skip = {
        "name",
        "description",
        "version",
        "release_notes",
        "supported_versions",
        "tags",
        "flickr_root",
        "vg_root",
        "features",
        "vocab",
    }
    return {
        f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v)
        for f in dataclasses.fields(config)
        if f.name not in skip
    }


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared plumbing: array_record unless another `file_format` is asked for, and `code_path`
    pinned to this file (TFDS 4.9's own lookup imports `importlib_resources`, which it declares
    only for Python < 3.9, so it fails on a plain install)."""

    pkg_dir_path = epath.Path(__file__).parent

    def __init__(self, *, file_format=None, **kwargs):
        # array_record is the format that builds and reads without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


@dataclasses.dataclass(eq=False)
class CorefConfig(tfds.core.BuilderConfig):
    """`loaders.prepare_coref` arguments; paths relative to manual_dir unless absolute."""

    flickr_root: str = "flickr30k_entities"
    features: str = "flickr30k_features.tsv"
    vocab: str = "vocab.txt"
    lowercase: bool = False
    splits: tuple = ("val",)
    region_source: str = "iou"
    iou_threshold: float = 0.5
    max_text_len: int = 64
    max_images: Optional[int] = None
    negative_ratio: float = 1.0
    seed: int = 0


class ValueCoref(_Builder):
    """VALUE §3.3 visual-coreference examples from Flickr30k Entities, one record per caption."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prepared coref.* targets with region features and boxes."}
    BUILDER_CONFIGS = [
        CorefConfig(
            name="uniter",
            vocab="bert-base-cased-vocab.txt",
            lowercase=False,
            description="Cased word pieces (UNITER).",
        ),
        CorefConfig(
            name="lxmert",
            vocab="bert-base-uncased-vocab.txt",
            lowercase=True,
            description="Uncased word pieces (LXMERT).",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        """
Place in manual_dir (names as in the builder config; defaults shown):
  flickr30k_entities/       the Flickr30k Entities release: Sentences/<id>.txt,
                            Annotations/<id>.xml and the split files train.txt / val.txt / test.txt
                            (github.com/BryanPlummer/flickr30k_entities, annotations.zip)
  flickr30k_features.tsv    region features of the Flickr30k images
  bert-base-cased-vocab.txt / bert-base-uncased-vocab.txt   the model's WordPiece vocabulary
"""
        + _COMMON_INSTRUCTIONS
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Prepared VALUE coreference examples: [CLS] caption [SEP] word-piece ids, "
            "the image's regions and per-link targets (coref.*).",
            features=_features("coref"),
            metadata=tfds.core.MetadataDict(),
            homepage=None,
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        paths = {
            k: _resolve(dl_manager, getattr(cfg, k)) for k in ("flickr_root", "features", "vocab")
        }
        return {split: self._generate_examples(split=split, **paths) for split in cfg.splits}

    def _generate_examples(self, split, flickr_root, features, vocab):
        cfg = self.builder_config
        report = DataReport()
        with L.open_features(features) as reader:
            examples = L.prepare_coref(
                flickr_root,
                reader,
                WordPieceTokenizer(vocab, cfg.lowercase),
                split=split,
                seed=cfg.seed,
                region_source=cfg.region_source,
                iou_threshold=cfg.iou_threshold,
                max_text_len=cfg.max_text_len,
                max_images=cfg.max_images,
                negative_ratio=cfg.negative_ratio,
                report=report,
            )
            self.info.metadata["types"] = list(PHRASE_TYPES)
            self.info.metadata["prepared_with"] = prepared_with(cfg)
            self.info.metadata.setdefault("report", {})[split] = report.to_dict()
            for index, ex in enumerate(examples):
                yield ex.id, _record(ex, index, reader)


@dataclasses.dataclass(eq=False)
class RelationConfig(tfds.core.BuilderConfig):
    """`relation_loader.prepare_relations` arguments; paths relative to manual_dir unless absolute."""

    vg_root: str = "visual_genome"
    features: str = "vg_features.tsv"
    vocab: str = "vocab.txt"
    lowercase: bool = False
    num_predicates: int = 32
    max_pairs_per_predicate: int = 15000
    max_same_type_per_image: int = 5
    iou_threshold: float = 0.5
    captions: str = "region"
    max_text_len: int = 64
    max_images: Optional[int] = None
    negative_ratio: float = 1.0
    seed: int = 0


class ValueRelations(_Builder):
    """VALUE §3.4 visual-relation examples from Visual Genome, one record per image (split
    `full`: the relation sample is one set; probers split it themselves)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prepared rel.* targets with region features and boxes."}
    SPLIT = "full"
    BUILDER_CONFIGS = [
        RelationConfig(
            name="uniter",
            vocab="bert-base-cased-vocab.txt",
            lowercase=False,
            description="Dense captions, cased word pieces (UNITER).",
        ),
        RelationConfig(
            name="lxmert",
            vocab="bert-base-uncased-vocab.txt",
            lowercase=True,
            description="Dense captions, uncased word pieces (LXMERT).",
        ),
        RelationConfig(
            name="uniter_mismatched",
            vocab="bert-base-cased-vocab.txt",
            lowercase=False,
            captions="mismatched",
            description="Mismatched-caption baseline (UNITER).",
        ),
        RelationConfig(
            name="lxmert_mismatched",
            vocab="bert-base-uncased-vocab.txt",
            lowercase=True,
            captions="mismatched",
            description="Mismatched-caption baseline (LXMERT).",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        """
Place in manual_dir (names as in the builder config; defaults shown):
  visual_genome/            Visual Genome v1.2 (or v1.0) JSON: image_data.json,
                            relationships.json, region_descriptions.json (dense captions)
  vg_features.tsv           region features of the Visual Genome images (ids = VG image ids)
  bert-base-cased-vocab.txt / bert-base-uncased-vocab.txt   the model's WordPiece vocabulary
"""
        + _COMMON_INSTRUCTIONS
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Prepared VALUE relation examples: a caption's word-piece ids, the image's "
            "regions and per-pair targets (rel.*).",
            features=_features("rel"),
            metadata=tfds.core.MetadataDict(),
            homepage=None,
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        paths = {k: _resolve(dl_manager, getattr(cfg, k)) for k in ("vg_root", "features", "vocab")}
        return {self.SPLIT: self._generate_examples(**paths)}

    def _generate_examples(self, vg_root, features, vocab):
        cfg = self.builder_config
        report = DataReport()
        with L.open_features(features) as reader:
            examples, predicates = prepare_relations(
                vg_root,
                reader,
                WordPieceTokenizer(vocab, cfg.lowercase),
                seed=cfg.seed,
                num_predicates=cfg.num_predicates,
                max_pairs_per_predicate=cfg.max_pairs_per_predicate,
                max_same_type_per_image=cfg.max_same_type_per_image,
                iou_threshold=cfg.iou_threshold,
                captions=cfg.captions,
                max_text_len=cfg.max_text_len,
                max_images=cfg.max_images,
                negative_ratio=cfg.negative_ratio,
                report=report,
            )
            self.info.metadata["predicates"] = list(predicates)
            self.info.metadata["prepared_with"] = prepared_with(cfg)
            self.info.metadata.setdefault("report", {})[self.SPLIT] = report.to_dict()
            for index, ex in enumerate(examples):
                yield ex.id, _record(ex, index, reader)


__all__ = [
    "ValueCoref",
    "ValueRelations",
    "CorefConfig",
    "RelationConfig",
    "read_examples",
    "prepared_loader",
    "prepared_with",
]
