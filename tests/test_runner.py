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
from value_jax.state import LayerFiles


def _loader(cfg, n_batches=5, b=4, t=8, r=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        lens = rng.integers(4, t + 1, b)
        rl = rng.integers(2, r + 1, b)
        x1y1 = rng.uniform(0, 0.5, (b, r, 2))
        batch = value_jax.Batch.create(
            rng.integers(0, cfg.vocab_size, (b, t)),
            np.arange(t)[None] < lens[:, None],
            rng.normal(size=(b, r, cfg.img_dim)),
            np.concatenate([x1y1, x1y1 + 0.3], -1),
            region_mask=np.arange(r)[None] < rl[:, None],
        )
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
    per_batch = [
        run_probes(model, params, [item], _probes(), progress_every=100) for item in loader
    ]
    counts = np.array([r["fusion"].data["samples"] for r in per_batch])
    nmi = np.array([r["fusion"].data["nmi"] for r in per_batch])
    np.testing.assert_allclose(
        res["fusion"].data["nmi"], (nmi * counts[:, None]).sum(0) / counts.sum(), atol=1e-9
    )
    mi = res["modality"].data
    assert mi["per_head_text"].shape == (cfg.num_layers, cfg.num_heads)
    assert np.all(mi["per_head_text"] + mi["per_head_image"] < 1.0)  # [CLS]/[SEP] keys excluded
    assert res["image_to_text"].data["probability"].shape == (cfg.num_layers, cfg.num_heads)


def test_killed_run_resumes_with_identical_numbers(tiny, tmp_path, monkeypatch):
    cfg, model, params = tiny
    loader = _loader(cfg, n_batches=7)
    full = run_probes(model, params, loader, _probes(), progress_every=100)
    monkeypatch.chdir(tmp_path)
    state = os.path.join("out", "_state", "fusion")  # relative, as the experiments' default
    with pytest.raises(_Interrupted):
        run_probes(
            model,
            params,
            _interrupting(loader, 5),
            _probes(),
            state_dir=state,
            checkpoint_every=2,
            progress_every=100,
        )
    assert os.path.isdir(state)
    resumed = run_probes(
        model, params, loader, _probes(), state_dir=state, checkpoint_every=2, progress_every=100
    )
    for name in full:
        for key, value in full[name].data.items():
            np.testing.assert_array_equal(
                np.asarray(resumed[name].data[key]), np.asarray(value), err_msg=f"{name}.{key}"
            )


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].to_json() == b[name].to_json(), name


def test_state_from_other_inputs_is_never_used(tiny, tmp_path, capfd):
    """Saved state is resumed only when probes, their settings, the loader's batches and the
    caller's inputs all match; otherwise it is removed, saying what differs."""
    cfg, model, params = tiny
    state = str(tmp_path / "state")
    first, other = _loader(cfg, n_batches=4, seed=0), _loader(cfg, n_batches=4, seed=1)
    fresh = run_probes(model, params, other, _probes(), progress_every=100)

    def partial(loader, probes, fingerprint=None):
        with pytest.raises(_Interrupted):
            run_probes(
                model,
                params,
                _interrupting(loader, 3),
                probes,
                state_dir=state,
                checkpoint_every=1,
                progress_every=100,
                fingerprint=fingerprint,
            )

    partial(first, _probes())  # other data
    _same(run_probes(model, params, other, _probes(), state_dir=state, progress_every=100), fresh)
    assert "not resuming" in capfd.readouterr().err

    partial(other, [FusionProbe(include_special=True), ModalityProbe(), ImageToTextProbe()])
    _same(run_probes(model, params, other, _probes(), state_dir=state, progress_every=100), fresh)
    assert "include_special: true → false" in capfd.readouterr().err

    partial(other, _probes(), fingerprint={"checkpoint": {"id": "aaa"}})
    _same(
        run_probes(
            model,
            params,
            other,
            _probes(),
            state_dir=state,
            progress_every=100,
            fingerprint={"checkpoint": {"id": "bbb"}},
        ),
        fresh,
    )
    assert 'checkpoint.id: "aaa" → "bbb"' in capfd.readouterr().err

    partial(other, [FusionProbe()])  # other probes
    _same(run_probes(model, params, other, _probes(), state_dir=state, progress_every=100), fresh)
    assert "probes: ['fusion'] → ['fusion', 'modality', 'image_to_text']" in capfd.readouterr().err


def test_rerun_of_a_finished_run_gives_the_same_results(tiny, tmp_path, capfd):
    """A rerun into the same state finds every batch counted: nothing is traced, and the
    results (layer names included) must still equal the first run's."""
    cfg, model, params = tiny
    state = str(tmp_path / "state")
    loader = _loader(cfg, n_batches=3)
    first = run_probes(model, params, loader, _probes(), state_dir=state, progress_every=100)
    again = run_probes(model, params, loader, _probes(), state_dir=state, progress_every=100)
    assert "resuming after batch 3/3" in capfd.readouterr().err
    assert again["fusion"].data["layers"] == ["1", "2", "3"]
    _same(again, first)


