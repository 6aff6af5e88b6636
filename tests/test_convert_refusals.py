"""The converter refuses broken files clearly: a corrupt zip, int8 or non-finite weights, source
files it cannot load, an --out it cannot write or must not replace. Each failure is one line
that names the path (or every key), found before any conversion work."""

import argparse
import os
import zipfile

import numpy as np
import pytest
import torch
from absl import flags
from absl.testing import flagsaver

import checkpoints_convert.convert as convert_module
from checkpoints_convert import ConversionError, convert_checkpoint, convert_state_dict
from checkpoints_convert.fake import make_state_dict, write_fake_checkpoint
from value_jax.checkpoint import load
from value_jax.models import UniterConfig

U = UniterConfig.tiny()


def run_cli(capsys, src, out, *extra):
    """`python -m checkpoints_convert` in process: `(exit code, stdout, stderr)`."""
    import checkpoints_convert.__main__ as cli  # defines the CLI's absl flags; only here

    argv = [
        "checkpoints_convert",
        f"--src={src}",
        "--format=uniter",
        f"--out={out}",
        f"--num_heads={U.num_heads}",
        *extra,
    ]
    code = 0
    with flagsaver.flagsaver():
        flags.FLAGS(argv)
        try:
            cli.main(argv[:1])
        except SystemExit as e:
            code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _fake(tmp_path, name="u.pth"):
    return write_fake_checkpoint(str(tmp_path / name), "uniter", U, seed=0)


# ---- 1. a zip archive with flipped bytes -------------------------------------------------------


def _flip_a_byte_in_the_largest_tensor(path):
    with zipfile.ZipFile(path) as zf:
        member = max(zf.infolist(), key=lambda i: i.file_size)
        content = zf.read(member)
    data = bytearray(open(path, "rb").read())
    at = bytes(data).find(content) + len(content) // 2 + 3  # an exponent byte of a float32
    data[at] ^= 0x40
    open(path, "wb").write(data)
    return member.filename


def test_flipped_byte_in_a_zip_checkpoint_is_refused_naming_the_member(tmp_path, capsys):
    src = _fake(tmp_path)
    member = _flip_a_byte_in_the_largest_tensor(src)
    code, _, err = run_cli(capsys, src, tmp_path / "out")
    assert code == 1
    assert src in err and member in err and "CRC" in err
    assert not (tmp_path / "out").exists()


def test_legacy_pickle_checkpoint_still_converts(tmp_path, capsys):
    src = str(tmp_path / "legacy.pth")
    torch.save(make_state_dict("uniter", U, seed=0), src, _use_new_zipfile_serialization=False)
    code, out, _ = run_cli(capsys, src, tmp_path / "out")
    assert code == 0 and "result: OK" in out


# ---- 2. int8 and non-finite weights ------------------------------------------------------------


def test_int8_and_non_finite_weights_are_all_listed_with_the_other_problems():
    sd = make_state_dict("uniter", U, seed=0)
    int8 = ["uniter.encoder.layer.0.attention.self.query.weight", "uniter.pooler.dense.bias"]
    for k in int8:
        sd[k] = (sd[k] * 100).to(torch.int8)
    sd["uniter.encoder.layer.1.output.dense.weight"][0, :3] = float("nan")
    sd["uniter.encoder.layer.2.intermediate.dense.bias"][[1, 4]] = float("inf")
    sd["uniter.embeddings.word_embeddings.weight"][5, 0] = float("nan")  # tied to the decoder
    del sd["itm_output.bias"]
    with pytest.raises(ConversionError) as info:
        convert_state_dict(sd, "uniter", num_heads=U.num_heads)
    report, message = info.value.report, str(info.value)
    assert report.non_float == [(k, "int8") for k in int8]
    assert report.non_finite == [
        ("uniter.embeddings.word_embeddings.weight", 1, 0, 99 * 32),
        ("uniter.encoder.layer.1.output.dense.weight", 3, 0, 32 * 37),
        ("uniter.encoder.layer.2.intermediate.dense.bias", 0, 2, 37),
    ]
    assert [p for p, _ in report.missing] == ["itm_output/bias"]  # refused keys are not "missing"
    assert all(ok for *_, ok in report.tied)  # the NaN is reported once, not as a tied mismatch
    assert report.errors == 2 + 3 + 1 + 1  # + the partial itm head
    for k in int8:
        assert f"{k}: int8" in message
    assert (
        "3 of 1184 values (3 NaN, 0 Inf)" in message and "2 of 37 values (0 NaN, 2 Inf)" in message
    )


# ---- 3. files the converter cannot load ------------------------------------------------------


