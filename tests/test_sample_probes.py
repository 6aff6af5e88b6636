"""Per-sample analyses count a caption once, however many batch rows its items take."""

import jax
import numpy as np
import pytest

from value_jax.data import batch_plan as BP
from value_jax.data import collate as C
from value_jax.data.loaders import ExampleLoader
from value_jax.models import UniterConfig, build_model, init_params
from value_jax.probes.fusion import FusionProbe
from value_jax.probes.head_summary import HeadSummaryProbe
from value_jax.probes.modality import ImageToTextProbe, ModalityProbe
from value_jax.runner import run_probes


def _caption(rng, ex_id, text_len, n_regions, n_items, dim):
    ids = rng.integers(5, 90, text_len).astype(np.int32)
    ids[0], ids[-1] = 1, 2
    tokens = rng.integers(1, text_len - 1, (n_items, 1)).astype(np.int32)
    targets = {
        "coref.region": rng.integers(0, n_regions, n_items),
        "coref.tokens": tokens,
        "coref.token_mask": np.ones((n_items, 1), bool),
        "coref.type": rng.integers(0, 8, n_items),
        "coref.linked": np.ones(n_items, bool),
        "coref.mask": np.ones(n_items, bool),
        "coref.rand_region": rng.integers(0, n_regions, n_items),
        "coref.rand_tokens": tokens,
        "coref.rand_token_mask": np.ones((n_items, 1), bool),
    }
    x1y1 = rng.uniform(0, 0.5, (n_regions, 2))
    return C.Example(
        ex_id,
        ids,
        targets,
        image_id=f"img{ex_id}",
        region_feats=rng.normal(size=(n_regions, dim)),
        region_boxes=np.concatenate([x1y1, x1y1 + 0.3], -1),
    )


@pytest.fixture(scope="module")
def tiny():
    cfg = UniterConfig.tiny()
    model = build_model(cfg)
    return model, init_params(model, jax.random.PRNGKey(0))


def _run(model, params, examples, items):
    loader = ExampleLoader(examples, 4, buckets=C.Buckets(items=items))
    probes = [FusionProbe(), ModalityProbe(), ImageToTextProbe(), HeadSummaryProbe()]
    return loader, run_probes(model, params, loader, probes, progress_every=1000)


def test_a_caption_split_over_rows_counts_once(tiny):
    model, params = tiny
    rng = np.random.default_rng(0)
    # Captions with 11 and 9 items take 3 rows each under a 4-item bucket, the others one.
    examples = [
        _caption(rng, str(i), int(rng.integers(6, 14)), int(rng.integers(3, 9)), n, 24)
        for i, n in enumerate([11, 2, 3, 9, 1])
    ]
    split_loader, split = _run(model, params, examples, (4,))
    whole_loader, whole = _run(model, params, examples, (16,))
    rows = sum(len(p.examples) for p in split_loader.plans)
    assert rows == 9 and sum(len(p.examples) for p in whole_loader.plans) == 5
    assert split["fusion"].data["samples"] == whole["fusion"].data["samples"] == 5
    np.testing.assert_allclose(split["fusion"].data["nmi"], whole["fusion"].data["nmi"], atol=1e-6)
    assert split["modality"].data["samples"] == split["image_to_text"].data["samples"] == 5
    for key in ("per_head_text", "per_head_image"):
        np.testing.assert_allclose(
            split["modality"].data[key], whole["modality"].data[key], atol=1e-6
        )
    np.testing.assert_allclose(
        split["image_to_text"].data["probability"],
        whole["image_to_text"].data["probability"],
        atol=1e-6,
    )
    for block in ("t2t", "t2v", "v2t", "v2v", "v2v_no_self"):
        np.testing.assert_allclose(
            split["head_summary"].data[block]["mean"],
            whole["head_summary"].data[block]["mean"],
            atol=1e-6,
        )


def test_row_targets_mark_first_rows_images_and_offsets():
    rng = np.random.default_rng(1)
    examples = [_caption(rng, "a", 8, 4, 10, 3), _caption(rng, "b", 8, 4, 2, 3)]
    plans = BP.plan_batches(examples, 8, C.Buckets(items=(4,)))
    batch, t = C.collate(plans[0].examples, plans[0].shape, 8, indices=plans[0].indices)
    ids = [ex.id for ex in plans[0].examples]
    assert ids == ["a#0", "a#1", "a#2", "b"]
    np.testing.assert_array_equal(t["row.first"], [True, False, False, True] + [False] * 4)
    np.testing.assert_array_equal(t["row.item_offset"][:4], [0, 4, 8, 0])
    assert len(set(t["row.image"][:3])) == 1 and t["row.image"][0] != t["row.image"][3]
    assert t["row.image"][0] == C.image_key("imga") and t["row.image"].dtype == np.int32