class _Logging(FusionProbe):
    """Reports two progress lines from its finalize through the run's `info["log"]`."""

    name = "logging"

    def finalize(self, stats, info):
        info["log"]("fit 1 of 2")
        info["log"]("fit 2 of 2")
        return super().finalize(stats, info)


def test_finalize_progress_lines_name_the_run_and_the_probe(tiny, capfd):
    cfg, model, params = tiny
    run_probes(
        model, params, _loader(cfg, n_batches=1), [_Logging()], label="demo", progress_every=0
    )
    err = capfd.readouterr().err
    assert "[demo] logging: fit 1 of 2\n[demo] logging: fit 2 of 2\n" in err


def test_empty_loader_says_no_examples_left(tiny):
    from value_jax.runner import NoBatchesError

    cfg, model, params = tiny
    with pytest.raises(NoBatchesError, match="no examples left"):
        run_probes(model, params, [], _probes(), progress_every=100)


def test_resumed_eta_counts_only_the_batches_run_now():
    import io

    from value_jax.runner import Progress

    stream = io.StringIO()
    progress = Progress(total=100, label="x", every=1, stream=stream, skipped=90)
    progress.start -= 10.0  # 10 s for the one batch run after resuming
    progress.update(91, 4)
    assert "ETA 0:01:30" in stream.getvalue()  # 9 batches left at 10 s each, not 9 × 10/91 s


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
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    four = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in one.items():
        mine = r.to_json()
        for key in ("nmi", "per_head_text", "per_head_image", "probability"):
            if key in mine:
                np.testing.assert_allclose(
                    np.asarray(four[name][key]),
                    np.asarray(mine[key]),
                    atol=1e-6,
                    err_msg=f"{name}.{key}",
                )


class _Collecting(FusionProbe):
    """Collects each example's mean text state per layer; finalize hands back what it got."""

    name = "collecting"
    collect_keys = ("states",)

    def step(self, trace, targets):
        states, _ = trace.hidden_states("text")  # [L, B, T, D]
        return {
            "states": states.mean(2).transpose(1, 0, 2),
            "states.mask": trace.text_mask.sum(1) > 0,
        }

    def finalize(self, stats, info):
        from value_jax.probes.results import Result

        return Result(
            self.name,
            {
                "states": np.array(stats["states"]),
                "memmap": isinstance(stats["states"], LayerFiles)
                and all(isinstance(m, np.memmap) for m in stats["states"].layers),
            },
        )


def test_collected_features_spill_to_disk_beyond_the_budget(tiny, tmp_path):
    """Memory flat in N: with a zero budget every collected row goes to disk and reaches
    finalize as a memmap equal to the in-memory collection, also across a kill and resume."""
    cfg, model, params = tiny
    loader = _loader(cfg, n_batches=5)
    held = run_probes(model, params, loader, [_Collecting()], progress_every=100)["collecting"]
    assert not held.data["memmap"]
    spill = tmp_path / "spill"
    spilled = run_probes(
        model,
        params,
        loader,
        [_Collecting()],
        progress_every=100,
        spill_dir=str(spill),
        collect_budget_mb=0,
    )["collecting"]
    assert spilled.data["memmap"] and not spill.exists()  # removed after the run
    np.testing.assert_array_equal(spilled.data["states"], held.data["states"])

    state = str(tmp_path / "state")
    with pytest.raises(_Interrupted):
        run_probes(
            model,
            params,
            _interrupting(loader, 4),
            [_Collecting()],
            state_dir=state,
            checkpoint_every=3,
            progress_every=100,
            collect_budget_mb=0,
        )
    # Spilled layer-major: one file per layer of the [N, L, D] rows.
    files = sorted(os.listdir(tmp_path / "state.spill" / "p0" / "collecting"))
    assert files == [f"states.layer{i:03d}.bin" for i in range(cfg.num_layers + 1)], files
    # Row 4's features were spilled after the save at batch 3: the resume must cut them off.
    resumed = run_probes(
        model,
        params,
        loader,
        [_Collecting()],
        state_dir=state,
        checkpoint_every=3,
        progress_every=100,
        collect_budget_mb=0,
    )
    np.testing.assert_array_equal(resumed["collecting"].data["states"], held.data["states"])


def test_spilled_rows_in_the_one_file_layout_are_refused(tmp_path):
    """A state spilled [N, L, D] rows to one file before they went one file per layer: its
    rows are not read as if they were layer-major."""
    from value_jax.state import Collected

    path = str(tmp_path / "states.bin")
    np.zeros((4, 3, 2), np.float32).tofile(path)
    meta = {"rows": 4, "dtype": "<f4", "trail": [3, 2]}  # no "layout": the one-file layout
    with pytest.raises(ValueError, match="states.bin's rows as rows, this version as layer-major"):
        Collected(path).reopen(meta)
    rows = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    fresh = Collected(path)
    fresh.append(rows)
    fresh.spill()
    again = Collected(path)
    again.reopen(fresh.on_disk())
    np.testing.assert_array_equal(np.asarray(again.array()), rows)
    np.testing.assert_array_equal(again.array()[[3, 1], 2], rows[[3, 1], 2])
