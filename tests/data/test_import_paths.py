"""The data modules that were split keep their old import paths: a name the one-module version
defined is importable from the old module and is the same object as in its new home."""

import importlib

import pytest

# A sample of each module's moved names, public and private.
MOVED = {
    "value_jax.data.loaders": {
        "value_jax.data.loader_base": ("pixel_boxes", "_FeatureLoader", "ExampleLoader"),
        "value_jax.data.relation_loader": (
            "_relation_targets",
            "prepare_relations",
            "RelationLoader",
        ),
    },
    "value_jax.data.collate": {
        "value_jax.data.batch_plan": ("_truncate", "plan_batches", "BatchPlan")
    },
    "value_jax.data.ablation_data": {"value_jax.data.ablation_loader": ("AblationLoader",)},
    "value_jax.data.features": {
        "value_jax.data.features.base": ("RegionRecord", "_Reader", "_LmdbReader", "_place"),
        "value_jax.data.features.fields": ("_record_from_item", "_b64decode_strict", "_pick"),
        "value_jax.data.features.lxmert_tsv": ("LxmertTsvReader", "_build_tsv_index"),
        "value_jax.data.features.uniter": ("UniterNpzDirReader", "_UniterMixin"),
        "value_jax.data.features.volta": ("VoltaLmdbReader",),
    },
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_names_are_the_same_objects_under_the_old_path(old):
    module = importlib.import_module(old)
    for new, names in MOVED[old].items():
        home = importlib.import_module(new)
        for name in names:
            assert getattr(module, name) is getattr(home, name), (old, name)


def test_old_all_and_unknown_names():
    loaders = importlib.import_module("value_jax.data.loaders")
    namespace = {}
    exec("from value_jax.data.loaders import *", namespace)
    assert {"RelationLoader", "prepare_relations", "CorefLoader"} <= set(namespace)
    assert set(loaders.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        loaders.nope  # noqa: B018
