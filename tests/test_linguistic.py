"""SentEval probing (VALUE Table 5): the dev-selected best layer next to the test-selected one."""

import numpy as np

from value_jax.probes.linguistic import LinguisticProbe


def test_dev_selected_layer_is_reported_next_to_the_test_selected_one():
    rng = np.random.default_rng(0)
    n = {0: 400, 1: 200, 2: 200}  # tr, va, te
    split = np.concatenate([np.full(k, s) for s, k in n.items()])
    y = rng.integers(0, 2, len(split))
    signal = (2 * y - 1)[:, None] * 2.0 + rng.normal(size=(len(split), 4))
    noise = rng.normal(size=(len(split), 4))
    # Layer "emb" carries the label on train and dev only, layer "1" on train and test only.
    emb = np.where((split == 2)[:, None], noise, signal)
    one = np.where((split == 1)[:, None], noise, signal)
    probe = LinguisticProbe("toy", ["a", "b"], max_epochs=50)
    probe.layer_names = ["embeddings", "layer1"]
    res = probe.finalize(
        {"sentence": np.stack([emb, one], 1).astype(np.float32), "label": y, "split": split}, {}
    )
    d = res.data
    assert d["best_layer"] == "layer1" and d["best_layer_dev"] == "embeddings"
    assert d["best_accuracy"] > 0.9 and d["best_accuracy_dev"] < 0.7
    assert d["best_accuracy_dev"] == d["test_accuracy"][0]
    selection = res.tables[1]
    assert [row[:2] for row in selection.rows] == [["test (VALUE)", "1"], ["dev", "emb"]]
    assert "best on dev: emb" in res.tables[0].caption
