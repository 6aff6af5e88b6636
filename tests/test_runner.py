"""Runner: one pass for several probes, resumable with identical numbers, sharding-invariant."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import value_jax
from value_jax.models import UniterConfig, build_model, init_params
from value_jax.probes.fusion import FusionProbe
from value_jax.probes.modality import ImageToTextProbe, ModalityProbe
from value_jax.runner import run_probes


def _loader(cfg, n_batches=5, b=4, t=8, r=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        lens = rng.integers(4, t + 1, b)
        rl = rng.integers(2, r + 1, b)
        x1y1 = rng.uniform(0, 0.5, (b, r, 2))
        batch = value_jax.Batch.create(
            rng.integers(0, cfg.vocab_size, (b, t)), np.arange(t)[None] < lens[:, None],
            rng.normal(size=(b, r, cfg.img_dim)), np.concatenate([x1y1, x1y1 + 0.3], -1),
            region_mask=np.arange(r)[None] < rl[:, None])
        out.append((batch, {}))
    return out


class _Interrupted(Exception):
    pass


def _interrupting(loader, after):
    for i, item in enumerate(loader):
        if i == after:
            raise _Interrupted
        yield item


@pytest.fixture(scope="module")
def tiny():
    cfg = UniterConfig.tiny()
    model = build_model(cfg)
    return cfg, model, init_params(model, jax.random.PRNGKey(0))


def _probes():
    return [FusionProbe(), ModalityProbe(), ImageToTextProbe()]


def test_one_pass_matches_per_sample_means(tiny):
    cfg, model, params = tiny
    loader = _loader(cfg)
    res = run_probes(model, params, loader, _probes(), progress_every=100)
    # The accumulated mean equals the mean of per-batch runs weighted by valid samples.
    per_batch = [run_probes(model, params, [item], _probes(), progress_every=100) for item in loader]
    counts = np.array([r["fusion"].data["samples"] for r in per_batch])
    nmi = np.array([r["fusion"].data["nmi"] for r in per_batch])
    np.testing.assert_allclose(res["fusion"].data["nmi"], (nmi * counts[:, None]).sum(0) / counts.sum(),
                               atol=1e-9)
    mi = res["modality"].data
    assert mi["per_head_text"].shape == (cfg.num_layers, cfg.num_heads)
    assert np.all(mi["per_head_text"] + mi["per_head_image"] < 1.0)  # [CLS]/[SEP] keys excluded
    assert res["image_to_text"].data["probability"].shape == (cfg.num_layers, cfg.num_heads)


def test_killed_run_resumes_with_identical_numbers(tiny, tmp_path, monkeypatch):
    cfg, model, params = tiny
    loader = _loader(cfg, n_batches=7)
    full = run_probes(model, params, loader, _probes(), progress_every=100)
    monkeypatch.chdir(tmp_path)
    state = os.path.join("out", "_state", "fusion")   # relative, as the experiments' default
    with pytest.raises(_Interrupted):
        run_probes(model, params, _interrupting(loader, 5), _probes(), state_dir=state,
                   checkpoint_every=2, progress_every=100)
    assert os.path.isdir(state)
    resumed = run_probes(model, params, loader, _probes(), state_dir=state, checkpoint_every=2,
                         progress_every=100)
    for name in full:
        for key, value in full[name].data.items():
            np.testing.assert_array_equal(np.asarray(resumed[name].data[key]), np.asarray(value),
                                          err_msg=f"{name}.{key}")


def test_state_of_other_probes_is_refused(tiny, tmp_path):
    cfg, model, params = tiny
    loader = _loader(cfg, n_batches=2)
    state = str(tmp_path / "state")
    run_probes(model, params, loader, [FusionProbe()], state_dir=state, progress_every=100)
    with pytest.raises(ValueError, match="holds a run of probes"):
        run_probes(model, params, loader, [ModalityProbe()], state_dir=state, progress_every=100)


def test_sharded_over_four_cpu_devices_matches_one_device(tiny):
    cfg, model, params = tiny
    one = run_probes(model, params, _loader(cfg), _probes(), progress_every=100)
    script = textwrap.dedent("""
        import json, sys, jax, numpy as np
        sys.path.insert(0, %r)
        from tests.test_runner import _loader, _probes
        from value_jax.models import UniterConfig, build_model, init_params
        from value_jax.runner import run_probes
        assert len(jax.devices()) == 4, jax.devices()
        cfg = UniterConfig.tiny(); model = build_model(cfg)
        res = run_probes(model, init_params(model, jax.random.PRNGKey(0)), _loader(cfg), _probes(),
                         progress_every=100)
        print(json.dumps({k: r.to_json() for k, r in res.items()}))
    """) % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json
    four = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in one.items():
        mine = r.to_json()
        for key in ("nmi", "per_head_text", "per_head_image", "probability"):
            if key in mine:
                np.testing.assert_allclose(np.asarray(four[name][key]), np.asarray(mine[key]),
                                           atol=1e-6, err_msg=f"{name}.{key}")
