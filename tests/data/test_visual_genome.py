"""Visual Genome readers (v1.2 real sample, v1.2 / v1.0 fixtures), predicate normalisation,
VALUE's relation sampling and the SGG dictionaries."""

import collections
import json
import pathlib

import pytest

from value_jax.data.errors import DataFormatError, DataReport
from value_jax.data.fixtures.annotations import write_visual_genome
from value_jax.data.visual_genome import (
    VGImage,
    VGObject,
    load_sgg_dicts,
    normalize_predicate,
    read_image_data,
    read_objects,
    read_region_descriptions,
    read_relations_vocab,
    read_relationships,
    sample_relation_pairs,
)

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
VG = DATA / "visual_genome"
VOCAB = DATA / "bottom_up_attention" / "relations_vocab.txt"


@pytest.fixture
def real():
    if not (VG / "relationships.json").exists():
        pytest.skip(f"real Visual Genome sample not found at {VG}")
    return VG


@pytest.fixture
def synonyms():
    if not VOCAB.exists():
        pytest.skip(f"relations_vocab.txt not found at {VOCAB}")
    return read_relations_vocab(VOCAB)


# ---- real files -------------------------------------------------------------------------------


def test_real_relationships(real):
    rels = read_relationships(real / "relationships.json")
    assert {k: len(v) for k, v in rels.items()} == {1: 41, 2: 23, 3: 50, 4: 16, 5: 28}
    r = rels[1][0]
    assert (r.relationship_id, r.image_id, r.predicate, r.predicate_norm, r.synsets) == (
        15927,
        1,
        "ON",
        "on",
        ("along.r.01",),
    )
    assert r.subject == VGObject(
        5045, "shade", (119.0, 338.0, 393.0, 530.0), ("shade.n.01",), ("shade",)
    )
    assert r.object == VGObject(
        5046, "street", (77.0, 328.0, 791.0, 590.0), ("street.n.01",), ("street",)
    )
    r2 = rels[1][1]
    assert (
        r2.relationship_id,
        r2.predicate,
        r2.subject.name,
        r2.subject.object_id,
        r2.object.name,
        r2.object.object_id,
    ) == (15928, "wears", "man", 1058529, "sneakers", 5048)
    raw = collections.Counter(r.predicate for rs in rels.values() for r in rs)
    assert raw["ON"] == 47 and raw["WEARING"] == 8 and raw["wears"] == 6 and raw["parked on"] == 7
    norm = collections.Counter(r.predicate_norm for rs in rels.values() for r in rs)
    assert norm["on"] == 47 and norm["wearing"] == 8 and norm["in"] == 1  # "IN"


def test_real_objects_images_regions(real):
    objs = read_objects(real / "objects.json")
    assert {k: len(v) for k, v in objs.items()} == {1: 40, 2: 27, 3: 52, 4: 24, 5: 34}
    assert objs[1][0] == VGObject(
        1058498, "clock", (421.0, 91.0, 500.0, 430.0), ("clock.n.01",), ("clock",)
    )
    attrs = read_objects(real / "attributes.json")
    assert attrs[1][0].attributes == ("green", "tall")
    images = read_image_data(real / "image_data.json")
    assert images[1] == VGImage(
        1, 800, 600, "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", None, None
    )
    assert (images[3].width, images[3].height) == (640, 480)
    regions = read_region_descriptions(real / "region_descriptions.json")
    assert {k: len(v) for k, v in regions.items()} == {1: 262, 2: 256, 3: 255, 4: 257, 5: 248}
    g = regions[1][0]
    assert (g.region_id, g.phrase, g.box_xyxy) == (
        1382,
        "the clock is green in colour",
        (421.0, 57.0, 503.0, 196.0),
    )


def test_relations_vocab_and_normalisation(synonyms):
    assert len(set(synonyms.values())) == 20
    assert (
        synonyms["on top of"] == "on"
        and synonyms["wears"] == "wearing"
        and synonyms["at"] == "near"
    )
    assert synonyms["swimming"] == "swimming in"  # " swimming" with a leading space in the file
    assert synonyms["looking at"] == "looking at"  # listed twice on its own line: not a conflict
    assert normalize_predicate("  Parked   ON ") == "parked on"
    assert normalize_predicate("ON top  of", synonyms) == "on"
    assert normalize_predicate("docked in", synonyms) == "docked in"


