"""The built-in demo dataset: small, deterministic, in the REAL file formats, consistent across
files, so every experiment runs end to end on CPU in seconds without any download.

    demo = make_demo_data("out/demo/data", seed=0, feat_dim=32)
    CorefLoader(demo.flickr_root, demo.flickr_features_tsv, demo.vocab_uncased, lowercase=True)

What it writes under `root`:
  flickr30k/             Flickr30k Entities: Sentences/, Annotations/, train/val/test.txt,
                         UNRELATED_CAPTIONS (`fixtures.annotations.write_flickr30k`)
  flickr30k_obj36.tsv    LXMERT TSV, 36 regions per image: a jittered copy of every gold box
                         (IoU with it well above 0.5, so IoU alignment finds the links) and random
                         boxes, in a seeded order
  flickr30k_npz/         the same regions as UNITER npz files (`flickr30k_<id>.npz`, float16)
  flickr30k_gold.tsv     the same 36 regions plus every gold box exactly (VALUE adds gold boxes
                         to the detections: `region_source="gold_in_features"`)
  visual_genome/         VG v1.2 JSON (`write_visual_genome`) and vg_obj36.tsv, built the same way
                         from the object boxes
  senteval/<task>.txt    SentEval probing files with tr/va/te splits
  vocab_cased.txt, vocab_uncased.txt   BERT vocabularies covering every generated word
                         (UNITER is cased, LXMERT uncased)

`make_explore_demo(root, model_type)` builds the explorer's demo: the planted-structure data
and checkpoint of `value_jax.testing.planted` (a coreference head that sends each key word to the
regions of its phrase) plus one PNG per image drawn from the features' boxes, so that an
attention overlay visibly lands on the object its word names (`draw_box_images`).

Built once: `DEMO.json` holds the parameters, and a call with other parameters (or an unreadable
marker) rebuilds the tree in a temporary directory that replaces `root` in one rename. A
non-empty `root` without a marker is not a demo tree and is never replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

from value_jax.data.errors import PathLike
from value_jax.data.fixtures.annotations import (
    write_flickr30k,
    write_senteval,
    write_visual_genome,
    write_vocab,
)
from value_jax.data.fixtures.features import (
    iter_random_records,
    write_lxmert_tsv,
    write_uniter_npz_dir,
)

MARKER = "DEMO.json"
# Bump when the generated content changes, so cached demo trees are rebuilt.
_FORMAT_VERSION = 1
SENTEVAL_TASKS = ("bigram_shift", "past_present", "subj_number", "tree_depth")


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Every file of the demo dataset (absolute paths) and the parameters that made it."""

    root: str
    flickr_root: str
    flickr_features_tsv: str
    flickr_features_npz: str
    flickr_features_gold_tsv: str
    vg_root: str
    vg_features_tsv: str
    senteval_dir: str
    senteval_tasks: tuple[str, ...]
    vocab_cased: str
    vocab_uncased: str
    feat_dim: int
    num_boxes: int
    seed: int

    @property
    def flickr_features(self) -> str:
        return self.flickr_features_tsv

    @property
    def vg_features(self) -> str:
        return self.vg_features_tsv


def _paths(root: Path, params: dict) -> DemoPaths:
    return DemoPaths(
        root=str(root),
        flickr_root=str(root / "flickr30k"),
        flickr_features_tsv=str(root / "flickr30k_obj36.tsv"),
        flickr_features_npz=str(root / "flickr30k_npz"),
        flickr_features_gold_tsv=str(root / "flickr30k_gold.tsv"),
        vg_root=str(root / "visual_genome"),
        vg_features_tsv=str(root / "visual_genome" / "vg_obj36.tsv"),
        senteval_dir=str(root / "senteval"),
        senteval_tasks=tuple(params["senteval_tasks"]),
        vocab_cased=str(root / "vocab_cased.txt"),
        vocab_uncased=str(root / "vocab_uncased.txt"),
        feat_dim=params["feat_dim"],
        num_boxes=params["num_boxes"],
        seed=params["seed"],
    )


def detections(
    gold: np.ndarray, width: int, height: int, num_boxes: int, rng: np.random.Generator
) -> np.ndarray:
    """`[num_boxes, 4]` float32 pixel boxes: each gold box with every side moved by at most 5% of
    its size (IoU with the gold box > 0.7), then random boxes, in a random order."""
    gold = np.asarray(gold, np.float64).reshape(-1, 4)
    if len(gold) > num_boxes:
        raise ValueError(f"{len(gold)} gold boxes do not fit {num_boxes} detections")
    size = np.concatenate([gold[:, 2:] - gold[:, :2]] * 2, axis=1)
    jittered = gold + rng.uniform(-0.05, 0.05, gold.shape) * size
    n_rand = num_boxes - len(gold)
    x1 = rng.uniform(0, width * 0.7, n_rand)
    y1 = rng.uniform(0, height * 0.7, n_rand)
    x2 = x1 + rng.uniform(16, width * 0.6, n_rand)
    y2 = y1 + rng.uniform(16, height * 0.6, n_rand)
    boxes = np.concatenate([jittered, np.stack([x1, y1, x2, y2], axis=1)])
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width - 1)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height - 1)
    return boxes[rng.permutation(len(boxes))].astype(np.float32)


