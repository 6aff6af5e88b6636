"""The one layer vocabulary: every sown name parses, round-trips, sorts in forward order and has
the label the tables and JSON use."""

import pytest

from value_jax import names as N
from value_jax.models import LxmertConfig, UniterConfig
from value_jax.names import LayerId
from value_jax.trace import Layout


def test_forward_order():
    assert N.sort_names(["layer10", "layer2", "layer1", "embeddings"]) == [
        "embeddings",
        "layer1",
        "layer2",
        "layer10",
    ]
    assert N.sort_names(
        [
            "cross1.v2l",
            "visn1",
            "cross1.l2v",
            "lang9",
            "cross1.visn_self",
            "cross1.lang_self",
            "visn.embeddings",
            "lang.embeddings",
            "cross1.lang",
        ]
    ) == [
        "lang.embeddings",
        "visn.embeddings",
        "lang9",
        "visn1",
        "cross1.l2v",
        "cross1.v2l",
        "cross1.lang_self",
        "cross1.visn_self",
        "cross1.lang",
    ]


@pytest.mark.parametrize("config", [UniterConfig(), LxmertConfig()], ids=["uniter", "lxmert"])
def test_every_sown_name_round_trips(config):
    layout = Layout.from_config(config)
    for name in layout.attention + layout.hidden:
        assert LayerId.parse(name).name == name


@pytest.mark.parametrize(
    "name, label, directions, modalities",
    [
        ("layer3", "3", ("t2t", "t2v", "v2t", "v2v"), ("text", "image")),
        ("embeddings", "emb", ("t2t", "t2v", "v2t", "v2v"), ("text", "image")),
        ("lang2", "lang2", ("t2t",), ("text",)),
        ("visn.embeddings", "visn.emb", ("v2v",), ("image",)),
        ("cross2.l2v", "x2", ("t2v",), ()),
        ("cross2.v2l", "x2", ("v2t",), ()),
        ("cross2.visn_self", "x2", ("v2v",), ()),
        ("cross2.lang", "x2", (), ("text",)),
    ],
)
def test_labels_directions_modalities(name, label, directions, modalities):
    layer = LayerId.parse(name)
    assert (layer.label, layer.directions(), layer.modalities()) == (label, directions, modalities)


def test_head_labels_as_tables_show_them():
    assert N.head_label("layer3", 1) == "3-2"
    assert N.head_label("cross2.visn_self", 3) == "x2-4"
    assert N.head_label("visn2", 0) == "visn2-1"


@pytest.mark.parametrize(
    "bad",
    [
        "layer0",
        "layer03",
        "layer",
        "cross2",
        "cross2.up",
        "lang2.l2v",
        "decoder3",
        "layer3.lang",
        "",
        "attention.layer3",
    ],
)
def test_other_names_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="not a layer name|bad layer"):
        LayerId.parse(bad)


def test_sown_keys():
    assert N.sown(N.ATTENTION, "cross1.l2v") == "attention.cross1.l2v"
    assert N.unsown("hidden.lang.embeddings") == ("hidden", "lang.embeddings")
    with pytest.raises(ValueError):
        N.unsown("intermediate.layer3")