def test_relations_vocab_conflict(tmp_path):
    (tmp_path / "relations_vocab.txt").write_text("on,on top of\nabove,on top of")
    with pytest.raises(
        DataFormatError, match=r"relations_vocab\.txt:2: 'on top of' already maps to 'on'"
    ):
        read_relations_vocab(tmp_path / "relations_vocab.txt")


def test_real_sampling_rules(real, synonyms):
    rels = read_relationships(real / "relationships.json", synonyms=synonyms)
    report = DataReport()
    s = sample_relation_pairs(
        rels,
        num_predicates=4,
        max_pairs_per_predicate=10,
        max_same_type_per_image=3,
        seed=0,
        report=report,
    )
    # Ranking after removing duplicates (same image, subject, object, predicate).
    unique = {
        (r.image_id, r.subject.object_id, r.object.object_id, r.predicate_norm)
        for rs in rels.values()
        for r in rs
        if r.subject.object_id != r.object.object_id
    }
    freq = collections.Counter(k[3] for k in unique)
    assert s.predicates == tuple(sorted(freq, key=lambda p: (-freq[p], p))[:4])
    assert s.predicates[0] == "on"
    per_image = collections.Counter((r.image_id, r.predicate_norm) for r in s.relations)
    assert max(per_image.values()) <= 3
    per_pred = collections.Counter(r.predicate_norm for r in s.relations)
    assert dict(per_pred) == s.counts and max(per_pred.values()) <= 10
    assert set(per_pred) == set(s.predicates)
    total = sum(len(v) for v in rels.values())
    dropped = sum(
        report[k]
        for k in (
            "empty_predicates",
            "self_relations",
            "duplicate_relations",
            "relations_of_rare_predicates",
            "over_per_image_cap",
            "over_per_predicate_cap",
        )
    )
    assert len(s.relations) + dropped == total
    assert (
        report["duplicate_relations"]
        == sum(len(v) for v in rels.values()) - len(unique) - report["self_relations"]
    )
    assert report["over_per_predicate_cap"] > 0 and report["over_per_image_cap"] > 0
    keys = [(r.image_id, r.relationship_id) for r in s.relations]
    assert keys == sorted(keys)


def test_sampling_is_seeded_and_order_free(real):
    rels = read_relationships(real / "relationships.json")
    kw = dict(num_predicates=3, max_pairs_per_predicate=8, max_same_type_per_image=2)
    a = sample_relation_pairs(rels, seed=1, **kw)
    b = sample_relation_pairs(list(reversed([r for rs in rels.values() for r in rs])), seed=1, **kw)
    assert a == b
    others = [sample_relation_pairs(rels, seed=k, **kw).relations for k in range(2, 6)]
    assert any(o != a.relations for o in others)
    full = sample_relation_pairs(rels, seed=0)  # the sample has fewer than 32 predicates: all kept
    assert set(full.predicates) == {r.predicate_norm for rs in rels.values() for r in rs}


def test_real_sgg_dicts(real):
    d = load_sgg_dicts(real / "VG-SGG-dicts-with-attri.json")
    assert (len(d.idx_to_label), len(d.idx_to_predicate), len(d.idx_to_attribute)) == (150, 50, 200)
    assert (
        d.idx_to_label[1] == "airplane"
        and d.idx_to_label[150] == "zebra"
        and d.label_to_idx["zebra"] == 150
    )
    assert d.idx_to_predicate[50] == "with" and d.predicate_to_idx["with"] == 50
    assert 0 not in d.idx_to_label and d.predicate_count["and"] == 3477


