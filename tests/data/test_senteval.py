"""SentEval probing files: real subsets, generated files, malformed lines, stratified sampling."""

import collections
import pathlib

import numpy as np
import pytest

from value_jax.data.errors import DataFormatError, DataReport
from value_jax.data.fixtures.annotations import write_senteval
from value_jax.data.senteval import (
    TASK_LABELS,
    TASKS,
    _allocate,
    read_probing_task,
    sort_labels,
    stratified_sample,
)

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
SENTEVAL = DATA / "senteval_probing"


@pytest.fixture
def real():
    if not (SENTEVAL / "past_present.txt").exists():
        pytest.skip(f"real SentEval subset not found at {SENTEVAL}")
    return SENTEVAL


def test_task_table():
    assert len(TASKS) == 9 and len(TASK_LABELS["top_constituents"]) == 20
    assert (
        "NP_ADVP_VP_." in TASK_LABELS["top_constituents"]
        and "OTHER" in TASK_LABELS["top_constituents"]
    )
    assert sort_labels(["10", "5", "11", "7"]) == ["5", "7", "10", "11"]
    assert sort_labels(["PRES", "PAST"]) == ["PAST", "PRES"]


@pytest.mark.parametrize(
    "task, labels",
    [
        ("bigram_shift", ("I", "O")),
        ("past_present", ("PAST", "PRES")),
        ("subj_number", ("NN", "NNS")),
        ("tree_depth", ("5", "6", "7", "8", "9", "10", "11")),
    ],
)
def test_real_files(real, task, labels):
    report = DataReport()
    data = read_probing_task(real / f"{task}.txt", report=report)
    assert data.task == task and data.label_names == labels
    assert {s: len(v) for s, v in data.splits.items()} == {"tr": 100, "va": 50, "te": 50}
    assert data.splits["va"].line_numbers[0] == 101 and data.splits["te"].line_numbers[0] == 151
    tr = data.splits["tr"]
    assert [data.label_names[i] for i in tr.label_ids] == tr.labels
    if task == "tree_depth":
        assert collections.Counter(tr.labels) == {
            "5": 14,
            "6": 14,
            "7": 14,
            "8": 14,
            "9": 14,
            "10": 15,
            "11": 15,
        }
        assert data.label_to_id["5"] == 0 and data.label_to_id["11"] == 6
        assert report["known_labels_absent"] == 1 and report.examples("known_labels_absent") == [
            "tree_depth: 12"
        ]
    else:
        assert collections.Counter(tr.labels) == {labels[0]: 50, labels[1]: 50}
        assert len(report) == 0


def test_real_tokens(real):
    data = read_probing_task(real / "past_present.txt")
    tr = data.splits["tr"]
    assert tr.labels[0] == "PRES"
    assert tr.sentences[0][:4] == ["She", "shone", "her", "light"] and "'s" in tr.sentences[0]
    assert tr.sentences[1] == ['"', "Okay", "now", ",", "okay", ",", "settle", "down", "."]
    te = read_probing_task(real / "tree_depth.txt").splits["te"]
    assert (te.labels[-1], " ".join(te.sentences[-1])) == (
        "5",
        "From the rack hung a plain white bath towel .",
    )


def test_fixture_round_trip_and_not_first_lines(tmp_path):
    rows = write_senteval(
        tmp_path, ["bigram_shift", "tree_depth"], n_per_split={"tr": 40, "va": 14, "te": 14}, seed=5
    )
    for task in ("bigram_shift", "tree_depth"):
        data = read_probing_task(tmp_path / f"{task}.txt")
        got = [
            (s, l, t)
            for s in ("tr", "va", "te")
            for l, t in zip(data.splits[s].labels, data.splits[s].sentences)
        ]
        assert got == rows[task]
    data = read_probing_task(tmp_path / "bigram_shift.txt")
    tr = data.splits["tr"]
    assert set(tr.labels[:20]) == {"I"}  # grouped by label, like the real unshuffled files
    sample = stratified_sample(data, "tr", 20, seed=0)
    assert collections.Counter(sample.labels) == {"I": 10, "O": 10}
    assert list(sample.line_numbers) != list(tr.line_numbers[:20])


def test_stratified_sample_proportional_seeded(real):
    data = read_probing_task(real / "tree_depth.txt")
    a = stratified_sample(data, "tr", 30, seed=1)
    b = stratified_sample(data, "tr", 30, seed=1)
    c = stratified_sample(data, "tr", 30, seed=2)
    assert list(a.line_numbers) == list(b.line_numbers) and list(a.line_numbers) != list(
        c.line_numbers
    )
    counts = collections.Counter(a.labels)
    assert sum(counts.values()) == 30 and set(counts) == set(data.label_names)
    full = collections.Counter(data.splits["tr"].labels)
    for label, k in counts.items():
        assert abs(k - 30 * full[label] / 100) < 1
    assert np.all(np.diff(a.line_numbers) > 0) and len(set(a.line_numbers)) == 30
    src = data.splits["tr"]
    index = {int(n): i for i, n in enumerate(src.line_numbers)}
    for n, label, sent in zip(a.line_numbers, a.labels, a.sentences):
        assert src.labels[index[int(n)]] == label and src.sentences[index[int(n)]] == sent
    report = DataReport()
    assert len(stratified_sample(data, "va", 80, seed=0, report=report)) == 50
    assert report["sample_smaller_than_requested"] == 1


def test_allocate_sums_and_respects_sizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 30, size=int(rng.integers(1, 8)))
        n = int(rng.integers(0, counts.sum() + 1))
        q = _allocate(counts, n)
        assert q.sum() == n and np.all(q <= counts) and np.all(q >= 0)
        assert np.all(np.abs(q - counts * n / counts.sum()) < 1)


@pytest.mark.parametrize(
    "line, found",
    [
        ("tr\tPRES", "2 tab-separated fields"),
        ("tr\tPRES\ta\tb", "4 tab-separated fields"),
        ("xx\tPRES\tSome words .", "split 'xx'"),
        ("tr\tFUTURE\tSome words .", "label 'FUTURE'"),
        ("tr\tPRES\t", "an empty sentence"),
    ],
)
def test_malformed_lines(tmp_path, line, found):
    path = tmp_path / "past_present.txt"
    path.write_text("tr\tPAST\tHe ran .\n" + line + "\n")
    with pytest.raises(DataFormatError) as e:
        read_probing_task(path)
    assert str(e.value).startswith(f"{path}:2: {found}") and e.value.line == 2


def test_unknown_task_takes_any_label_and_counts_quirks(tmp_path):
    path = tmp_path / "my_task.txt"
    path.write_text("tr\tB\tx  y\n\nva\tA\tz\n")
    report = DataReport()
    data = read_probing_task(path, report=report)
    assert data.label_names == ("A", "B") and data.splits["tr"].sentences == [["x", "y"]]
    assert report["repeated_spaces"] == 1 and report["blank_lines"] == 1
    assert len(data.splits["te"]) == 0
