"""`write_result`: file permissions follow the umask; rewriting a Result gives identical bytes."""

import json
import os

import numpy as np
import pytest

from value_jax.io import write_atomic
from value_jax.probes.results import Result, Table, heatmap, line_plot, write_result


def _result():
    rng = np.random.default_rng(0)
    return Result(
        name="demo",
        data={"v2t_max": rng.random((3, 4)), "layers": [1, 2, 3]},
        tables=[Table("Table 1 — demo", ["layer", "NMI"], [[1, 0.5], [2, 0.25]])],
        figures={
            "heads": heatmap(rng.random((3, 4)), "v2t max"),
            "nmi": line_plot({"a": np.arange(3.0), "b": np.ones(3)}, "NMI", "layer", "NMI"),
        },
    )


@pytest.fixture
def umask():
    """Sets a umask for the test and restores the previous one."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    written = write_result(_result(), str(tmp_path / "out"), flags={"seed": 0})
    names = sorted(os.path.basename(p) for p in written)
    assert names == [
        "flags.json",
        "heads.png",
        "heads.svg",
        "nmi.png",
        "nmi.svg",
        "results.json",
        "table.md",
    ]
    for path in written:
        assert os.stat(path).st_mode & 0o777 == mode, (
            f"{path}: {oct(os.stat(path).st_mode & 0o777)}"
        )
    assert sorted(os.listdir(tmp_path / "out")) == names  # no temporary file left behind
    assert json.loads((tmp_path / "out" / "results.json").read_text())["layers"] == [1, 2, 3]


def test_two_writes_are_byte_identical(tmp_path):
    a = write_result(_result(), str(tmp_path / "a"), flags={"seed": 0})
    b = write_result(_result(), str(tmp_path / "b"), flags={"seed": 0})
    assert [os.path.basename(p) for p in a] == [os.path.basename(p) for p in b]
    for pa, pb in zip(a, b):
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            assert fa.read() == fb.read(), f"{os.path.basename(pa)} differs between two writes"


def test_write_atomic_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_atomic(str(path), "old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(path), "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]
