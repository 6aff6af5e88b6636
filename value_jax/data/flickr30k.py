"""Flickr30k Entities: caption phrases (`Sentences/<id>.txt`), gold boxes (`Annotations/<id>.xml`),
split lists and `UNRELATED_CAPTIONS`.

Parsing follows the dataset's own reader (`flickr30k_entities_utils.py`, reused by VOLTA's
`flickr30ke_ablation_dataset.py`), read rather than copied, with two differences: malformed markup
raises `DataFormatError` instead of yielding garbled phrases, and every dropped phrase or object
is counted in a `DataReport`.

Conventions:
  * `Sentence.index` is the 0-based line of the caption in its file (UNRELATED_CAPTIONS is 1-based;
    `read_unrelated_captions` converts). Messages and report examples cite a caption as
    `<image id>.txt:<1-based line>` (`sentence_place`), like every other file:line here.
  * `Phrase.first_word_index` / `num_words` index `Sentence.words`, the caption's space-separated
    tokens with the markup removed; `word_span` is half-open.
  * `Annotation.boxes` are `[x1, y1, x2, y2]` ints, 0-based: 1 is subtracted from each file
    coordinate, as the reference parser does.

The Sentences and Annotations readers stay in one module (about 450 lines): chain ids link the
two files, and the checks that join them name both.
"""

from __future__ import annotations

import dataclasses
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Iterator, Optional

from value_jax.data.errors import (
    DataFormatError,
    DataReport,
    PathLike,
    file_line,
    read_text_lines,
    report_or_new,
)

# The 8 types VALUE's coreference table uses ("other" included) plus the box-less `notvisual`.
PHRASE_TYPES = (
    "people",
    "clothing",
    "bodyparts",
    "animals",
    "vehicles",
    "instruments",
    "scene",
    "other",
)
ALL_PHRASE_TYPES = PHRASE_TYPES + ("notvisual",)
NOTVISUAL_CHAIN = "0"

_HEADER_PREFIX = "[/EN#"
_CHAIN_ID = re.compile(r"^[0-9]+$")
_TYPE = re.compile(r"^[A-Za-z_]+$")


@dataclasses.dataclass(frozen=True)
class Phrase:
    """One `[/EN#<chain_id>/<type>[/<type>...] words]` span of a caption."""

    chain_id: str
    types: tuple[str, ...]
    text: str
    first_word_index: int
    num_words: int

    @property
    def type(self) -> str:
        """The first type: the more specific one when a phrase carries two (e.g. `bodyparts`)."""
        return self.types[0]

    @property
    def word_span(self) -> tuple[int, int]:
        """Half-open `[start, end)` over `Sentence.words`."""
        return self.first_word_index, self.first_word_index + self.num_words

    @property
    def is_notvisual(self) -> bool:
        return self.chain_id == NOTVISUAL_CHAIN or "notvisual" in self.types


@dataclasses.dataclass
class Sentence:
    image_id: str
    index: int
    text: str
    words: list[str]
    phrases: list[Phrase]


@dataclasses.dataclass
class Annotation:
    """Gold boxes of one image. `boxes[chain_id]` lists `[x1, y1, x2, y2]` (0-based ints)."""

    image_id: str
    width: int
    height: int
    depth: int
    boxes: dict[str, list[list[int]]]
    scene: set[str]
    nobox: set[str]


@dataclasses.dataclass(frozen=True)
class CorefLink:
    """A (sentence, phrase) whose chain has >= 1 gold box: one example in Frank et al. / VALUE."""

    image_id: str
    sentence_index: int
    phrase_index: int
    sentence: Sentence = dataclasses.field(compare=False, repr=False)
    phrase: Phrase
    boxes: tuple[tuple[int, int, int, int], ...]


def _image_id_of(path: PathLike) -> str:
    return Path(path).stem


def sentence_place(s: "Sentence") -> str:
    """`<image id>.txt:<line>`: the caption's Sentences file and 1-based line."""
    return f"{s.image_id}.txt:{s.index + 1}"


