"""Explorer stores built once per test session from the planted demo (tiny models whose
coreference heads are known: UNITER layer 3 head 2 and LXMERT cross1.l2v head 2 send each key word
to the regions of its phrase)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import value_jax
from value_jax.data.demo import make_explore_demo
from value_jax.data.loaders import ExampleLoader
from value_jax.data.tokenization import WordPieceTokenizer
from value_jax.viz import compute, sources
from value_jax.viz.store import open_store

MAX_IMAGES = 2  # val images of the planted data: 5 captions each


@dataclasses.dataclass
class Built:
    demo: object
    model: object
    params: object
    session: compute.Session
    infos: list
    store_dir: str

    def open(self):
        return open_store(self.store_dir)

    def trace(self, index: int):
        """The model's Trace of stored example `index` (a batch of one, no padding rows)."""
        want = self.open().examples[index]["id"]
        info = [i for i in self.infos if i.example.id == want][0]
        batch, _ = next(iter(ExampleLoader([info.example], 1, regions=self.session.regions)))
        return value_jax.run(self.model, self.params, batch), batch


def build(root, model_type: str) -> Built:
    demo = make_explore_demo(root / "demo", model_type)
    model, params = value_jax.load(demo.checkpoint)
    tok = WordPieceTokenizer(demo.vocab, demo.lowercase)
    regions = sources.open_regions(demo.features, labels=demo.region_labels)
    infos = sources.flickr_examples(
        demo.flickr_root, regions, tok, demo.images, max_images=MAX_IMAGES
    )
    session = compute.Session(model, params, tok, regions, batch_size=8)
    store_dir = str(root / "store")
    compute.write_store(session, infos, store_dir)
    return Built(demo, model, params, session, infos, store_dir)


@pytest.fixture(scope="session")
def lxmert_built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("explore_lxmert"), "lxmert")


@pytest.fixture(scope="session")
def uniter_built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("explore_uniter"), "uniter")


def word_position(tokens, word):
    return [i for i, t in enumerate(tokens) if t.lower() == word][0]


__all__ = ["Built", "build", "word_position", "np"]