def test_sgg_dicts_errors(tmp_path, real):
    good = json.loads((real / "VG-SGG-dicts-with-attri.json").read_text())
    bad = dict(good, idx_to_label={**good["idx_to_label"], "0": "background"})
    (tmp_path / "d.json").write_text(json.dumps(bad))
    with pytest.raises(DataFormatError, match=r"d\.json \[idx_to_label\['0'\]\]"):
        load_sgg_dicts(tmp_path / "d.json")
    bad = dict(good, label_to_idx={**good["label_to_idx"], "zebra": 149})
    (tmp_path / "d.json").write_text(json.dumps(bad))
    with pytest.raises(
        DataFormatError, match=r"\[label_to_idx\['zebra'\]\]: 'zebra': 149 \(expected the inverse"
    ):
        load_sgg_dicts(tmp_path / "d.json")
    bad = {k: v for k, v in good.items() if "attribute" not in k}
    (tmp_path / "d.json").write_text(json.dumps(bad))
    assert load_sgg_dicts(tmp_path / "d.json").idx_to_attribute == {}


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.0"])
def test_fixture_round_trip(tmp_path, version):
    m = write_visual_genome(tmp_path, n_images=5, seed=4, version=version)
    assert read_image_data(tmp_path / "image_data.json") == m.images
    assert read_objects(tmp_path / "objects.json") == m.objects
    assert read_relationships(tmp_path / "relationships.json") == m.relations
    assert read_region_descriptions(tmp_path / "region_descriptions.json") == m.regions
    assert read_objects(tmp_path / "attributes.json") == m.attributes
    raw = json.loads((tmp_path / "relationships.json").read_text())
    r0 = raw[0]["relationships"][0]
    if version == "1.0":
        assert "id" in raw[0] and "id" in r0 and "synsets" not in r0 and "id" in r0["subject"]
    else:
        assert "image_id" in raw[0] and "relationship_id" in r0 and r0["subject"]["names"]
        assert (
            "merged_object_ids" in r0["subject"] and "name" in raw[0]["relationships"][1]["subject"]
        )


def test_fixture_sampling_counts_duplicates(tmp_path):
    m = write_visual_genome(tmp_path, n_images=6, seed=0)
    report = DataReport()
    s = sample_relation_pairs(
        m.relations, num_predicates=5, max_same_type_per_image=1, seed=0, report=report
    )
    assert report["duplicate_relations"] >= 6  # each image repeats its first relation
    assert all(v <= 6 for v in s.counts.values())


# ---- malformed input --------------------------------------------------------------------------


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_malformed_entries_name_file_and_entry(tmp_path):
    end = {"object_id": 1, "name": "man", "x": 0, "y": 0, "w": 5, "h": 5}
    rel = {
        "predicate": "on",
        "relationship_id": 7,
        "subject": end,
        "object": dict(end, object_id=2),
    }
    path = _write(
        tmp_path,
        "relationships.json",
        [
            {"image_id": 1, "relationships": [rel]},
            {
                "image_id": 2,
                "relationships": [
                    rel,
                    dict(rel, object={"object_id": 3, "name": "x", "y": 0, "w": 1, "h": 1}),
                ],
            },
        ],
    )
    with pytest.raises(DataFormatError) as e:
        read_relationships(path)
    assert str(e.value).startswith(f"{path} [[1] image 2: relationships[1].object]: no 'x'")
    path = _write(
        tmp_path, "relationships.json", [{"image_id": 1, "relationships": [dict(rel, predicate=3)]}]
    )
    with pytest.raises(
        DataFormatError,
        match=r"relationships\[0\]\.predicate\]: 3 \(int\) \(expected a str value\)",
    ):
        read_relationships(path)
    path = _write(
        tmp_path,
        "relationships.json",
        [{"image_id": 1, "relationships": [{k: v for k, v in rel.items() if k != "subject"}]}],
    )
    with pytest.raises(DataFormatError, match=r"no 'subject'"):
        read_relationships(path)
    path = _write(
        tmp_path, "objects.json", [{"image_id": 1, "objects": []}, {"image_id": 1, "objects": []}]
    )
    with pytest.raises(DataFormatError, match=r"objects\.json \[\[1\]\]: image id 1 again"):
        read_objects(path)
    path = _write(tmp_path, "objects.json", [{"objects": []}])
    with pytest.raises(DataFormatError, match=r"objects\.json \[\[0\]\]: no 'image_id' / 'id'"):
        read_objects(path)
    path = _write(tmp_path, "objects.json", {"image_id": 1})
    with pytest.raises(DataFormatError, match=r"top-level dict"):
        read_objects(path)
    path = _write(tmp_path, "objects.json", '[{"image_id": 1,\n "objects": [}]')
    with pytest.raises(DataFormatError, match=r"objects\.json:2: invalid JSON"):
        read_objects(path)
    path = _write(tmp_path, "objects.json", [{"image_id": 1, "objects": [dict(end, names=[])]}])
    with pytest.raises(DataFormatError, match=r"objects\[0\]\]: names \[\]"):
        read_objects(path)


