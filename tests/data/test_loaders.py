"""Loaders on the demo data: targets point at the right tokens and regions, negatives and random
baselines are what they claim, SentEval labels match the file, determinism under a seed, counts
in the report, the demo cache, and one batch of each loader through tiny UNITER and LXMERT."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import value_jax
from value_jax.data import collate as C
from value_jax.data.alignment import iou
from value_jax.data.demo import MARKER, make_demo_data
from value_jax.data.errors import NoExamplesError
from value_jax.data.features import open_region_features
from value_jax.data.fixtures.features import write_lxmert_tsv
from value_jax.data.flickr30k import PHRASE_TYPES, Flickr30kEntities
from value_jax.data.loaders import CorefLoader, SentEvalLoader
from value_jax.data.relation_loader import RelationLoader
from value_jax.data.senteval import SPLITS
from value_jax.data.tokenization import read_vocab
from value_jax.data.visual_genome import read_region_descriptions, read_relationships
from value_jax.models import LxmertConfig, UniterConfig, build_model, init_params

FEAT_DIM = 24
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=0, feat_dim=FEAT_DIM)


@pytest.fixture(scope="module")
def coref(demo):
    return CorefLoader(
        demo.flickr_root,
        demo.flickr_features_tsv,
        demo.vocab_uncased,
        lowercase=True,
        split="val",
        batch_size=4,
        seed=0,
    )


def _relations(demo, **kwargs):
    return RelationLoader(
        demo.vg_root,
        demo.vg_features_tsv,
        demo.vocab_cased,
        lowercase=False,
        batch_size=4,
        **kwargs,
    )


@pytest.fixture(scope="module")
def rel(demo):
    return _relations(demo, seed=0)


def _rows(loader):
    """(example, batch, targets, row) for every real row of every batch."""
    for batch, targets in loader:
        for row, index in enumerate(targets["example_index"]):
            if index >= 0:
                yield loader.examples[index], batch, targets, row


def _decode(tokenizer, ids):
    return "".join(tokenizer.id_to_token(i).removeprefix("##") for i in ids)


def _batches_equal(a, b):
    for (ba, ta), (bb, tb) in zip(a, b, strict=True):
        for f in ("input_ids", "text_mask", "region_feats", "region_boxes", "region_mask"):
            if not np.array_equal(getattr(ba, f), getattr(bb, f)):
                return False
        if ta.keys() != tb.keys() or any(not np.array_equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def test_coref_targets_point_at_the_phrase_tokens_and_its_regions(demo, coref):
    flickr = Flickr30kEntities(demo.flickr_root)
    feats = open_region_features(demo.flickr_features_tsv)
    tok = coref.tokenizer
    checked = {"linked": 0, "negative": 0, "rand": 0}
    for ex, batch, t, row in _rows(coref):
        file, line = ex.id.split(":")  # <image id>.txt:<1-based line>
        image_id = file.removesuffix(".txt")
        (sentence,) = [x for x in flickr.sentences(image_id) if x.index == int(line) - 1]
        ann = flickr.annotation(image_id)
        rec = feats[image_id]
        np.testing.assert_allclose(batch.region_boxes[row, : rec.num_boxes], rec.normalized_boxes())
        assert batch.region_mask[row].sum() == rec.num_boxes
        for p in np.flatnonzero(t["coref.mask"][row]):
            tokens = t["coref.tokens"][row, p][t["coref.token_mask"][row, p]]
            ids = batch.input_ids[row, tokens]
            decoded = _decode(tok, ids)
            phrases = [
                ph
                for ph in sentence.phrases
                if "".join(ph.text.split()).lower() == decoded and ann.boxes.get(ph.chain_id)
            ]
            assert phrases, (
                f"{ex.id}: tokens decode to {decoded!r}, no boxed phrase of {sentence.text!r}"
            )
            assert all(batch.text_mask[row, tokens])
            region_box = rec.boxes[t["coref.region"][row, p]][None].astype(np.float64)
            overlaps = [
                iou(region_box, np.array(ann.boxes[ph.chain_id], np.float64)).max()
                for ph in phrases
            ]
            types = [PHRASE_TYPES.index(ph.type) for ph in phrases]
            assert t["coref.type"][row, p] in types
            if t["coref.linked"][row, p]:
                assert max(overlaps) >= THRESHOLD
                # the random region is not one linked to the phrase
                chain = phrases[int(np.argmax(overlaps))].chain_id
                rand_region = rec.boxes[t["coref.rand_region"][row, p]][None].astype(np.float64)
                assert iou(rand_region, np.array(ann.boxes[chain], np.float64)).max() < THRESHOLD
                checked["linked"] += 1
            else:
                assert min(overlaps) < THRESHOLD
                checked["negative"] += 1
            rand_mask = t["coref.rand_token_mask"][row, p]
            if rand_mask.any():
                rand = t["coref.rand_tokens"][row, p][rand_mask]
                assert not np.array_equal(rand, tokens)
                assert not set(rand) & set(tokens)
                rand_text = _decode(tok, batch.input_ids[row, rand])
                chains = {ph.chain_id for ph in phrases}
                assert any(
                    "".join(ph.text.split()).lower() == rand_text and ph.chain_id not in chains
                    for ph in sentence.phrases
                )
                checked["rand"] += 1
    assert checked["linked"] > 20 and checked["negative"] > 20 and checked["rand"] > 20
    # default ratio 1:1
    n_pos = sum(int((t["coref.linked"] & t["coref.mask"]).sum()) for _, t in coref)
    n_neg = sum(int((~t["coref.linked"] & t["coref.mask"]).sum()) for _, t in coref)
    assert n_pos == n_neg


def test_coref_shapes_are_declared_buckets_and_padding_is_masked(coref):
    buckets = C.DEFAULT_BUCKETS
    for batch, t in coref:
        assert batch.batch_size == 4
        assert batch.text_len in buckets.text and batch.num_regions in buckets.regions
        assert (
            t["coref.region"].shape[1] in buckets.items
            and t["coref.tokens"].shape[2] in buckets.tokens
        )
        pad = t["example_index"] < 0
        assert not batch.text_mask[pad].any() and not batch.region_mask[pad].any()
        assert not t["coref.mask"][pad].any() and not t["coref.token_mask"][pad].any()


def test_coref_gold_in_features_links_the_gold_boxes_themselves(demo):
    loader = CorefLoader(
        demo.flickr_root,
        demo.flickr_features_gold_tsv,
        demo.vocab_cased,
        lowercase=False,
        region_source="gold_in_features",
        batch_size=4,
    )
    flickr = Flickr30kEntities(demo.flickr_root)
    feats = open_region_features(demo.flickr_features_gold_tsv)
    assert {s.regions for s in loader.shapes} == {50}  # 36 detections + the gold boxes
    n = 0
    for ex, _batch, t, row in _rows(loader):
        image_id = ex.image_id
        gold = {tuple(b) for boxes in flickr.annotation(image_id).boxes.values() for b in boxes}
        boxes = feats[image_id].boxes
        for p in np.flatnonzero(t["coref.mask"][row] & t["coref.linked"][row]):
            assert tuple(int(v) for v in boxes[t["coref.region"][row, p]]) in gold
            n += 1
    assert n > 20
    assert loader.report["gold_boxes_not_in_regions"] == 0


def test_coref_npz_features_give_the_same_targets(demo, coref):
    npz = CorefLoader(
        demo.flickr_root,
        demo.flickr_features_npz,
        demo.vocab_uncased,
        lowercase=True,
        split="val",
        batch_size=4,
        seed=0,
    )
    assert [e.id for e in npz.examples] == [e.id for e in coref.examples]
    for a, b in zip(npz.examples, coref.examples):
        for k in a.targets:
            np.testing.assert_array_equal(a.targets[k], b.targets[k])


def test_coref_report_counts(demo, coref, tmp_path):
    flickr = Flickr30kEntities(demo.flickr_root)
    val = flickr.image_ids("val")
    notvisual = sum(p.is_notvisual for i in val for s in flickr.sentences(i) for p in s.phrases)
    assert notvisual > 0 and coref.report["notvisual_phrases"] == notvisual
    assert coref.report["phrases_without_box"] > 0
    assert coref.report["images_without_features"] == 0
    # drop one val image from the features file
    dropped = val[1]
    path = tmp_path / "without_one.tsv"
    with open(demo.flickr_features_tsv, newline="") as src, open(path, "w", newline="") as dst:
        for line in src:
            if not line.startswith(dropped + "\t"):
                dst.write(line)
    loader = CorefLoader(
        demo.flickr_root, str(path), demo.vocab_uncased, lowercase=True, batch_size=4
    )
    assert loader.report["images_without_features"] == 1
    assert loader.report.examples("images_without_features") == [dropped]
    assert dropped not in {e.image_id for e in loader.examples}
    # the other images keep exactly their examples (draws are keyed by image and caption)
    kept = [e for e in coref.examples if e.image_id != dropped]
    assert [e.id for e in loader.examples] == [e.id for e in kept]
    for a, b in zip(loader.examples, kept):
        np.testing.assert_array_equal(a.targets["coref.region"], b.targets["coref.region"])
    # truncation is counted, and cut phrases are dropped
    short = CorefLoader(
        demo.flickr_root,
        demo.flickr_features_tsv,
        demo.vocab_uncased,
        lowercase=True,
        batch_size=4,
        max_text_len=6,
    )
    assert short.report["truncated_sentences"] > 0 and short.report["phrases_truncated"] > 0
    assert all(len(e.input_ids) <= 6 for e in short.examples)
    with pytest.raises(ValueError, match="max_text_len"):
        CorefLoader(
            demo.flickr_root,
            demo.flickr_features_tsv,
            demo.vocab_uncased,
            lowercase=True,
            max_text_len=65,
        )


def test_coref_is_deterministic_and_seeded(demo, coref):
    again = CorefLoader(
        demo.flickr_root,
        demo.flickr_features_tsv,
        demo.vocab_uncased,
        lowercase=True,
        split="val",
        batch_size=4,
        seed=0,
    )
    assert _batches_equal(coref, again)
    other = CorefLoader(
        demo.flickr_root,
        demo.flickr_features_tsv,
        demo.vocab_uncased,
        lowercase=True,
        split="val",
        batch_size=4,
        seed=1,
    )
    assert not _batches_equal(coref, other)
    # the gold links do not depend on the seed, only the sampled pairs do
    pos = lambda ld: [
        sorted(e.targets["coref.region"][e.targets["coref.linked"]]) for e in ld.examples
    ]
    assert pos(coref) == pos(other)


def test_relation_targets_match_the_vg_boxes(demo, rel):
    rels = read_relationships(os.path.join(demo.vg_root, "relationships.json"))
    captions = read_region_descriptions(os.path.join(demo.vg_root, "region_descriptions.json"))
    feats = open_region_features(demo.vg_features_tsv)
    n_pos = n_neg = 0
    for ex, batch, t, row in _rows(rel):
        image_id = int(ex.image_id)
        boxes = feats[ex.image_id].boxes.astype(np.float64)
        subj_boxes = np.array([r.subject.box_xyxy for r in rels[image_id]])
        obj_boxes = np.array([r.object.box_xyxy for r in rels[image_id]])
        preds = [r.predicate_norm for r in rels[image_id]]
        text = _decode(rel.tokenizer, batch.input_ids[row, 1 : batch.text_mask[row].sum() - 1])
        assert text in {"".join(c.phrase.split()) for c in captions[image_id]}
        for q in np.flatnonzero(t["rel.mask"][row]):
            s, o = t["rel.subj"][row, q], t["rel.obj"][row, q]
            assert s != o
            s_iou = iou(boxes[s][None], subj_boxes)[0]
            o_iou = iou(boxes[o][None], obj_boxes)[0]
            if t["rel.related"][row, q]:
                pred = rel.predicates[t["rel.pred"][row, q]]
                assert any(
                    s_iou[k] >= THRESHOLD and o_iou[k] >= THRESHOLD and preds[k] == pred
                    for k in range(len(preds))
                )
                n_pos += 1
            else:
                assert t["rel.pred"][row, q] == -1
                s_rev = iou(boxes[s][None], obj_boxes)[0]
                o_rev = iou(boxes[o][None], subj_boxes)[0]
                assert not np.any((s_iou >= THRESHOLD) & (o_iou >= THRESHOLD))
                assert not np.any((s_rev >= THRESHOLD) & (o_rev >= THRESHOLD))
                n_neg += 1
    assert n_pos > 20 and n_pos == n_neg
    assert len(rel.predicates) <= 32 and rel.report["duplicate_relations"] > 0


def test_relation_captions_modes(demo, rel):
    captions = read_region_descriptions(os.path.join(demo.vg_root, "region_descriptions.json"))
    own = {str(i): {"".join(c.phrase.split()) for c in cs} for i, cs in captions.items()}
    mis = _relations(demo, captions="mismatched")
    none = _relations(demo, captions="none")
    for ex in mis.examples:
        text = _decode(mis.tokenizer, ex.input_ids[1:-1])
        assert text not in own[ex.image_id]
        assert any(text in caps for i, caps in own.items() if i != ex.image_id)
    assert all(len(ex.input_ids) == 2 for ex in none.examples)
    # the pairs do not depend on the caption mode
    for a, b in zip(mis.examples, rel.examples):
        np.testing.assert_array_equal(a.targets["rel.subj"], b.targets["rel.subj"])


def test_relation_seed_and_report(demo, rel):
    assert _batches_equal(rel, _relations(demo, seed=0))
    assert not _batches_equal(rel, _relations(demo, seed=3))
    strict = _relations(demo, iou_threshold=0.9)
    assert strict.report["relation_pairs_without_region"] > 0 and strict.examples
    few = _relations(demo, num_predicates=2, max_images=3)
    assert len(few.predicates) == 2 and len(few.examples) <= 3
    assert few.report["relations_of_rare_predicates"] > 0


def test_senteval_labels_and_splits_match_the_file(demo):
    path = os.path.join(demo.senteval_dir, "past_present.txt")
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n").split("\t") for ln in f]
    loader = SentEvalLoader(
        demo.senteval_dir,
        "past_present",
        demo.vocab_uncased,
        True,
        batch_size=16,
        feat_dim=FEAT_DIM,
    )
    assert loader.labels == ("PAST", "PRES")
    seen = set()
    for ex, batch, t, row in _rows(loader):
        line = int(ex.id.split(":")[1])
        split, label, sentence = lines[line - 1]
        assert t["senteval.split"][row] == SPLITS.index(split)
        assert loader.labels[t["senteval.label"][row]] == label
        assert t["senteval.mask"][row]
        assert (
            _decode(loader.tokenizer, batch.input_ids[row, 1 : batch.text_mask[row].sum() - 1])
            == "".join(sentence.split()).lower()
        )
        assert batch.num_regions == 1 and not batch.region_mask[row].any()
        seen.add(line)
    assert seen == set(range(1, len(lines) + 1))
    for _batch, t in loader:
        assert not t["senteval.mask"][t["example_index"] < 0].any()
    sample = SentEvalLoader(
        demo.senteval_dir,
        "past_present",
        demo.vocab_uncased,
        True,
        batch_size=16,
        per_split=10,
        seed=0,
        feat_dim=FEAT_DIM,
    )
    splits = np.concatenate([t["senteval.split"][t["senteval.mask"]] for _, t in sample])
    assert np.bincount(splits).tolist() == [10, 10, 10]
    other = SentEvalLoader(
        demo.senteval_dir,
        "past_present",
        demo.vocab_uncased,
        True,
        batch_size=16,
        per_split=10,
        seed=1,
        feat_dim=FEAT_DIM,
    )
    assert [e.id for e in other.examples] != [e.id for e in sample.examples]


def test_demo_is_cached_and_rebuilt_when_parameters_change(tmp_path):
    root = tmp_path / "demo"
    a = make_demo_data(root, seed=0, n_images=3, feat_dim=8, n_vg_images=2, n_senteval=4)
    stamp = os.stat(os.path.join(a.root, MARKER)).st_mtime_ns
    b = make_demo_data(root, seed=0, n_images=3, feat_dim=8, n_vg_images=2, n_senteval=4)
    assert a == b and os.stat(os.path.join(b.root, MARKER)).st_mtime_ns == stamp
    c = make_demo_data(root, seed=0, n_images=3, feat_dim=16, n_vg_images=2, n_senteval=4)
    assert json.load(open(os.path.join(c.root, MARKER)))["feat_dim"] == 16
    first = Flickr30kEntities(c.flickr_root).image_ids("train")[0]
    assert open_region_features(c.flickr_features_tsv)[first].features.shape[1] == 16
    shutil.rmtree(c.vg_root)
    with open(os.path.join(c.root, MARKER), "w") as f:
        f.write("{not json")  # an unreadable marker: rebuilt
    d = make_demo_data(root, seed=0, n_images=3, feat_dim=16, n_vg_images=2, n_senteval=4)
    assert os.path.isfile(d.vg_features_tsv)
    # a directory that is not a demo tree is never replaced
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="results"):
        make_demo_data(other, n_images=3, feat_dim=8, n_vg_images=2, n_senteval=4)
    assert (other / "keep.txt").read_text() == "precious"
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # no temp trees left
    for vocab, lowercase in ((d.vocab_cased, False), (d.vocab_uncased, True)):
        assert (
            any(
                any("A" <= ch <= "Z" for ch in t)
                for t in read_vocab(vocab)
                if not t.startswith("[")
            )
            != lowercase
        )


@pytest.mark.parametrize("model_type", ["uniter", "lxmert"])
def test_one_batch_of_each_loader_runs_through_a_tiny_model(demo, coref, rel, model_type):
    senteval = SentEvalLoader(
        demo.senteval_dir, "subj_number", demo.vocab_cased, False, batch_size=4, feat_dim=FEAT_DIM
    )
    vocab = max(len(read_vocab(demo.vocab_cased)), len(read_vocab(demo.vocab_uncased)))
    config = (
        UniterConfig.tiny(vocab_size=vocab, img_dim=FEAT_DIM)
        if model_type == "uniter"
        else LxmertConfig.tiny(vocab_size=vocab, visual_feat_dim=FEAT_DIM)
    )
    model = build_model(config)
    params = init_params(model, jax.random.PRNGKey(0))
    for loader in (coref, rel, senteval):
        batch, targets = next(iter(loader))
        trace = value_jax.run(model, params, batch)
        text, _ = trace.hidden_states("text")
        assert np.isfinite(np.asarray(text)).all()
        v2t, _ = trace.blocks("v2t")
        assert v2t.shape[1:] == (4, config.num_heads, batch.num_regions, batch.text_len)
        assert np.isfinite(np.asarray(v2t)).all()


# ---- what filtering can leave: non-finite features, nothing at all ---------------------------


def _all_finite(loader):
    for batch, _targets in loader:
        assert np.isfinite(batch.region_feats).all() and np.isfinite(batch.region_boxes).all()


def test_coref_drops_an_image_with_a_nan_feature(demo, coref, tmp_path):
    # One NaN used to reach the batch and turn every table cell downstream into nan, exit 0.
    with open_region_features(demo.flickr_features_tsv) as reader:
        records = [reader[i] for i in reader]
    bad = coref.examples[0].image_id
    (rec,) = [r for r in records if r.image_id == bad]
    rec.features[3, 5] = np.nan
    path = tmp_path / "with_nan.tsv"
    write_lxmert_tsv(path, records)
    loader = CorefLoader(
        demo.flickr_root, str(path), demo.vocab_uncased, lowercase=True, batch_size=4
    )
    assert loader.report["images_with_nonfinite_features"] == 1
    (example,) = loader.report.examples("images_with_nonfinite_features")
    line = [r.image_id for r in records].index(bad) + 1
    assert (
        example.startswith(f"{path}:{line} image {bad!r}: features: 1 non-finite")
        and "at box 3" in example
    )
    assert bad not in {e.image_id for e in loader.examples}
    assert [e.id for e in loader.examples] == [e.id for e in coref.examples if e.image_id != bad]
    _all_finite(loader)


@pytest.mark.parametrize("max_images", [0, -1])
def test_coref_with_no_image_left_says_so(demo, max_images):
    # --max_images=-1 used to give an empty loader and KeyError: 'v2t.sum' in the probes.
    with pytest.raises(
        NoExamplesError, match=rf"no examples left .*max_images={max_images} keeps no image"
    ):
        CorefLoader(
            demo.flickr_root,
            demo.flickr_features_tsv,
            demo.vocab_uncased,
            lowercase=True,
            max_images=max_images,
        )


def test_coref_with_every_image_dropped_lists_the_report(demo, tmp_path):
    path = tmp_path / "other_images.tsv"
    write_lxmert_tsv(path, [])
    with pytest.raises(NoExamplesError) as err:
        CorefLoader(demo.flickr_root, str(path), demo.vocab_uncased, lowercase=True)
    n_val = len(Flickr30kEntities(demo.flickr_root).image_ids("val"))
    assert f"images_without_features: {n_val}" in str(err.value)
    assert err.value.report["images_without_features"] == n_val


def test_relations_with_no_usable_pair_say_so(demo):
    # No region within IoU 1.01 of any box: before, KeyError: 'pair.count' in the probes.
    with pytest.raises(NoExamplesError, match=r"no examples left .*Visual Genome") as err:
        _relations(demo, iou_threshold=1.01)
    assert "relation_pairs_without_region" in str(err.value)
    assert err.value.report["images_without_relation_pairs"] > 0


def test_relations_negative_max_images_keeps_none(demo, rel):
    # A plain slice [:-1] kept every image but the last.
    with pytest.raises(NoExamplesError, match="max_images=-1 keeps no image"):
        _relations(demo, max_images=-1)
    assert len(_relations(demo, max_images=1).examples) == 1


def test_senteval_empty_file_says_so(demo, tmp_path):
    # Before: ValueError: axes don't match array, far from the cause.
    (tmp_path / "past_present.txt").write_text("")
    with pytest.raises(
        NoExamplesError,
        match=r"no examples left from SentEval task past_present in .*"
        r"past_present\.txt",
    ) as err:
        SentEvalLoader(tmp_path, "past_present", demo.vocab_uncased, True, feat_dim=FEAT_DIM)
    assert err.value.report["empty_probing_splits"] == 3


def test_example_ids_cite_one_based_lines(demo, coref):
    ex = coref.examples[0]
    file, line = ex.id.split(":")
    sentences = Flickr30kEntities(demo.flickr_root).sentences(ex.image_id)
    assert file == f"{ex.image_id}.txt" and int(line) - 1 in {s.index for s in sentences}
    loader = SentEvalLoader(
        demo.senteval_dir, "past_present", demo.vocab_uncased, True, feat_dim=FEAT_DIM
    )
    assert loader.examples[0].id == "past_present.txt:1"