def _weights_only_refused(tmp_path):
    path = tmp_path / "with_args.pth"  # UNITER's training script saved its argparse options too
    torch.save(
        {"model": make_state_dict("uniter", U, seed=0), "args": argparse.Namespace(lr=1)}, path
    )
    return path, "argparse.Namespace"


def _truncated(tmp_path, name="u.pth", **kw):
    path = tmp_path / name
    if kw:
        torch.save(make_state_dict("uniter", U, seed=0), path, **kw)
    else:
        _fake(tmp_path, name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated"


def _empty(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    return tmp_path / "empty.pth", "empty (0 bytes)"


def _garbage(tmp_path):
    (tmp_path / "page.bin").write_bytes(b"<!DOCTYPE html><html>Not found</html>")
    return tmp_path / "page.bin", "HTML page"


def _folder(tmp_path):
    (tmp_path / "uniter").mkdir()
    _fake(tmp_path / "uniter", "model.pt")
    return (
        tmp_path / "uniter",
        "is a folder; pass the checkpoint file inside it (it holds model.pt)",
    )


BAD_SOURCES = {
    "weights-only refusal": _weights_only_refused,
    "truncated zip": _truncated,
    "truncated legacy pickle": lambda t: _truncated(
        t, "legacy.pth", _use_new_zipfile_serialization=False
    ),
    "truncated safetensors": lambda t: _truncated(t, "u.safetensors"),
    "empty": _empty,
    "garbage": _garbage,
    "folder": _folder,
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_unloadable_source_is_one_line_naming_it(case, tmp_path, capsys):
    src, what = BAD_SOURCES[case](tmp_path)
    code, _, err = run_cli(capsys, src, tmp_path / "out")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"error: --src={src}") and what in err, err
    assert not (tmp_path / "out").exists()


def _out_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    return tmp_path / "notes.txt" / "ckpt", "is a file, not a folder"


def _out_read_only(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    return tmp_path / "ro" / "new" / "ckpt", "cannot write in"


@pytest.mark.parametrize("make_out", [_out_under_a_file, _out_read_only])
def test_unwritable_out_is_refused_before_the_source_is_read(
    make_out, tmp_path, capsys, monkeypatch
):
    src = _fake(tmp_path)
    out, what = make_out(tmp_path)

    def must_not_read(*args, **kwargs):
        raise AssertionError("the source was read before --out was checked")

    monkeypatch.setattr(convert_module, "read_state_dict", must_not_read)
    code, _, err = run_cli(capsys, src, out)
    assert code == 1 and err.startswith(f"error: --out={out}") and what in err, err


# ---- 4. --overwrite replaces checkpoints only ---------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    src = _fake(tmp_path)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text(r"\chapter{Results}")
    code, _, err = run_cli(capsys, src, thesis, "--overwrite")
    assert code == 1 and f"--out={thesis}" in err and "thesis.tex" in err, err
    assert (thesis / "thesis.tex").read_text() == r"\chapter{Results}"
    # A checkpoint with anything more in it is refused too, naming what is there.
    convert_checkpoint(src, "uniter", str(tmp_path / "ckpt"), num_heads=U.num_heads)
    (tmp_path / "ckpt" / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.md"):
        convert_checkpoint(
            src, "uniter", str(tmp_path / "ckpt"), num_heads=U.num_heads, overwrite=True
        )
    assert (tmp_path / "ckpt" / "notes.md").exists()


def test_overwrite_replaces_a_checkpoint_and_an_empty_folder(tmp_path, capsys):
    old = convert_checkpoint(
        _fake(tmp_path, "old.pth"), "uniter", str(tmp_path / "ckpt"), num_heads=U.num_heads
    )
    src = write_fake_checkpoint(str(tmp_path / "new.pth"), "uniter", U, seed=1)
    (tmp_path / "empty").mkdir()
    for out in ("ckpt", "empty"):
        code, _, err = run_cli(capsys, src, tmp_path / out, "--overwrite")
        assert code == 0, err
        _, params = load(str(tmp_path / out))
        pooler = np.asarray(params["uniter"]["pooler"]["dense"]["kernel"])
        assert not np.array_equal(pooler, old.params["uniter"]["pooler"]["dense"]["kernel"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "empty", "new.pth", "old.pth"]


# ---- 6. the text-only note -----------------------------------------------------------------------


def test_bert_refusal_says_text_only_in_a_plain_sentence():
    sd = make_state_dict("bert", U, seed=0)
    del sd["bert.pooler.dense.bias"]
    with pytest.raises(ConversionError) as info:
        convert_state_dict(sd, "bert", num_heads=U.num_heads)
    message = str(info.value)
    assert "!!!" not in message and "TEXT-ONLY" not in message and "ZEROS" not in message
    assert (
        "text only: bert has no region embedding, so UNITER's img_embeddings are filled "
        "with zeros and the model reads text alone."
    ) in message.splitlines()