def _parse_line(
    path: PathLike, line_no: int, line: str, report: DataReport
) -> tuple[list[str], list[Phrase]]:
    words: list[str] = []
    phrases: list[Phrase] = []
    open_header: Optional[tuple[str, tuple[str, ...], str]] = None  # chain, types, header token
    open_words: list[str] = []
    open_start = 0

    def unclosed() -> DataFormatError:
        shown = " ".join([open_header[2]] + open_words)
        return DataFormatError(path, f"unclosed phrase {shown!r}", "']'", line=line_no)

    for token in line.split():
        if token.startswith("[/"):
            if open_header is not None:
                raise unclosed()
            open_header = _parse_header(path, line_no, token, report)
            open_words, open_start = [], len(words)
            continue
        if open_header is None:
            if "]" in token:
                # The reference parser would fold it into a word and skew every word index.
                raise DataFormatError(
                    path,
                    f"{token!r} outside any phrase",
                    "']' only to close a '[/EN#...' phrase",
                    line=line_no,
                )
            words.append(token)
            continue
        closes = token.endswith("]")
        word = token[:-1] if closes else token
        if not word:
            raise DataFormatError(
                path,
                f"empty word before ']' in phrase {open_header[2]!r}",
                "']' attached to the phrase's last word",
                line=line_no,
            )
        if "]" in word:
            raise DataFormatError(
                path,
                f"word {word!r} in phrase {open_header[2]!r}",
                "one ']', at the end of the phrase's last word",
                line=line_no,
            )
        open_words.append(word)
        words.append(word)
        if closes:
            chain, types, _ = open_header
            phrases.append(Phrase(chain, types, " ".join(open_words), open_start, len(open_words)))
            if len(types) > 1:
                report.count(
                    "multi_type_phrases", example=f"{file_line(path, line_no)} {'/'.join(types)}"
                )
            open_header = None
    if open_header is not None:
        raise unclosed()
    return words, phrases


def _parse_header(path, line_no, token, report) -> tuple[str, tuple[str, ...], str]:
    if token.endswith("]"):
        raise DataFormatError(
            path, f"empty phrase {token!r}", "at least one word after the header", line=line_no
        )
    if not token.startswith(_HEADER_PREFIX):
        raise DataFormatError(
            path, f"phrase header {token!r}", "'[/EN#<chain id>/<type>'", line=line_no
        )
    parts = token[len(_HEADER_PREFIX) :].split("/")
    chain, types = parts[0], tuple(parts[1:])
    if not _CHAIN_ID.match(chain):
        raise DataFormatError(
            path, f"chain id {chain!r} in {token!r}", "a decimal chain id", line=line_no
        )
    if not types or not all(_TYPE.match(t) for t in types):
        raise DataFormatError(
            path,
            f"phrase types {'/'.join(types)!r} in {token!r}",
            "one or more '/<type>' names",
            line=line_no,
        )
    for t in types:
        if t not in ALL_PHRASE_TYPES:
            report.count("unknown_phrase_types", example=f"{file_line(path, line_no)} {t}")
    return chain, types, token


def parse_sentences(path: PathLike, report: Optional[DataReport] = None) -> list[Sentence]:
    """Parses `Sentences/<image_id>.txt` into one `Sentence` per non-empty line.

    Accepts multi-type phrases (`bodyparts/people`), `notvisual` (chain 0), captions without a
    final period, adjacent phrases, `&` / `#` inside phrases and lower-case starts. Counts
    `blank_caption_lines`, `multi_type_phrases`, `unknown_phrase_types` (kept),
    `chain_ids_with_several_types` (kept: the real data reuses chain ids across types) and
    `empty_sentence_files` (no caption at all: the image then gives no example).
    Raises DataFormatError (file:line) on unclosed, empty or malformed phrases, on a `]` that
    closes no phrase, and on bytes that are not UTF-8.
    """
    report = report_or_new(report)
    image_id = _image_id_of(path)
    sentences = []
    types_by_chain: dict[str, set[str]] = {}
    for i, line in enumerate(read_text_lines(path)):
        if not line.strip():
            report.count("blank_caption_lines", example=file_line(path, i + 1))
            continue
        words, phrases = _parse_line(path, i + 1, line, report)
        sentences.append(Sentence(image_id, i, " ".join(words), words, phrases))
        for p in phrases:
            if not p.is_notvisual:
                types_by_chain.setdefault(p.chain_id, set()).add(p.type)
    for chain, types in sorted(types_by_chain.items()):
        if len(types) > 1:
            report.count(
                "chain_ids_with_several_types",
                example=f"{image_id} chain {chain}: {'/'.join(sorted(types))}",
            )
    if not sentences:
        report.count("empty_sentence_files", example=Path(path).name)
    return sentences


