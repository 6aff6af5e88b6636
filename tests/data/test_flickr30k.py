"""Flickr30k Entities readers on the real sample files, on generated fixtures, and on broken input."""

import pathlib
import shutil

import pytest

from value_jax.data.errors import DataFormatError, DataReport
from value_jax.data.fixtures.annotations import write_flickr30k
from value_jax.data.flickr30k import (
    Flickr30kEntities,
    Phrase,
    coref_links,
    parse_annotations,
    parse_sentences,
    read_split,
    read_unrelated_captions,
)

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
F30K = DATA / "flickr30k_entities"


@pytest.fixture
def real():
    if not (F30K / "Sentences").is_dir():
        pytest.skip(f"real Flickr30k Entities sample not found at {F30K}")
    return F30K


def _spans(sentence):
    return [
        (p.chain_id, p.types, p.text, p.first_word_index, p.num_words) for p in sentence.phrases
    ]


# ---- real files -------------------------------------------------------------------------------


def test_real_36979_first_caption(real):
    sents = parse_sentences(real / "Sentences" / "36979.txt")
    assert len(sents) == 5 and [s.index for s in sents] == [0, 1, 2, 3, 4]
    s = sents[0]
    assert s.image_id == "36979"
    assert s.text == (
        "A group of friends playing cards and trying to bluff each other into making "
        "a terrible mistake ."
    )
    assert _spans(s) == [
        ("137644", ("people",), "A group of friends", 0, 4),
        ("137645", ("other",), "cards", 5, 1),
        ("0", ("notvisual",), "each other", 10, 2),
        ("137650", ("other",), "a terrible mistake", 14, 3),
    ]
    assert s.phrases[2].is_notvisual and not s.phrases[0].is_notvisual
    for p in s.phrases:
        a, b = p.word_span
        assert " ".join(s.words[a:b]) == p.text
    # Adjacent phrases "[... em] [... poker]" in caption 2.
    assert _spans(sents[1])[2:] == [
        ("137651", ("other",), "em", 10, 1),
        ("137647", ("other",), "poker", 11, 1),
    ]


def test_real_65567_multi_type_and_lower_case_start(real):
    report = DataReport()
    sents = parse_sentences(real / "Sentences" / "65567.txt", report)
    p = sents[3].phrases[1]
    assert p == Phrase("255545", ("bodyparts", "people"), "a man 's arm", 3, 4)
    assert p.type == "bodyparts"
    assert sents[2].words[0] == "a" and sents[2].phrases[0].text == "a man"
    assert report["multi_type_phrases"] == 1
    assert report.examples("multi_type_phrases") == ["65567.txt:4 bodyparts/people"]


def test_real_81641_caption_without_period(real):
    sents = parse_sentences(real / "Sentences" / "81641.txt")
    last = sents[4]
    assert last.words == ["A", "man", "doing", "gymnastic", "stunts"]
    assert last.phrases[-1].text == "gymnastic stunts" and last.phrases[-1].word_span == (3, 5)


def test_real_6338542128_reused_chain_ampersand_hash(real):
    report = DataReport()
    sents = parse_sentences(real / "Sentences" / "6338542128.txt", report)
    assert sents[0].phrases[3] == Phrase(
        "253070", ("people",), "an Iowa State football player", 20, 5
    )
    assert sents[3].phrases[0] == Phrase(
        "253070", ("scene",), "The Iowa State football player blocks", 0, 6
    )
    assert sents[0].phrases[2].text == "a Texas A&M football player"
    assert sents[4].phrases[0] == Phrase("253073", ("other",), "# 8", 0, 2)
    assert report["chain_ids_with_several_types"] == 1
    assert "253070: people/scene" in report.examples("chain_ids_with_several_types")[0]


def test_real_4945942737_adjacent_scene_phrases(real):
    s = parse_sentences(real / "Sentences" / "4945942737.txt")[0]
    assert _spans(s)[2:] == [
        ("221799", ("scene",), "the edge of a cement area", 7, 6),
        ("221798", ("scene",), "overlooking water", 13, 2),
    ]


def test_real_splits_and_unrelated(real):
    train = read_split(real / "train.txt")
    assert (len(train), len(read_split(real / "val.txt")), len(read_split(real / "test.txt"))) == (
        29783,
        1000,
        1000,
    )
    assert train[:3] == ["3359636318", "6959556104", "2326294409"]
    assert {"36979", "65567", "81641", "6338542128", "4945942737"} <= set(train)
    unrelated = read_unrelated_captions(real / "UNRELATED_CAPTIONS")
    assert len(unrelated) == 21
    assert unrelated[:2] == [("129602216", 4), ("133010954", 4)]
    assert unrelated[-1] == ("180753784", 2)


