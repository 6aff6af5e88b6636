"""The converter's files: checks on `--src` and `--out` made before any conversion work, and
reading a source file into numpy, each failure one sentence that names the path.

    prepare_out("ckpt/lxmert", overwrite=False)   # raises before anything is read or written
    sd = read_state_dict("Epoch20_LXRT.pth")      # zip CRCs checked before torch.load
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping

import numpy as np

from value_jax.checkpoint import replace_refusal, sweep_stale_tmp

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class CheckpointFileError(ValueError):
    """A `--src` or `--out` path the converter cannot use; the message names it and says why."""


# ---- --out -------------------------------------------------------------------------------------


def prepare_out(out: str, overwrite: bool) -> list[str]:
    """Checks that `out` can be written (and, with `overwrite`, may be replaced), then removes
    temporary folders of `out` left by killed conversions. Returns the folders removed.

    Raises FileExistsError when `out` exists (without `overwrite`, or when it is not a checkpoint
    directory), CheckpointFileError when its parent cannot be written.
    """
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(
                f"--out={out} already exists; pass overwrite=True (--overwrite) to replace it"
            )
        if (reason := replace_refusal(out)) is not None:
            raise FileExistsError(
                f"--out={out} is not a value_jax checkpoint directory, so --overwrite will not "
                f"replace it: {reason}. Move it away or choose another --out"
            )
    _check_writable(out)
    return sweep_stale_tmp(out)


def _check_writable(out: str) -> None:
    """The nearest existing folder above `out` must take a new file (tried, not `os.access`,
    which says yes to root on a read-only mount)."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CheckpointFileError(f"--out={out}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
    except OSError as e:
        raise CheckpointFileError(
            f"--out={out}: cannot write in {parent} ({e.strerror or e})"
        ) from e
    os.close(fd)
    os.remove(probe)


# ---- --src -------------------------------------------------------------------------------------


def check_source(src: str) -> str:
    """Checks that `src` is a readable, complete checkpoint file before it is loaded. Returns
    its kind: `safetensors`, `zip` (torch.save, every member's CRC verified) or `pickle` (the
    legacy torch.save format, which carries no checksum)."""
    if not os.path.exists(src):
        raise CheckpointFileError(f"--src={src}: no such file")
    if os.path.isdir(src):
        inside = sorted(n for n in os.listdir(src) if n.endswith(CHECKPOINT_SUFFIXES))
        hint = f" (it holds {', '.join(inside[:5])})" if inside else ""
        raise CheckpointFileError(
            f"--src={src} is a folder; pass the checkpoint file inside it{hint}"
        )
    if not os.path.isfile(src):
        raise CheckpointFileError(f"--src={src} is not a regular file")
    try:
        with open(src, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointFileError(f"--src={src} cannot be read ({e.strerror or e})") from e
    size = os.path.getsize(src)
    if size == 0:
        raise CheckpointFileError(f"--src={src} is empty (0 bytes)")
    if src.endswith(".safetensors"):
        _check_safetensors(src, head, size)
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        _check_zip(src, size)
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle"
    raise CheckpointFileError(
        f"--src={src} is not a PyTorch checkpoint: it starts with "
        f"{head[:24]!r}, not a zip archive ('PK') or a pickle (0x80)"
        f"{_what_it_is(head)}"
    )


def _what_it_is(head: bytes) -> str:
    if head.startswith(b"version https://git-lfs"):
        return "; it is a git-lfs pointer, not the weights (run `git lfs pull`)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return "; it is an HTML page (a failed download?)"
    if len(head) > 8 and head[8:9] == b"{":
        return "; it looks like a safetensors file: name it *.safetensors"
    return ""


def _check_zip(src: str, size: int) -> None:
    """Reads every member through zipfile, which checks its CRC-32: a flipped byte in a tensor
    otherwise loads as a wrong weight without a word."""
    try:
        archive = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointFileError(
            f"--src={src} is a truncated or damaged zip archive (torch.save "
            f"format, {size} bytes): its member index cannot be read "
            f"({e})"
        ) from e
    bad = []
    with archive:
        for info in archive.infolist():
            try:
                with archive.open(info) as member:
                    while member.read(1 << 22):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                bad.append(info.filename if "CRC" in str(e) else f"{info.filename} ({e})")
    if bad:
        raise CheckpointFileError(
            f"--src={src} is corrupt: {len(bad)} zip member(s) fail their "
            f"CRC-32 check: {'; '.join(bad)}. Copy or download it again"
        )


def _check_safetensors(src: str, head: bytes, size: int) -> None:
    """The header's length, its JSON and the tensors' byte ranges must fit in the file."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else None
    if n is None or 8 + n > size:
        raise CheckpointFileError(
            f"--src={src} is truncated: its safetensors header needs "
            f"{'?' if n is None else 8 + n} bytes, the file has {size}"
        )
    with open(src, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointFileError(
                f"--src={src}: its safetensors header is not JSON ({e})"
            ) from e
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, Mapping) and "data_offsets" in v
    ]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise CheckpointFileError(
            f"--src={src} is truncated: its tensors need {need} bytes, the file has {size}"
        )


# ---- reading -----------------------------------------------------------------------------------


def to_numpy(value, key: str) -> np.ndarray:
    """A torch tensor or numpy array as numpy; floating point becomes float32, the rest keeps
    its dtype (so that an int8 weight can be refused by name, not silently cast)."""
    if hasattr(value, "detach"):  # a torch tensor; torch itself stays an optional import
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
    raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a `.pt`/`.pth`/`.bin` (torch, weights only) or `.safetensors` file as numpy
    (floating point as float32), after `check_source`.

    A top-level `{"state_dict": ...}` or `{"model": ...}` wrapper is unwrapped. Raises
    CheckpointFileError, naming `path`, for a file that cannot be read.
    """
    kind = check_source(path)
    try:
        raw = _load(path, kind)
    except Exception as e:  # torch and safetensors raise many types; each becomes one sentence
        raise CheckpointFileError(_load_failure(path, kind, e)) from e
    if not isinstance(raw, Mapping):
        raise CheckpointFileError(
            f"--src={path}: expected a dict of tensors, found a {type(raw).__name__}"
        )
    for wrapper in ("state_dict", "model"):
        if isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    return {k: to_numpy(v, f"{path}:{k}") for k, v in raw.items()}


def _load(path: str, kind: str):
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            import torch  # noqa: F401  bf16 needs torch; numpy cannot hold it

            framework = "pt"
        except ImportError:
            framework = "numpy"
        with safe_open(path, framework=framework) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _load_failure(path: str, kind: str, e: Exception) -> str:
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text.replace(" ", "_").lower():
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" such as {found.group(1)}" if found else ""
        return (
            f"--src={path}: torch.load(weights_only=True) refused it: it pickles objects "
            f"other than tensors{what}. The converter loads tensors only; if you trust the "
            "file, load it yourself and torch.save its state dict of tensors"
        )
    first = text.strip().splitlines()[0] if text.strip() else ""
    described = {
        "zip": "torch.save zip archive",
        "pickle": "legacy torch.save pickle",
        "safetensors": "safetensors file",
    }[kind]
    if re.search(r"EOF|ran out of input|unexpected end", first, re.I):
        hint = " (it ends early: truncated)"
    else:
        hint = "" if re.search("corrupt|truncat", first, re.I) else " (truncated or damaged?)"
    return (
        f"--src={path} could not be read as a {described}: {type(e).__name__}"
        f"{': ' + first if first else ''}{hint}"
    )