def _int_text(path, elem: Optional[ET.Element], key: str) -> int:
    if elem is None or elem.text is None:
        raise DataFormatError(path, f"no <{key.rsplit('/', 1)[-1]}>", "an integer element", key=key)
    try:
        return int(elem.text.strip())
    except ValueError:
        raise DataFormatError(path, f"{elem.text.strip()!r}", "an integer", key=key) from None


def parse_annotations(path: PathLike, report: Optional[DataReport] = None) -> Annotation:
    """Parses `Annotations/<image_id>.xml` (PASCAL-VOC-like).

    Each `<object>` adds its box to every `<name>` chain id it lists; box-less objects put their
    ids in `nobox` (`<nobndbox>` > 0) and/or `scene` (`<scene>` > 0). Counts `degenerate_boxes`
    (x2 < x1 or y2 < y1, kept), `boxes_outside_image` (kept), `objects_with_several_bndbox` (first
    kept, as in the reference) and `objects_without_box_or_flag` (box-less, both flags 0).
    Raises DataFormatError on malformed XML or bytes that are not UTF-8 (with ElementTree's
    1-based line), missing/non-integer fields (with the element path as key) and a width or
    height <= 0 (key `size`).
    """
    report = report_or_new(report)
    image_id = _image_id_of(path)
    try:
        root = ET.parse(os.fspath(path)).getroot()
    except ET.ParseError as e:
        raise DataFormatError(
            path, f"malformed XML ({e})", "well-formed XML", line=e.position[0]
        ) from None
    if root.tag != "annotation":
        raise DataFormatError(path, f"root element <{root.tag}>", "<annotation>")
    size = root.find("size")
    if size is None:
        raise DataFormatError(
            path, "no <size>", "<size> with <width>, <height>, <depth>", key="size"
        )
    width, height, depth = (
        _int_text(path, size.find(k), f"size/{k}") for k in ("width", "height", "depth")
    )
    if width <= 0 or height <= 0:
        # Features without a size (UNITER npz) are scaled by it: every box would be wrong.
        raise DataFormatError(
            path, f"image size {width}x{height}", "a positive width and height", key="size"
        )
    boxes: dict[str, list[list[int]]] = {}
    scene: set[str] = set()
    nobox: set[str] = set()
    for n, obj in enumerate(root.findall("object"), start=1):
        key = f"object[{n}]"
        names = [(e.text or "").strip() for e in obj.findall("name")]
        if not names or not all(_CHAIN_ID.match(x) for x in names):
            raise DataFormatError(
                path, f"names {names}", "one or more <name> decimal chain ids", key=key
            )
        bndboxes = obj.findall("bndbox")
        if bndboxes:
            if len(bndboxes) > 1:
                report.count("objects_with_several_bndbox", example=f"{image_id} {key}")
            b = bndboxes[0]
            box = [
                _int_text(path, b.find(k), f"{key}/bndbox/{k}") - 1
                for k in ("xmin", "ymin", "xmax", "ymax")
            ]
            if box[2] < box[0] or box[3] < box[1]:
                report.count("degenerate_boxes", example=f"{image_id} {key} {box}")
            if min(box) < 0 or box[2] >= width or box[3] >= height:
                report.count(
                    "boxes_outside_image", example=f"{image_id} {key} {box} in {width}x{height}"
                )
            for name in names:
                boxes.setdefault(name, []).append(list(box))
            continue
        nob, sc = obj.find("nobndbox"), obj.find("scene")
        if nob is None and sc is None:
            raise DataFormatError(
                path,
                "object with neither <bndbox> nor <nobndbox>/<scene>",
                "<bndbox> or the <nobndbox>/<scene> flags",
                key=key,
            )
        nob_v = 0 if nob is None else _int_text(path, nob, f"{key}/nobndbox")
        sc_v = 0 if sc is None else _int_text(path, sc, f"{key}/scene")
        if nob_v > 0:
            nobox.update(names)
        if sc_v > 0:
            scene.update(names)
        if nob_v <= 0 and sc_v <= 0:
            report.count("objects_without_box_or_flag", example=f"{image_id} {key} {names}")
    return Annotation(image_id, width, height, depth, boxes, scene, nobox)


def read_split(path: PathLike, report: Optional[DataReport] = None) -> list[str]:
    """Image ids of `train.txt` / `val.txt` / `test.txt`, file order. Counts `blank_lines` and
    `duplicate_image_ids` (later copies dropped); a non-numeric id raises DataFormatError."""
    report = report_or_new(report)
    ids, seen = [], set()
    for i, line in enumerate(read_text_lines(path), start=1):
        s = line.strip()
        if not s:
            report.count("blank_lines", example=file_line(path, i))
            continue
        if not _CHAIN_ID.match(s):
            raise DataFormatError(path, f"{s!r}", "one numeric image id per line", line=i)
        if s in seen:
            report.count("duplicate_image_ids", example=f"{file_line(path, i)} {s}")
            continue
        seen.add(s)
        ids.append(s)
    return ids


