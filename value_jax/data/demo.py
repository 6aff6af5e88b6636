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
from pathlib import Path

import numpy as np

from value_jax.data.errors import PathLike
from value_jax.data.fixtures.annotations import (write_flickr30k, write_senteval, write_visual_genome,
                                                write_vocab)
from value_jax.data.fixtures.features import iter_random_records, write_lxmert_tsv, write_uniter_npz_dir

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
        root=str(root), flickr_root=str(root / "flickr30k"),
        flickr_features_tsv=str(root / "flickr30k_obj36.tsv"),
        flickr_features_npz=str(root / "flickr30k_npz"),
        flickr_features_gold_tsv=str(root / "flickr30k_gold.tsv"),
        vg_root=str(root / "visual_genome"), vg_features_tsv=str(root / "visual_genome" / "vg_obj36.tsv"),
        senteval_dir=str(root / "senteval"), senteval_tasks=tuple(params["senteval_tasks"]),
        vocab_cased=str(root / "vocab_cased.txt"), vocab_uncased=str(root / "vocab_uncased.txt"),
        feat_dim=params["feat_dim"], num_boxes=params["num_boxes"], seed=params["seed"])


def detections(gold: np.ndarray, width: int, height: int, num_boxes: int,
               rng: np.random.Generator) -> np.ndarray:
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
        return iter_random_records(len(ids), seed=seed, image_sizes=sizes, boxes=box_list,
                                   feat_dim=feat_dim, image_ids=ids)

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
    write_lxmert_tsv(root / "visual_genome" / "vg_obj36.tsv",
                     iter_random_records(len(vg_ids), seed=seed + 1, image_sizes=vg_sizes, boxes=vg_boxes,
                                         feat_dim=feat_dim, image_ids=vg_ids))

    rows = write_senteval(root / "senteval", tasks=params["senteval_tasks"],
                          n_per_split=params["n_senteval"], seed=seed)
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
    (root / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_marker(root: Path):
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def make_demo_data(root: PathLike, seed: int = 0, n_images: int = 12, feat_dim: int = 2048, *,
                   n_vg_images: int = 8, n_senteval: int = 60, num_boxes: int = 36,
                   senteval_tasks=SENTEVAL_TASKS) -> DemoPaths:
    """Builds (or reuses) the demo dataset under `root` and returns its paths.

    Args:
      n_images: Flickr30k Entities images (split round-robin into train / val / test).
      feat_dim: region feature width; the demo models are tiny (24..64), the real BUTD one 2048.
      n_vg_images: Visual Genome images. n_senteval: sentences per SentEval split and task.
      num_boxes: detected regions per image (the gold file adds the gold boxes to them).
    """
    root = Path(root).absolute()
    params = {"version": _FORMAT_VERSION, "seed": int(seed), "n_images": int(n_images),
              "feat_dim": int(feat_dim), "n_vg_images": int(n_vg_images), "n_senteval": int(n_senteval),
              "num_boxes": int(num_boxes), "senteval_tasks": list(senteval_tasks)}
    marker = _read_marker(root)
    if marker == params:
        return _paths(root, params)
    if root.exists() and not (root / MARKER).exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and holds no demo dataset ({MARKER} missing); "
                              "refusing to replace it: pass an empty or new directory")
    root.parent.mkdir(parents=True, exist_ok=True)
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


__all__ = ["DemoPaths", "make_demo_data", "detections", "SENTEVAL_TASKS"]