def test_real_root_without_annotations_counts_every_image(real, tmp_path):
    shutil.copytree(real / "Sentences", tmp_path / "Sentences")
    (tmp_path / "train.txt").write_text("36979\n65567\n999\n")
    report = DataReport()
    assert list(Flickr30kEntities(tmp_path).iter_images("train", report)) == []
    assert report["images_without_annotations"] == 2 and report["images_without_sentences"] == 1


# ---- generated fixtures -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_fixture_round_trip(tmp_path, seed):
    m = write_flickr30k(tmp_path, n_images=7, seed=seed)
    ds = Flickr30kEntities(tmp_path)
    assert sorted(sum((ds.image_ids(s) for s in ("train", "val", "test")), [])) == sorted(
        m.image_ids
    )
    for split, ids in m.splits.items():
        assert ds.image_ids(split) == ids
    for image_id in m.image_ids:
        assert ds.sentences(image_id) == m.sentences[image_id]
        assert ds.annotation(image_id) == m.annotations[image_id]
    assert sorted(ds.unrelated_captions()) == m.unrelated


def test_fixture_is_deterministic(tmp_path):
    a = write_flickr30k(tmp_path / "a", 4, seed=3)
    b = write_flickr30k(tmp_path / "b", 4, seed=3)
    assert a.sentences == b.sentences and a.annotations == b.annotations
    for img in a.image_ids:
        assert (tmp_path / "a" / "Annotations" / f"{img}.xml").read_bytes() == (
            tmp_path / "b" / "Annotations" / f"{img}.xml"
        ).read_bytes()


def test_annotation_shared_box_flags_and_one_based(tmp_path):
    m = write_flickr30k(tmp_path, 3, seed=0)
    img = m.image_ids[0]
    ann = parse_annotations(tmp_path / "Annotations" / f"{img}.xml")
    xml = (tmp_path / "Annotations" / f"{img}.xml").read_text()
    assert "\t<object>\n\t\t<name>" in xml
    first = xml.split("<xmin>")[1].split("<")[0]
    people = m.sentences[img][0].phrases[0].chain_id
    assert ann.boxes[people][0][0] == int(first) - 1
    second = m.sentences[img][0].phrases[1].chain_id
    assert ann.boxes[people][-1] == ann.boxes[second][-1]  # one <object>, two <name>s
    assert (
        len(ann.scene) == 1 and len(ann.nobox) == 1 and not (ann.scene | ann.nobox) & set(ann.boxes)
    )


def test_coref_links_counts(tmp_path):
    m = write_flickr30k(tmp_path, 6, seed=2)
    ds = Flickr30kEntities(tmp_path)
    report = DataReport()
    links = ds.coref_links("train", report)
    expected = notvisual = nobox = 0
    for img in m.splits["train"]:
        for s in m.sentences[img]:
            for p in s.phrases:
                if p.is_notvisual:
                    notvisual += 1
                elif p.chain_id in m.annotations[img].boxes:
                    expected += 1
                else:
                    nobox += 1
    assert len(links) == expected
    assert report["notvisual_phrases"] == notvisual and report["phrases_without_box"] == nobox
    for link in links:
        assert [list(b) for b in link.boxes] == m.annotations[link.image_id].boxes[
            link.phrase.chain_id
        ]
        assert link.sentence.phrases[link.phrase_index] == link.phrase
    report = DataReport()
    skipped = ds.coref_links("train", report, skip_unrelated=True)
    first = m.image_ids[0]
    n_unrelated = sum(1 for p in m.sentences[first][4].phrases)
    assert report["unrelated_caption_phrases"] == n_unrelated
    assert all((l.image_id, l.sentence_index) != (first, 4) for l in skipped)


def test_coref_links_function_on_real_sentences(real):
    from value_jax.data.flickr30k import Annotation

    sents = parse_sentences(real / "Sentences" / "36979.txt")
    ann = Annotation(
        "36979",
        500,
        333,
        3,
        {"137644": [[1, 2, 30, 40]], "137645": [[5, 5, 9, 9], [0, 0, 3, 3]]},
        set(),
        {"137650"},
    )
    report = DataReport()
    links = coref_links(sents, ann, report)
    assert [(l.sentence_index, l.phrase.text) for l in links][:3] == [
        (0, "A group of friends"),
        (0, "cards"),
        (1, "A group of college students"),
    ]
    assert links[1].boxes == ((5, 5, 9, 9), (0, 0, 3, 3))
    assert report["notvisual_phrases"] == 1
    assert report["phrases_without_box"] == 6  # 137650 (nobox), 137648, 137651, 137647 x2, 137646