def read_unrelated_captions(path: PathLike) -> list[tuple[str, int]]:
    """`(image_id, sentence_index)` pairs, the index 0-based (the file's numbers are 1-based).
    `#` lines are the header/comments."""
    pairs = []
    for i, line in enumerate(read_text_lines(path), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fields = s.split()
        if len(fields) != 2 or not all(_CHAIN_ID.match(f) for f in fields) or int(fields[1]) < 1:
            raise DataFormatError(path, f"{s!r}", "'<image id> <1-based sentence number>'", line=i)
        pairs.append((fields[0], int(fields[1]) - 1))
    return pairs


def coref_links(
    sentences: Iterable[Sentence],
    annotation: Annotation,
    report: Optional[DataReport] = None,
    unrelated: frozenset = frozenset(),
) -> list[CorefLink]:
    """Every (sentence, phrase) whose chain has >= 1 gold box, with that chain's boxes.

    Counts `notvisual_phrases`, `phrases_without_box` (chain in `nobox`/`scene` or absent from the
    XML) and `unrelated_caption_phrases` (sentences listed in `unrelated`, as `(image_id, index)`).
    """
    report = report_or_new(report)
    links = []
    for s in sentences:
        skip = (s.image_id, s.index) in unrelated
        for k, p in enumerate(s.phrases):
            where = f"{sentence_place(s)} {p.text!r}"
            if skip:
                report.count("unrelated_caption_phrases", example=where)
            elif p.is_notvisual:
                report.count("notvisual_phrases", example=where)
            elif not annotation.boxes.get(p.chain_id):
                report.count("phrases_without_box", example=f"{where} chain {p.chain_id}")
            else:
                boxes = tuple(tuple(b) for b in annotation.boxes[p.chain_id])
                links.append(CorefLink(s.image_id, s.index, k, s, p, boxes))
    return links


class Flickr30kEntities:
    """A Flickr30k Entities root: `Sentences/`, `Annotations/`, `{train,val,test}.txt`,
    optional `UNRELATED_CAPTIONS`. Files are read on demand (no caching)."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def sentences_path(self, image_id: str) -> Path:
        return self.root / "Sentences" / f"{image_id}.txt"

    def annotation_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def image_ids(self, split: str, report: Optional[DataReport] = None) -> list[str]:
        return read_split(self.root / f"{split}.txt", report)

    def sentences(self, image_id: str, report: Optional[DataReport] = None) -> list[Sentence]:
        return parse_sentences(self.sentences_path(image_id), report)

    def annotation(self, image_id: str, report: Optional[DataReport] = None) -> Annotation:
        return parse_annotations(self.annotation_path(image_id), report)

    def unrelated_captions(self) -> frozenset:
        path = self.root / "UNRELATED_CAPTIONS"
        return frozenset(read_unrelated_captions(path)) if path.exists() else frozenset()

    def iter_images(
        self, split: str, report: Optional[DataReport] = None
    ) -> Iterator[tuple[list[Sentence], Annotation]]:
        """Yields `(sentences, annotation)` per image of `split`; images missing either file are
        counted (`images_without_sentences`, `images_without_annotations`) and skipped."""
        report = report_or_new(report)
        for image_id in self.image_ids(split, report):
            if not self.sentences_path(image_id).exists():
                report.count("images_without_sentences", example=image_id)
                continue
            if not self.annotation_path(image_id).exists():
                report.count("images_without_annotations", example=image_id)
                continue
            yield self.sentences(image_id, report), self.annotation(image_id, report)

    def coref_links(
        self, split: str, report: Optional[DataReport] = None, skip_unrelated: bool = False
    ) -> list[CorefLink]:
        """`coref_links` over every image of `split` (Frank et al. use `val`: 14,433 links).
        The references keep unrelated captions, hence `skip_unrelated=False` by default."""
        report = report_or_new(report)
        unrelated = self.unrelated_captions() if skip_unrelated else frozenset()
        links = []
        for sentences, annotation in self.iter_images(split, report):
            links.extend(coref_links(sentences, annotation, report, unrelated))
        return links