def _unique_boxes(boxes_by_chain: dict) -> np.ndarray:
    seen = []
    for chain in sorted(boxes_by_chain):
        for b in boxes_by_chain[chain]:
            if list(b) not in seen:
                seen.append(list(b))
    return np.asarray(seen, np.float64).reshape(-1, 4)


def _build(root: Path, params: dict) -> None:
    seed, feat_dim, num_boxes = params["seed"], params["feat_dim"], params["num_boxes"]
    flickr = write_flickr30k(root / "flickr30k", n_images=params["n_images"], seed=seed)
    rng = np.random.default_rng([seed, 1])
    ids, sizes, boxes, gold_boxes = [], [], [], []
    for image_id in flickr.image_ids:
        ann = flickr.annotations[image_id]
        gold = _unique_boxes(ann.boxes)
        det = detections(gold, ann.width, ann.height, num_boxes, rng)
        ids.append(image_id)
        sizes.append((ann.width, ann.height))
        boxes.append(det)
        gold_boxes.append(np.concatenate([det, gold.astype(np.float32)]))

    def records(box_list):
        return iter_random_records(
            len(ids), seed=seed, image_sizes=sizes, boxes=box_list, feat_dim=feat_dim, image_ids=ids
        )

    write_lxmert_tsv(root / "flickr30k_obj36.tsv", records(boxes))
    write_uniter_npz_dir(root / "flickr30k_npz", records(boxes), prefix="flickr30k_")
    write_lxmert_tsv(root / "flickr30k_gold.tsv", records(gold_boxes))

    vg = write_visual_genome(root / "visual_genome", n_images=params["n_vg_images"], seed=seed)
    vg_ids, vg_sizes, vg_boxes = [], [], []
    for image_id, info in vg.images.items():
        obj = np.asarray([o.box_xyxy for o in vg.objects[image_id]], np.float64)
        vg_ids.append(str(image_id))
        vg_sizes.append((info.width, info.height))
        vg_boxes.append(detections(obj, info.width, info.height, num_boxes, rng))
    write_lxmert_tsv(
        root / "visual_genome" / "vg_obj36.tsv",
        iter_random_records(
            len(vg_ids),
            seed=seed + 1,
            image_sizes=vg_sizes,
            boxes=vg_boxes,
            feat_dim=feat_dim,
            image_ids=vg_ids,
        ),
    )

    rows = write_senteval(
        root / "senteval",
        tasks=params["senteval_tasks"],
        n_per_split=params["n_senteval"],
        seed=seed,
    )
    words = set(flickr.words)
    for regions in vg.regions.values():
        for r in regions:
            words.update(r.phrase.split())
    for objs in vg.objects.values():
        for o in objs:
            words.update(o.names)
    for task_rows in rows.values():
        for _, _, tokens in task_rows:
            words.update(tokens)
    write_vocab(root / "vocab_cased.txt", sorted(words), cased=True)
    write_vocab(root / "vocab_uncased.txt", sorted(words), cased=False)
    (root / MARKER).write_text(
        json.dumps(params, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _read_marker(root: Path):
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def make_demo_data(
    root: PathLike,
    seed: int = 0,
    n_images: int = 12,
    feat_dim: int = 2048,
    *,
    n_vg_images: int = 8,
    n_senteval: int = 60,
    num_boxes: int = 36,
    senteval_tasks=SENTEVAL_TASKS,
) -> DemoPaths:
    """Builds (or reuses) the demo dataset under `root` and returns its paths.

    Args:
      n_images: Flickr30k Entities images (split round-robin into train / val / test).
      feat_dim: region feature width; the demo models are tiny (24..64), the real BUTD one 2048.
      n_vg_images: Visual Genome images. n_senteval: sentences per SentEval split and task.
      num_boxes: detected regions per image (the gold file adds the gold boxes to them).
    """
    root = Path(root).absolute()
    params = {
        "version": _FORMAT_VERSION,
        "seed": int(seed),
        "n_images": int(n_images),
        "feat_dim": int(feat_dim),
        "n_vg_images": int(n_vg_images),
        "n_senteval": int(n_senteval),
        "num_boxes": int(num_boxes),
        "senteval_tasks": list(senteval_tasks),
    }
    marker = _read_marker(root)
    if marker == params:
        return _paths(root, params)
    if root.exists() and not (root / MARKER).exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists and holds no demo dataset ({MARKER} missing); "
            "refusing to replace it: pass an empty or new directory"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    # Not `value_jax.io.replace_dir`: that one moves the old tree to a fixed `<root>.old` and
    # fails when another process has just put a tree in place; here each builder moves aside to
    # its own temporary name and keeps a concurrent builder's tree when it holds the same demo.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _build(tmp, params)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "tree")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process put a tree there first; keep it if it is the one asked for.
            if _read_marker(root) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root, params)


# ---- the explorer's demo: planted heads and images drawn from the boxes ----------------------

_PALETTE = (
    (230, 97, 1),
    (94, 60, 153),
    (27, 158, 119),
    (217, 95, 2),
    (117, 112, 179),
    (231, 41, 138),
    (102, 166, 30),
    (166, 118, 29),
    (31, 120, 180),
    (227, 26, 28),
)


def draw_box_images(records, labels: dict, out_dir: PathLike, seed: int = 0) -> dict[str, str]:
    """One PNG per region record, `<image_id>.png` at the record's pixel size: a textured
    background and, for every region with a label, a filled box of its own colour exactly at its
    pixel coordinates with the label written inside (largest boxes first, so small ones stay
    visible). `labels[image_id][r]` is region r's label ("" draws nothing). Returns
    {image_id: path}."""
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for rec in records:
        rng = np.random.default_rng([seed, zlib.crc32(rec.image_id.encode())])
        w, h = int(rec.image_w), int(rec.image_h)
        base = np.linspace(235, 200, h)[:, None, None] + rng.normal(0, 4, (h, w, 1))
        img = Image.fromarray(np.clip(np.repeat(base, 3, axis=2), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img, "RGBA")
        names = labels.get(rec.image_id, [])
        boxes = np.asarray(rec.boxes, np.float64)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        colour_of: dict[str, tuple] = {}
        for r in np.argsort(-area, kind="stable"):
            name = names[r] if r < len(names) else ""
            if not name:
                continue
            colour = colour_of.setdefault(name, _PALETTE[len(colour_of) % len(_PALETTE)])
            x1, y1, x2, y2 = boxes[r]
            draw.rectangle([x1, y1, x2, y2], fill=colour + (150,), outline=colour + (255,), width=3)
            draw.text((x1 + 4, y1 + 3), name, fill=(0, 0, 0, 255))
        path = out / f"{rec.image_id}.png"
        img.save(path)
        paths[rec.image_id] = str(path)
    return paths


@dataclasses.dataclass(frozen=True)
class ExploreDemo:
    """The explorer's demo: planted Flickr30k data, images, a planted checkpoint."""

    flickr_root: str
    features: str
    vocab: str
    lowercase: bool
    images: str
    checkpoint: str
    region_labels: dict  # image id -> one label per region ("" for background boxes)


def make_explore_demo(root: PathLike, model_type: str, n_images: int = 12) -> ExploreDemo:
    """Planted data + images + checkpoint under `root` (rebuilt each call: seconds).

    The planted heads (`planted.uniter_coref` / `lxmert_coref`, default positions): UNITER
    layer 3 head 2 and LXMERT `cross1.l2v` head 2 send each key word (e.g. "dog") to the regions
    of its phrase; UNITER layer 2 head 3 and LXMERT `cross2.v2l` head 3 send each region to its
    phrase's words. Region labels are the key words linked to each region."""
    from value_jax.data.features import LxmertTsvReader
    from value_jax.testing import planted as P

    root = Path(root).absolute()
    data = P.write_planted_flickr(root / "data", n_images=n_images)
    builder = P.uniter_coref if model_type == "uniter" else P.lxmert_coref
    config, params = builder(data)
    ckpt = P.save_checkpoint(root / "checkpoints" / model_type, config, params)
    # A region linked to a phrase keys all of the phrase's own words: its two longest name it.
    labels = {
        i: [" ".join(sorted(sorted(s), key=len, reverse=True)[:2]) for s in sets]
        for i, sets in data.region_keys.items()
    }
    with LxmertTsvReader(data.features) as reader:
        records = [reader[i] for i in reader.image_ids()]
    images = root / "images"
    draw_box_images(records, labels, images)
    lower = config.lowercase
    return ExploreDemo(
        data.flickr_root,
        data.features,
        data.vocab_uncased if lower else data.vocab_cased,
        lower,
        str(images),
        ckpt,
        labels,
    )


__all__ = [
    "DemoPaths",
    "make_demo_data",
    "detections",
    "SENTEVAL_TASKS",
    "draw_box_images",
    "ExploreDemo",
    "make_explore_demo",
]
