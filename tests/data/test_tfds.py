"""TFDS builders (array_record, no TensorFlow): build on the demo data, read every record back
equal to what the loaders prepared, and batch them into the loaders' exact batches."""

import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from value_jax.data.demo import make_demo_data  # noqa: E402
from value_jax.data.features import open_region_features  # noqa: E402
from value_jax.data.flickr30k import PHRASE_TYPES  # noqa: E402
from value_jax.data.loaders import CorefLoader  # noqa: E402
from value_jax.data.relation_loader import RelationLoader  # noqa: E402
from value_jax.data.tfds_builders import (  # noqa: E402
    CorefConfig,
    RelationConfig,
    ValueCoref,
    ValueRelations,
    prepared_loader,
    read_examples,
)

FEAT_DIM = 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(
        tmp_path_factory.mktemp("demo") / "data", seed=0, n_images=9, feat_dim=FEAT_DIM
    )


def _assert_records_match(examples, loader, features_path):
    feats = open_region_features(features_path)
    assert [e.id for e in examples] == [e.id for e in loader.examples]
    for got, want in zip(examples, loader.examples):
        assert got.image_id == want.image_id and got.num_regions == want.num_regions
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        assert got.targets.keys() == want.targets.keys()
        for k in want.targets:
            assert got.targets[k].dtype == want.targets[k].dtype, k
            np.testing.assert_array_equal(got.targets[k], want.targets[k], err_msg=f"{got.id} {k}")
        rec = feats[want.image_id]
        np.testing.assert_array_equal(got.region_feats, rec.features)
        np.testing.assert_array_equal(got.region_boxes, rec.normalized_boxes())


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (ba, ta), (bb, tb) in zip(a, b):
        for f in ("input_ids", "text_mask", "region_feats", "region_boxes", "region_mask"):
            np.testing.assert_array_equal(getattr(ba, f), getattr(bb, f), err_msg=f)
        assert ta.keys() == tb.keys()
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def test_coref_builder_from_manual_dir_round_trips(demo, tmp_path):
    # relative paths resolve inside manual_dir, as MANUAL_DOWNLOAD_INSTRUCTIONS describe
    config = CorefConfig(
        name="demo",
        flickr_root="flickr30k",
        features="flickr30k_obj36.tsv",
        vocab="vocab_uncased.txt",
        lowercase=True,
        splits=("val", "test"),
        seed=0,
    )
    builder = ValueCoref(config=config, data_dir=str(tmp_path))  # array_record by default
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=demo.root))
    assert "manual_dir" in ValueCoref.MANUAL_DOWNLOAD_INSTRUCTIONS

    reread = ValueCoref(config=config, data_dir=str(tmp_path))
    assert "tensorflow" not in sys.modules
    assert reread.info.file_format.value == "array_record"
    assert reread.info.metadata["types"] == list(PHRASE_TYPES)
    for split in ("val", "test"):
        loader = CorefLoader(
            demo.flickr_root,
            demo.flickr_features_tsv,
            demo.vocab_uncased,
            lowercase=True,
            split=split,
            batch_size=4,
            seed=0,
        )
        source = reread.as_data_source(split)
        assert len(source) == len(loader.examples) > 0
        ids = [source[i]["id"].decode() for i in range(len(source))]
        assert sorted(ids) == sorted(e.id for e in loader.examples)
        _assert_records_match(read_examples(reread, split), loader, demo.flickr_features_tsv)
        _assert_same_batches(prepared_loader(reread, split, 4), loader)
        lazy = prepared_loader(reread, split, 4, lazy=True)  # features read per batch
        assert all(e.region_feats is None for e in lazy.examples)
        _assert_same_batches(lazy, loader)
        assert lazy.report == loader.report
        assert (
            reread.info.metadata["report"][split]["notvisual_phrases"]["count"]
            == loader.report["notvisual_phrases"]
        )


def test_relation_builder_with_absolute_paths_round_trips(demo, tmp_path):
    config = RelationConfig(
        name="demo",
        vg_root=demo.vg_root,
        features=demo.vg_features_tsv,
        vocab=demo.vocab_cased,
        lowercase=False,
        captions="mismatched",
        seed=2,
    )
    builder = ValueRelations(config=config, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    loader = RelationLoader(
        demo.vg_root,
        demo.vg_features_tsv,
        demo.vocab_cased,
        lowercase=False,
        batch_size=4,
        seed=2,
        captions="mismatched",
    )
    reread = ValueRelations(config=config, data_dir=str(tmp_path))
    assert tuple(reread.info.metadata["predicates"]) == loader.predicates
    assert len(reread.as_data_source("full")) == len(loader.examples) > 0
    _assert_records_match(read_examples(reread, "full"), loader, demo.vg_features_tsv)
    _assert_same_batches(prepared_loader(reread, "full", 4), loader)


def test_builders_resolve_their_package_from_anywhere(tmp_path):
    code = (
        "from value_jax.data.tfds_builders import ValueCoref, ValueRelations\n"
        "import value_jax.data, os\n"
        "pkg = os.path.dirname(value_jax.data.__file__)\n"
        "for b in (ValueCoref, ValueRelations):\n"
        "    assert os.path.dirname(str(b.code_path)) == pkg, b.code_path\n"
        "    assert str(b._get_pkg_dir_path()) == pkg\n"
        "print(ValueCoref.name, ValueRelations.name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["value_coref", "value_relations"]