# ---- malformed input --------------------------------------------------------------------------


def _sentences_file(tmp_path, lines):
    path = tmp_path / "Sentences" / "36979.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = "[/EN#137644/people Several men] play [/EN#137645/other cards] ."


@pytest.mark.parametrize(
    "bad, found",
    [
        (
            "[/EN#137644/people A group of friends playing cards .",
            "unclosed phrase '[/EN#137644/people A group of friends playing cards .'",
        ),
        (
            "[/EN#137644/people A group [/EN#1/other cards] .",
            "unclosed phrase '[/EN#137644/people A group'",
        ),
        ("[/EN#137644/people] play .", "empty phrase"),
        ("[/EN#abc/people men] play .", "chain id 'abc'"),
        ("[/EN#12 men] play .", "phrase types ''"),
        ("[/XX#12/people men] play .", "phrase header '[/XX#12/people'"),
        ("[/EN#12/people men ] play .", "empty word before ']'"),
        # A stray ']' outside a phrase used to be read as part of a word.
        ("[/EN#137644/people Several men] play] cards .", "'play]' outside any phrase"),
        ("Several men ] play .", "']' outside any phrase"),
        ("[/EN#12/people men]] play .", "word 'men]' in phrase '[/EN#12/people'"),
        ("[/EN#12/people a]b men] play .", "word 'a]b' in phrase"),
    ],
)
def test_malformed_sentences_name_file_and_line(tmp_path, bad, found):
    path = _sentences_file(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataFormatError) as e:
        parse_sentences(path)
    msg = str(e.value)
    assert "Sentences/36979.txt:3: " in msg and found in msg
    assert e.value.line == 3


def test_unclosed_phrase_message_exactly(tmp_path):
    path = _sentences_file(tmp_path, [GOOD, GOOD, "[/EN#137644/people A group"])
    with pytest.raises(
        DataFormatError,
        match=r"Sentences/36979\.txt:3: unclosed phrase "
        r"'\[/EN#137644/people A group' \(expected '\]'\)$",
    ):
        parse_sentences(path)


def test_blank_and_unknown_type_are_counted(tmp_path):
    path = _sentences_file(tmp_path, [GOOD, "", "[/EN#5/robots a robot] walks ."])
    report = DataReport()
    sents = parse_sentences(path, report)
    assert [s.index for s in sents] == [0, 2]
    assert report["blank_caption_lines"] == 1 and report["unknown_phrase_types"] == 1


def _xml(tmp_path, body, name="123.xml"):
    path = tmp_path / "Annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


SIZE = "<size>\n\t\t<width>333</width>\n\t\t<height>500</height>\n\t\t<depth>3</depth>\n\t</size>"


def test_malformed_xml_reports_line(tmp_path):
    path = _xml(
        tmp_path, f"<annotation>\n\t{SIZE}\n\t<object>\n\t\t<name>1</name>\n\t</annotation>\n"
    )
    with pytest.raises(DataFormatError) as e:
        parse_annotations(path)
    assert (
        "Annotations/123.xml:9: " in str(e.value)
        and e.value.line == 9
        and "malformed XML" in str(e.value)
    )


@pytest.mark.parametrize(
    "obj, key",
    [
        (
            "<object><name>1</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
            "[object[1]/bndbox/xmin]",
        ),
        (
            "<object><name>1</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object>",
            "[object[1]/bndbox/ymax]",
        ),
        ("<object><name>1</name></object>", "[object[1]]"),
        (
            "<object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
            "[object[1]]",
        ),
    ],
)
def test_bad_objects_name_the_object(tmp_path, obj, key):
    path = _xml(tmp_path, f"<annotation>{SIZE}{obj}</annotation>")
    with pytest.raises(DataFormatError) as e:
        parse_annotations(path)
    assert str(e.value).startswith(str(path) + " " + key)


def test_missing_size_and_odd_boxes(tmp_path):
    with pytest.raises(DataFormatError, match=r"\[size\]"):
        parse_annotations(_xml(tmp_path, "<annotation><object/></annotation>"))
    body = (
        f"<annotation>{SIZE}"
        "<object><name>1</name><name>2</name><bndbox><xmin>10</xmin><ymin>1</ymin><xmax>5</xmax><ymax>600</ymax>"
        "</bndbox></object><object><name>3</name><scene>0</scene><nobndbox>0</nobndbox></object></annotation>"
    )
    report = DataReport()
    ann = parse_annotations(_xml(tmp_path, body), report)
    assert ann.boxes == {"1": [[9, 0, 4, 599]], "2": [[9, 0, 4, 599]]}
    assert report["degenerate_boxes"] == 1 and report["boxes_outside_image"] == 1
    assert report["objects_without_box_or_flag"] == 1


def test_bad_split_and_unrelated_lines(tmp_path):
    (tmp_path / "val.txt").write_text("123\n\n123\nabc\n")
    with pytest.raises(DataFormatError, match=r"val\.txt:4: 'abc'"):
        read_split(tmp_path / "val.txt")
    (tmp_path / "val.txt").write_text("123\n\n123\n456\n")
    report = DataReport()
    assert read_split(tmp_path / "val.txt", report) == ["123", "456"]
    assert report["blank_lines"] == 1 and report["duplicate_image_ids"] == 1
    (tmp_path / "UNRELATED_CAPTIONS").write_text(
        "# format: <imageID> <sentence number>\n1 5\n2 0\n"
    )
    with pytest.raises(DataFormatError, match=r"UNRELATED_CAPTIONS:3: '2 0'"):
        read_unrelated_captions(tmp_path / "UNRELATED_CAPTIONS")


# ---- report -----------------------------------------------------------------------------------


def test_data_report_counts_examples_merge():
    a, b = DataReport(max_examples=2), DataReport()
    a.count("phrases_without_box", example="x1")
    a.count("phrases_without_box", example="x2")
    a.count("phrases_without_box", example="x3")
    b.count("phrases_without_box", 4, example="y")
    b.count("truncated_sentences")
    assert a["phrases_without_box"] == 3 and a["missing"] == 0 and "missing" not in a
    a.merge(b)
    assert a.to_dict() == {
        "phrases_without_box": {"count": 7, "examples": ["x1", "x2"]},
        "truncated_sentences": {"count": 1, "examples": []},
    }
    assert a.summary_lines() == ["phrases_without_box: 7 (e.g. x1; x2)", "truncated_sentences: 1"]


def test_data_format_error_fields():
    e = DataFormatError("a/b.json", "3 fields", "4 fields", key="[2].x")
    assert isinstance(e, ValueError)
    assert (e.path, e.line, e.key, e.expected, e.found) == (
        "a/b.json",
        None,
        "[2].x",
        "4 fields",
        "3 fields",
    )
    assert str(e) == "a/b.json [[2].x]: 3 fields (expected 4 fields)"


def test_empty_sentences_file_is_counted(tmp_path):
    # An empty file gave no example and no count.
    path = tmp_path / "Sentences" / "36979.txt"
    path.parent.mkdir(parents=True)
    path.write_text("")
    report = DataReport()
    assert parse_sentences(path, report) == []
    assert report["empty_sentence_files"] == 1 and report.examples("empty_sentence_files") == [
        "36979.txt"
    ]
    path.write_text("\n\n")
    assert parse_sentences(path, report) == [] and report["empty_sentence_files"] == 2
    assert report.examples("blank_caption_lines") == ["36979.txt:1", "36979.txt:2"]


def test_root_with_an_empty_sentences_file(tmp_path):
    fx = write_flickr30k(tmp_path, n_images=3, seed=1)
    empty = fx.splits["val"][0]
    (tmp_path / "Sentences" / f"{empty}.txt").write_text("")
    report = DataReport()
    links = Flickr30kEntities(tmp_path).coref_links("val", report)
    assert not [x for x in links if x.image_id == empty]
    assert report.examples("empty_sentence_files") == [f"{empty}.txt"]


def test_non_utf8_sentences_name_file_and_line(tmp_path):
    path = _sentences_file(tmp_path, [GOOD, GOOD])
    path.write_bytes(path.read_bytes() + b"[/EN#1/people A caf\xe9 owner] waves .\n")
    with pytest.raises(DataFormatError) as e:
        parse_sentences(path)
    assert str(e.value).startswith(f"{path}:3: bytes b'\\xe9' at column 20") and e.value.line == 3


def test_non_utf8_xml_and_zero_size_name_the_file(tmp_path):
    path = _xml(
        tmp_path, f"<annotation>\n\t{SIZE}\n\t<object><name>1</name></object>\n</annotation>\n"
    )
    path.write_bytes(path.read_bytes().replace(b"<name>1</name>", b"<name>1\xff</name>"))
    with pytest.raises(DataFormatError) as e:
        parse_annotations(path)
    assert str(e.value).startswith(f"{path}:7: malformed XML") and e.value.line == 7
    zero = SIZE.replace("333", "0").replace("500", "0")
    with pytest.raises(
        DataFormatError, match=r"123\.xml \[size\]: image size 0x0 \(expected a positive"
    ):
        parse_annotations(_xml(tmp_path, f"<annotation>{zero}</annotation>"))
