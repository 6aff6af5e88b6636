"""checkpoint_id: the converted params' sha256 recorded at save time, and the file-hash fallback
for directories written before it was recorded."""

import json

import numpy as np
import pytest

from checkpoints_convert import convert_checkpoint
from checkpoints_convert.fake import make_state_dict, write_fake_checkpoint
from value_jax.checkpoint import HASH_KEY, checkpoint_id, params_sha256, read_config, save
from value_jax.models import UniterConfig

U = UniterConfig.tiny()


def _convert(tmp_path, name, sd_or_seed=0):
    src = str(tmp_path / f"{name}.pt")
    if isinstance(sd_or_seed, dict):
        import torch

        torch.save(sd_or_seed, src)
    else:
        write_fake_checkpoint(src, "uniter", U, seed=sd_or_seed)
    out = str(tmp_path / name)
    return convert_checkpoint(src, "uniter", out, num_heads=U.num_heads), out


def test_same_source_same_id_and_one_weight_changes_it(tmp_path):
    result, a = _convert(tmp_path, "a")
    _, b = _convert(tmp_path, "b")  # same weights, another source name and out dir
    _, meta = read_config(a)[1:]
    assert meta[HASH_KEY] == params_sha256(result.params) == checkpoint_id(a) == checkpoint_id(b)
    sd = make_state_dict("uniter", U, seed=0)
    sd["uniter.pooler.dense.bias"][3] += 1e-7
    _, c = _convert(tmp_path, "c", sd)
    assert checkpoint_id(c) != checkpoint_id(a)


def test_params_hash_is_order_independent_and_sees_paths_and_shapes():
    x = np.arange(6, dtype=np.float32)
    assert params_sha256({"a": x, "b": x + 1}) == params_sha256({"b": x + 1, "a": x})
    assert params_sha256({"a": x}) != params_sha256({"a": x.reshape(2, 3)})
    assert params_sha256({"a": x}) != params_sha256({"c": x})
    assert params_sha256({"a": x}) == params_sha256({"a": x.astype(np.float64)})  # float32 view


def test_save_without_conversion_metadata_records_the_hash(tmp_path):
    params = {"w": np.ones((2, 2), np.float32)}
    out = save(str(tmp_path / "plain"), U, params)
    assert read_config(out)[2] == {HASH_KEY: params_sha256(params)}
    assert checkpoint_id(out) == params_sha256(params)


def test_fallback_hashes_the_files_when_the_field_is_absent(tmp_path):
    _, a = _convert(tmp_path, "a")
    recorded = checkpoint_id(a)
    cfg = tmp_path / "a" / "config.json"
    meta = json.loads(cfg.read_text())
    del meta["conversion"][HASH_KEY]
    cfg.write_text(json.dumps(meta))
    old = checkpoint_id(a)
    assert len(old) == 64 and old != recorded and old == checkpoint_id(a)
    meta["conversion"]["source"] = "elsewhere.pt"  # the fallback covers config.json too
    cfg.write_text(json.dumps(meta))
    assert checkpoint_id(a) != old
    with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
        checkpoint_id(str(tmp_path))
