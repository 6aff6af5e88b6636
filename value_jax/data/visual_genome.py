"""Visual Genome JSON readers (v1.2 and v1.0 schemas) and VALUE's relation-pair sampling.

Accepted schemas (one list entry per image in every file):
  * image id: `image_id` (v1.2) or `id` (v1.0, and `region_descriptions.json` in every version);
  * object id: `object_id` (v1.2) or `id` (v1.0); relationship id: `relationship_id` or `id`;
  * object name: `names` (list, objects.json, v1.2 attributes.json and some relationship
    versions), `object_names` (list, v1.0 attributes.json) or `name` (str); optional `synsets`,
    `attributes`, `merged_object_ids`;
  * boxes: `x, y, w, h` (objects) or `x, y, width, height` (regions), top-left + size in pixels,
    converted here to `x1, y1, x2, y2 = x, y, x + w, y + h` (floats).

Memory: each reader does one `json.load` of the whole file, then converts entry by entry and
frees each raw entry once converted, so the peak is about the raw objects plus the dataclasses
built so far. For the full v1.2 `relationships.json` (~0.7 GB of text) plan on several GB of
RAM; the 5-image samples and fixtures are tiny.

The Visual Genome readers (v1.0 and v1.2 forms) and the relation sampling stay together
(about 510 lines): they share the id and name normalisation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from value_jax.data.errors import (
    DataFormatError,
    DataReport,
    PathLike,
    read_text_lines,
    read_utf8,
    report_or_new,
)

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class VGObject:
    object_id: int
    name: str
    box_xyxy: Box
    synsets: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    merged_object_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class VGRelation:
    relationship_id: int
    image_id: int
    predicate: str  # raw, as in the file (`ON`, `wears`, `parked on`)
    predicate_norm: str
    subject: VGObject
    object: VGObject
    synsets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class VGImage:
    image_id: int
    width: int
    height: int
    url: Optional[str] = None
    coco_id: Optional[int] = None
    flickr_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class VGRegion:
    region_id: int
    image_id: int
    phrase: str
    box_xyxy: Box


# ---------------------------------------------------------------------------------------------
# Field access with errors that name the file and the entry.


class _Entry:
    def __init__(self, path: PathLike, key: str, d: object):
        if not isinstance(d, dict):
            raise DataFormatError(path, f"{type(d).__name__}", "a JSON object", key=key)
        self.path, self.key, self.d = path, key, d

    def has(self, *names: str) -> bool:
        return any(n in self.d for n in names)

    def child(self, name: str) -> "_Entry":
        if name not in self.d:
            raise DataFormatError(
                self.path,
                f"no {name!r} among keys {sorted(self.d)}",
                f"a {name!r} object",
                key=self.key,
            )
        return _Entry(self.path, f"{self.key}.{name}", self.d[name])

    def get(self, names: Sequence[str], kind: str, optional: bool = False):
        for n in names:
            if n in self.d:
                return _check(self.path, f"{self.key}.{n}", self.d[n], kind)
        if optional:
            return None
        raise DataFormatError(
            self.path,
            f"no {' / '.join(repr(n) for n in names)} among keys {sorted(self.d)}",
            f"a {kind} field",
            key=self.key,
        )


def _check(path, key, v, kind):
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "int?": v is None or (isinstance(v, int) and not isinstance(v, bool)),
        # Python's json reads NaN / Infinity; a box made of them would poison every IoU.
        "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "str": isinstance(v, str),
        "str?": v is None or isinstance(v, str),
        "list": isinstance(v, list),
    }[kind]
    if not ok:
        raise DataFormatError(
            path, f"{v!r} ({type(v).__name__})", f"a {kind.rstrip('?')} value", key=key
        )
    return v


def _load_json(path: PathLike, expected: str):
    """Parsed JSON; non-UTF-8 bytes and syntax errors raise at their 1-based line."""
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(
            path, f"invalid JSON ({e.msg}, column {e.colno})", expected, line=e.lineno
        ) from None


def _load_list(path: PathLike) -> list:
    data = _load_json(path, "a JSON list")
    if not isinstance(data, list):
        raise DataFormatError(
            path, f"top-level {type(data).__name__}", "a JSON list (one entry per image)"
        )
    return data


def _entries(path: PathLike):
    """Yields (index, _Entry, image_id) and frees each raw entry after the caller is done."""
    data = _load_list(path)
    seen: set[int] = set()
    for i in range(len(data)):
        e = _Entry(path, f"[{i}]", data[i])
        image_id = e.get(("image_id", "id"), "int")
        if image_id in seen:
            raise DataFormatError(
                path, f"image id {image_id} again", "one entry per image", key=f"[{i}]"
            )
        seen.add(image_id)
        e.key = f"[{i}] image {image_id}"
        yield i, e, image_id
        data[i] = None


def _box(e: _Entry, report: DataReport, wh=("w", "h")) -> Box:
    x, y = e.get(("x",), "number"), e.get(("y",), "number")
    w, h = e.get((wh[0],), "number"), e.get((wh[1],), "number")
    if w <= 0 or h <= 0:
        report.count("degenerate_boxes", example=f"{Path(e.path).name} {e.key}: w={w} h={h}")
    return float(x), float(y), float(x + w), float(y + h)


# Name lists of an object: `names` (v1.2 objects / attributes), `object_names` (v1.0 attributes).
_NAME_LISTS = ("names", "object_names")


def _object(e: _Entry, report: DataReport) -> VGObject:
    object_id = e.get(("object_id", "id"), "int")
    list_key = next((k for k in _NAME_LISTS if e.has(k)), None)
    if list_key is not None:
        names = tuple(e.get((list_key,), "list"))
    else:
        names = (e.get(("name",), "str"),)
    if not names or not all(isinstance(n, str) for n in names):
        raise DataFormatError(
            e.path, f"names {list(names)!r}", "one or more name strings", key=e.key
        )
    synsets = tuple(e.get(("synsets",), "list", optional=True) or ())
    attributes = tuple(e.get(("attributes",), "list", optional=True) or ())
    merged = tuple(e.get(("merged_object_ids",), "list", optional=True) or ())
    return VGObject(object_id, names[0], _box(e, report), synsets, names, attributes, merged)


# ---------------------------------------------------------------------------------------------
# Predicates.


def read_relations_vocab(path: PathLike) -> dict[str, str]:
    """`relations_vocab.txt` (bottom-up-attention 1600/400/20): synonym -> canonical (first on its
    line). Spellings are normalised like predicates; a synonym on two lines raises."""
    mapping: dict[str, str] = {}
    for i, line in enumerate(read_text_lines(path), start=1):
        syns = [normalize_predicate(s) for s in line.split(",")]
        syns = [s for s in syns if s]
        if not syns:
            raise DataFormatError(
                path, "an empty line", "comma-separated synonyms, canonical first", line=i
            )
        for s in syns:
            if mapping.get(s, syns[0]) != syns[0]:
                raise DataFormatError(
                    path,
                    f"{s!r} already maps to {mapping[s]!r}",
                    "each synonym on one line only",
                    line=i,
                )
            mapping[s] = syns[0]
    return mapping


def normalize_predicate(raw: str, synonyms: Optional[Mapping[str, str]] = None) -> str:
    """Lower-case, strip, collapse whitespace; then map through `synonyms` (if given)."""
    norm = " ".join(raw.lower().split())
    return synonyms.get(norm, norm) if synonyms else norm


# ---------------------------------------------------------------------------------------------
# Readers.


def read_image_data(path: PathLike, report: Optional[DataReport] = None) -> dict[int, VGImage]:
    """`image_data.json` -> {image_id: VGImage}, file order. A width or height <= 0 raises
    DataFormatError naming the entry and image id."""
    report = report_or_new(report)
    out = {}
    for _, e, image_id in _entries(path):
        width, height = e.get(("width",), "int"), e.get(("height",), "int")
        if width <= 0 or height <= 0:
            # Boxes are normalised by this size: no number computed from them could be right.
            raise DataFormatError(
                path, f"image size {width}x{height}", "a positive width and height", key=e.key
            )
        out[image_id] = VGImage(
            image_id,
            width,
            height,
            e.get(("url",), "str?", optional=True),
            e.get(("coco_id",), "int?", optional=True),
            e.get(("flickr_id",), "int?", optional=True),
        )
    return out


def read_objects(path: PathLike, report: Optional[DataReport] = None) -> dict[int, list[VGObject]]:
    """`objects.json` or `attributes.json` (v1.2: `names`; v1.0: `object_names`) ->
    {image_id: [VGObject]}. Counts `degenerate_boxes` (w or h <= 0, kept)."""
    report = report_or_new(report)
    out = {}
    for _, e, image_id in _entries(path):
        objs = e.get(("objects", "attributes"), "list")
        out[image_id] = [
            _object(_Entry(path, f"{e.key}: objects[{j}]", o), report) for j, o in enumerate(objs)
        ]
    return out


def read_relationships(
    path: PathLike,
    report: Optional[DataReport] = None,
    synonyms: Optional[Mapping[str, str]] = None,
) -> dict[int, list[VGRelation]]:
    """`relationships.json` -> {image_id: [VGRelation]}; `predicate_norm` via `normalize_predicate`.
    Counts `degenerate_boxes` and `empty_predicates` (both kept)."""
    report = report_or_new(report)
    out = {}
    for _, e, image_id in _entries(path):
        rels = []
        for j, r in enumerate(e.get(("relationships",), "list")):
            re_ = _Entry(path, f"{e.key}: relationships[{j}]", r)
            raw = re_.get(("predicate",), "str")
            norm = normalize_predicate(raw, synonyms)
            if not norm:
                report.count("empty_predicates", example=re_.key)
            subj, obj = (_object(re_.child(k), report) for k in ("subject", "object"))
            rels.append(
                VGRelation(
                    re_.get(("relationship_id", "id"), "int"),
                    image_id,
                    raw,
                    norm,
                    subj,
                    obj,
                    tuple(re_.get(("synsets",), "list", optional=True) or ()),
                )
            )
        out[image_id] = rels
    return out


def read_region_descriptions(
    path: PathLike, report: Optional[DataReport] = None
) -> dict[int, list[VGRegion]]:
    """`region_descriptions.json` -> {image_id: [VGRegion]} (dense captions; boxes from
    `x, y, width, height`). Counts `degenerate_boxes` (kept)."""
    report = report_or_new(report)
    out = {}
    for _, e, image_id in _entries(path):
        regions = []
        for j, r in enumerate(e.get(("regions",), "list")):
            re_ = _Entry(path, f"{e.key}: regions[{j}]", r)
            rid = re_.get(("image_id",), "int", optional=True)
            if rid is not None and rid != image_id:
                raise DataFormatError(
                    path, f"image_id {rid}", f"the entry's image id {image_id}", key=re_.key
                )
            regions.append(
                VGRegion(
                    re_.get(("region_id", "id"), "int"),
                    image_id,
                    re_.get(("phrase",), "str"),
                    _box(re_, report, ("width", "height")),
                )
            )
        out[image_id] = regions
    return out


# ---------------------------------------------------------------------------------------------
# VALUE §3.4 sampling.


@dataclasses.dataclass
class RelationSample:
    """Sampled relations plus the kept predicates, most frequent first (class id = position)."""

    relations: list[VGRelation]
    predicates: tuple[str, ...]
    counts: dict[str, int]  # kept pairs per predicate


def sample_relation_pairs(
    relations: Union[Mapping[int, Sequence[VGRelation]], Iterable[VGRelation]],
    num_predicates: int = 32,
    max_pairs_per_predicate: int = 15000,
    max_same_type_per_image: int = 5,
    seed: int = 0,
    report: Optional[DataReport] = None,
) -> RelationSample:
    """VALUE's relation data (§3.4): the `num_predicates` most frequent `predicate_norm`s, at most
    `max_same_type_per_image` pairs of one predicate per image, at most `max_pairs_per_predicate`
    per predicate; random subsets drawn from `np.random.default_rng(seed)`.

    Before ranking, relations with an empty predicate, a subject that is its own object, or an
    exact duplicate (image, subject id, object id, predicate) are removed: none of them is a
    region pair the probes can use. Frequencies are counted after that, before the caps; ties
    broken alphabetically. Input order does not matter (sorted by image id, relationship id);
    output is in that order. Counts `empty_predicates`, `self_relations`, `duplicate_relations`,
    `relations_of_rare_predicates`, `over_per_image_cap`, `over_per_predicate_cap`.
    """
    report = report_or_new(report)
    flat = (
        list(r for rs in relations.values() for r in rs)
        if isinstance(relations, Mapping)
        else list(relations)
    )
    flat.sort(key=lambda r: (r.image_id, r.relationship_id))
    clean, seen = [], set()
    for r in flat:
        where = f"image {r.image_id} relationship {r.relationship_id}"
        if not r.predicate_norm:
            report.count("empty_predicates", example=where)
            continue
        if r.subject.object_id == r.object.object_id:
            report.count("self_relations", example=where)
            continue
        k = (r.image_id, r.subject.object_id, r.object.object_id, r.predicate_norm)
        if k in seen:
            report.count("duplicate_relations", example=f"{where} {r.predicate_norm!r}")
            continue
        seen.add(k)
        clean.append(r)
    freq: dict[str, int] = {}
    for r in clean:
        freq[r.predicate_norm] = freq.get(r.predicate_norm, 0) + 1
    predicates = tuple(sorted(freq, key=lambda p: (-freq[p], p))[:num_predicates])
    rank = {p: i for i, p in enumerate(predicates)}
    groups: dict[tuple[int, str], list[int]] = {}
    for i, r in enumerate(clean):
        if r.predicate_norm not in rank:
            report.count("relations_of_rare_predicates", example=r.predicate_norm)
            continue
        groups.setdefault((r.image_id, r.predicate_norm), []).append(i)
    rng = np.random.default_rng(seed)
    per_pred: dict[str, list[int]] = {p: [] for p in predicates}
    for (image_id, pred), idx in sorted(groups.items(), key=lambda kv: (kv[0][0], rank[kv[0][1]])):
        if len(idx) > max_same_type_per_image:
            report.count(
                "over_per_image_cap",
                len(idx) - max_same_type_per_image,
                example=f"image {image_id} {pred!r}: {len(idx)}",
            )
            idx = sorted(rng.choice(idx, max_same_type_per_image, replace=False).tolist())
        per_pred[pred].extend(idx)
    kept = []
    for pred in predicates:
        idx = per_pred[pred]
        if len(idx) > max_pairs_per_predicate:
            report.count(
                "over_per_predicate_cap",
                len(idx) - max_pairs_per_predicate,
                example=f"{pred!r}: {len(idx)}",
            )
            idx = rng.choice(idx, max_pairs_per_predicate, replace=False).tolist()
        per_pred[pred] = idx
        kept.extend(idx)
    kept.sort()
    return RelationSample(
        [clean[i] for i in kept], predicates, {p: len(per_pred[p]) for p in predicates}
    )


# ---------------------------------------------------------------------------------------------
# Scene-graph benchmark dictionaries.


@dataclasses.dataclass
class SGGDicts:
    """`VG-SGG-dicts(-with-attri).json`: 1-based index maps (0 is free for background /
    no-relation); attribute maps are empty for the file without attributes."""

    idx_to_label: dict[int, str]
    label_to_idx: dict[str, int]
    idx_to_predicate: dict[int, str]
    predicate_to_idx: dict[str, int]
    idx_to_attribute: dict[int, str]
    attribute_to_idx: dict[str, int]
    object_count: dict[str, int]
    predicate_count: dict[str, int]
    attribute_count: dict[str, int]


def _index_maps(path, d: dict, kind: str, required: bool) -> tuple[dict[int, str], dict[str, int]]:
    i2x, x2i = d.get(f"idx_to_{kind}"), d.get(f"{kind}_to_idx")
    if i2x is None and x2i is None and not required:
        return {}, {}
    for name, m in ((f"idx_to_{kind}", i2x), (f"{kind}_to_idx", x2i)):
        if not isinstance(m, dict):
            raise DataFormatError(path, f"{type(m).__name__}", "a JSON object", key=name)
    idx_to: dict[int, str] = {}
    for k, v in i2x.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) >= 1 and isinstance(v, str)):
            raise DataFormatError(
                path,
                f"{k!r}: {v!r}",
                "a 1-based decimal string key -> name",
                key=f"idx_to_{kind}[{k!r}]",
            )
        idx_to[int(k)] = v
    if sorted(idx_to) != list(range(1, len(idx_to) + 1)):
        raise DataFormatError(
            path,
            f"indices {sorted(idx_to)[:3]}...{sorted(idx_to)[-3:]}",
            f"1..{len(idx_to)} without gaps",
            key=f"idx_to_{kind}",
        )
    to_idx: dict[str, int] = {}
    for k, v in x2i.items():
        if not isinstance(v, int) or idx_to.get(v) != k:
            raise DataFormatError(
                path, f"{k!r}: {v!r}", f"the inverse of idx_to_{kind}", key=f"{kind}_to_idx[{k!r}]"
            )
        to_idx[k] = v
    if len(to_idx) != len(idx_to):
        raise DataFormatError(
            path,
            f"{len(to_idx)} entries",
            f"{len(idx_to)} like idx_to_{kind}",
            key=f"{kind}_to_idx",
        )
    return dict(sorted(idx_to.items())), to_idx


def load_sgg_dicts(path: PathLike) -> SGGDicts:
    """Reads and cross-checks the SGG index maps: string keys -> int, 1..N without gaps, inverse
    maps consistent. Raises DataFormatError naming the offending key."""
    d = _load_json(path, "a JSON object")
    if not isinstance(d, dict):
        raise DataFormatError(path, f"top-level {type(d).__name__}", "a JSON object")
    labels = _index_maps(path, d, "label", True)
    predicates = _index_maps(path, d, "predicate", True)
    attributes = _index_maps(path, d, "attribute", False)
    counts = {}
    for name in ("object_count", "predicate_count", "attribute_count"):
        c = d.get(name, {})
        if not isinstance(c, dict) or not all(isinstance(v, int) for v in c.values()):
            raise DataFormatError(
                path, f"{type(c).__name__}", "a name -> int count object", key=name
            )
        counts[name] = dict(c)
    return SGGDicts(
        *labels,
        *predicates,
        *attributes,
        counts["object_count"],
        counts["predicate_count"],
        counts["attribute_count"],
    )
