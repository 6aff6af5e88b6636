"""A conversion killed by SIGINT or SIGTERM while it writes leaves no `.<out>.tmp-*` folder, and
folders that killed conversions left before are swept by the next one."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from absl import flags
from absl.testing import flagsaver

from checkpoints_convert.fake import write_fake_checkpoint
from value_jax.checkpoint import interruptible, sweep_stale_tmp
from value_jax.models import UniterConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = UniterConfig.tiny()

# The CLI, with the orbax write held open once the params are on disk, so that the signal lands
# mid-save every time.
SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import orbax.checkpoint as ocp
    save, finish = ocp.StandardCheckpointer.save, ocp.StandardCheckpointer.wait_until_finished
    state = {"saved": False, "held": False}
    def saving(self, *args, **kwargs):
        save(self, *args, **kwargs)
        state["saved"] = True
    def held_open(self):
        finish(self)
        if state["saved"] and not state["held"]:
            state["held"] = True
            open(sys.argv[1], "w").close()
            time.sleep(120)
    ocp.StandardCheckpointer.save = saving
    ocp.StandardCheckpointer.wait_until_finished = held_open
    from absl import app
    from checkpoints_convert.__main__ import main
    app.run(main, argv=["checkpoints_convert"] + sys.argv[2:])
""")


def _temporaries(parent, name):
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}.tmp-"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_save_removes_the_temporary_folder(sig, tmp_path):
    src = write_fake_checkpoint(str(tmp_path / "u.pth"), "uniter", U, seed=0)
    (tmp_path / "slow_save.py").write_text(SLOW_SAVE)
    ready, out = tmp_path / "ready", tmp_path / "ckpt"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "slow_save.py"),
            str(ready),
            f"--src={src}",
            "--format=uniter",
            f"--out={out}",
            f"--num_heads={U.num_heads}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.1)
        [tmp] = _temporaries(tmp_path, "ckpt")
        assert sorted(os.listdir(tmp_path / tmp)) == ["config.json", "params"]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}: nothing written at {out}" in err
    assert _temporaries(tmp_path, "ckpt") == [] and not out.exists()


def _dead_pid():
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


def test_stale_temporaries_of_dead_processes_are_swept_and_reported(tmp_path, capsys):
    dead = tmp_path / f".ckpt.tmp-{_dead_pid()}-abc"
    older = tmp_path / ".ckpt.tmp-x1y2z3"  # written before the pid was in the name
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-def"
    other = tmp_path / f".ckpt2.tmp-{_dead_pid()}-ghi"
    for d in (dead, older, live, other):
        (d / "params").mkdir(parents=True)
    src = write_fake_checkpoint(str(tmp_path / "u.pth"), "uniter", U, seed=0)
    import checkpoints_convert.__main__ as cli

    argv = [
        "checkpoints_convert",
        f"--src={src}",
        "--format=uniter",
        f"--out={tmp_path / 'ckpt'}",
        f"--num_heads={U.num_heads}",
    ]
    with flagsaver.flagsaver():
        flags.FLAGS(argv)
        cli.main(argv[:1])
    err = capsys.readouterr().err
    assert f"removed {dead}, left by an interrupted conversion" in err
    assert f"removed {older}, left by an interrupted conversion" in err
    assert not dead.exists() and not older.exists()
    assert live.exists() and other.exists()  # a running save, and another --out's
    assert (tmp_path / "ckpt" / "config.json").exists()
    assert sweep_stale_tmp(str(tmp_path / "ckpt")) == []


def test_interruptible_turns_sigterm_into_keyboard_interrupt_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before
