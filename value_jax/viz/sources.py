"""Where the explorer's examples come from: Flickr30k Entities (with VALUE's coreference
targets) or a captions file `image_id<TAB>caption`, over any region-feature file the loaders
read, with the images found by id in a folder."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Optional

import numpy as np

from value_jax.data.errors import DataFormatError
from value_jax.data.flickr30k import Flickr30kEntities, sentence_place
from value_jax.data.loaders import open_features, prepare_coref
from value_jax.data.tokenization import WordPieceTokenizer
from value_jax.viz.compute import ExampleInfo

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


class Regions:
    """`image_id -> (features, normalised boxes)` for the loader, plus pixel boxes, image size
    and labels for the store; one small LRU over the feature reader."""

    def __init__(
        self, reader, object_names: Optional[list[str]] = None, labels=None, size: int = 64
    ):
        self.reader, self.object_names, self.labels = reader, object_names, labels or {}
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.size = size

    def record(self, image_id: str):
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        rec = self.reader[image_id]
        self._cache[image_id] = rec
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return rec

    def __call__(self, image_id: str):
        rec = self.record(image_id)
        return rec.features, rec.normalized_boxes()

    def describe(self, image_id: str, image_path: str):
        """(width, height, pixel boxes [R, 4], labels [R])."""
        rec = self.record(image_id)
        if rec.box_units == "normalized":
            w, h = image_size(image_path) if image_path else (1, 1)
            boxes = rec.boxes * np.array([w, h, w, h], np.float32)
        else:
            w, h, boxes = rec.image_w, rec.image_h, rec.boxes
        labels = [f"r{i}" for i in range(rec.num_boxes)]
        if image_id in self.labels:
            labels = [f"r{i} {n}".strip() for i, n in enumerate(self.labels[image_id])]
        elif self.object_names is not None and rec.object_ids is not None:
            labels = [
                f"r{i} {self.object_names[int(o)]}"
                if 0 <= int(o) < len(self.object_names)
                else f"r{i}"
                for i, o in enumerate(rec.object_ids)
            ]
        return int(w), int(h), np.asarray(boxes, np.float32), labels


def image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def find_image(images_dir: str, image_id: str) -> str:
    """`<dir>/<image_id>.<jpg|png>`, else a file whose stem ends with the id (COCO's
    `COCO_train2014_000000132417.jpg` for id 132417); "" when there is none."""
    if not images_dir:
        return ""
    d = Path(images_dir)
    for suffix in IMAGE_SUFFIXES:
        if (d / f"{image_id}{suffix}").is_file():
            return str(d / f"{image_id}{suffix}")
    want = str(image_id).split("_")[-1].lstrip("0")
    for f in sorted(d.iterdir()):
        if f.suffix in IMAGE_SUFFIXES and f.stem.split("_")[-1].lstrip("0") == want:
            return str(f)
    return ""


def read_object_names(path: str) -> list[str]:
    """VG `objects_vocab.txt`: one class per line, synonyms comma-separated (first shown)."""
    return [
        line.split(",")[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
    ]


def read_captions(path: str) -> list[tuple[str, str]]:
    """`image_id<TAB>caption` lines (blank lines and `#` comments skipped)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise DataFormatError(path, f"line {n}: {line[:60]!r}", "image_id<TAB>caption")
        image_id, caption = line.split("\t", 1)
        out.append((image_id.strip(), caption.strip()))
    return out


def caption_examples(
    captions_path: str,
    regions: Regions,
    tokenizer: WordPieceTokenizer,
    images_dir: str = "",
    max_examples: Optional[int] = None,
    max_text_len: int = 64,
) -> list[ExampleInfo]:
    from value_jax.data import collate as C

    infos = []
    for k, (image_id, caption) in enumerate(read_captions(captions_path)):
        if max_examples and k >= max_examples:
            break
        image = find_image(images_dir, image_id)
        w, h, boxes, labels = regions.describe(image_id, image)
        enc = tokenizer.encode_words(caption.split(), max_text_len)
        ex = C.Example(f"{image_id}:{k}", enc.ids, {}, image_id=image_id, num_regions=len(boxes))
        infos.append(ExampleInfo(ex, caption, image, w, h, boxes, labels))
    return infos


def flickr_examples(
    flickr_root: str,
    regions: Regions,
    tokenizer: WordPieceTokenizer,
    images_dir: str = "",
    split: str = "val",
    max_images: Optional[int] = None,
    seed: int = 0,
) -> list[ExampleInfo]:
    """Flickr30k Entities captions with their coreference targets (`prepare_coref`)."""
    examples = prepare_coref(
        flickr_root, regions.reader, tokenizer, split=split, seed=seed, max_images=max_images
    )
    entities = Flickr30kEntities(flickr_root)
    captions, done = {}, set()
    infos = []
    for ex in examples:
        if ex.image_id not in done:
            done.add(ex.image_id)
            captions.update({sentence_place(s): s.text for s in entities.sentences(ex.image_id)})
        image = find_image(images_dir, ex.image_id)
        w, h, boxes, labels = regions.describe(ex.image_id, image)
        infos.append(ExampleInfo(ex, captions[ex.id], image, w, h, boxes, labels))
    return infos


def open_regions(features: str, objects_vocab: str = "", labels=None) -> Regions:
    names = read_object_names(objects_vocab) if objects_vocab else None
    return Regions(open_features(features), names, labels)


__all__ = [
    "Regions",
    "open_regions",
    "find_image",
    "read_captions",
    "caption_examples",
    "flickr_examples",
    "read_object_names",
]