def test_degenerate_and_empty_are_counted(tmp_path):
    end = {"object_id": 1, "name": "man", "x": 0, "y": 0, "w": 0, "h": 5}
    rel = {"predicate": "  ", "relationship_id": 7, "subject": end, "object": end}
    report = DataReport()
    rels = read_relationships(
        _write(tmp_path, "r.json", [{"image_id": 1, "relationships": [rel]}]), report
    )
    assert report["degenerate_boxes"] == 2 and report["empty_predicates"] == 1
    sample_relation_pairs(rels, report=report)
    assert report["empty_predicates"] == 2


def test_v10_attributes_name_objects_with_object_names(tmp_path):
    # read_objects used to refuse every v1.0 attributes.json entry (no 'names' / 'name').
    m = write_visual_genome(tmp_path, n_images=3, seed=2, version="1.0")
    raw = json.loads((tmp_path / "attributes.json").read_text())
    first = raw[0]["attributes"][0]
    assert "id" in raw[0] and "image_id" not in raw[0]
    assert (
        "object_names" in first and "names" not in first and "id" in first and "attributes" in first
    )
    assert any("attributes" not in a for a in raw[0]["attributes"])  # as in the real file
    attrs = read_objects(tmp_path / "attributes.json")
    assert attrs == m.attributes and attrs.keys() == m.objects.keys()
    assert [o.name for o in attrs[1]] == [o.name for o in m.objects[1]]
    assert attrs[1][0].attributes and attrs[1][0].names == (attrs[1][0].name,)
    path = _write(
        tmp_path,
        "a.json",
        [
            {
                "id": 1,
                "attributes": [
                    {
                        "id": 5,
                        "x": 1,
                        "y": 2,
                        "w": 3,
                        "h": 4,
                        "object_names": ["clock", "tower"],
                        "attributes": ["green"],
                    }
                ],
            }
        ],
    )
    assert read_objects(path) == {
        1: [VGObject(5, "clock", (1.0, 2.0, 4.0, 6.0), (), ("clock", "tower"), ("green",))]
    }


def test_non_utf8_json_names_file_and_line(tmp_path):
    path = tmp_path / "objects.json"
    path.write_bytes(
        b'[{"image_id": 1,\n "objects": [{"object_id": 1, "names": ["caf\xe9"],'
        b' "x": 0, "y": 0, "w": 1, "h": 1}]}]'
    )
    with pytest.raises(
        DataFormatError, match=r"objects\.json:2: bytes b'\\xe9' at column 45 .*UTF-8"
    ):
        read_objects(path)


def test_zero_image_size_names_the_entry(tmp_path):
    path = _write(
        tmp_path,
        "image_data.json",
        [{"image_id": 1, "width": 800, "height": 600}, {"image_id": 2, "width": 0, "height": 0}],
    )
    with pytest.raises(
        DataFormatError, match=r"image_data\.json \[\[1\] image 2\]: image size 0x0"
    ):
        read_image_data(path)


def test_non_finite_json_number_is_refused(tmp_path):
    path = _write(
        tmp_path,
        "objects.json",
        '[{"image_id": 1, "objects": [{"object_id": 1, "names": ["a"],'
        ' "x": NaN, "y": 0, "w": 1, "h": 1}]}]',
    )
    with pytest.raises(
        DataFormatError, match=r"objects\[0\]\.x\]: nan \(float\) \(expected a number value\)"
    ):
        read_objects(path)
