"""Faults delivered as real signals to a training subprocess: SIGINT/SIGTERM mid-run save a
checkpoint and exit cleanly, and resuming from it equals the uninterrupted run; a SIGKILL
during a save leaves the previous checkpoint usable and the half-written one refused."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from fastalign.trainer import checkpoint as C  # noqa: E402
from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402
from tests.trainer_helpers import child_env, one_thread, records  # noqa: E402, F401

SETTINGS = dict(loss="dpo", max_steps=4, batch_size=4, logging_steps=1, sft_warmup_steps=5)
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()] + ["--no-progress"]

# The child runs the real CLI; a hook (after step 2, or inside the save of step 3) tells the
# test where it is and then waits there, so the signal lands at a known point.
CHILD = """
import signal, sys, time
from pathlib import Path
from fastalign import cli
from fastalign.trainer import checkpoint, interrupt, loop

ready, mode = Path(sys.argv[1]), sys.argv[2]

def armed():
    handler = signal.getsignal(signal.SIGTERM)
    return isinstance(getattr(handler, "__self__", None), interrupt.StopRequest)

if mode == "signal":
    step = loop.Trainer._train_step
    def hooked(self, stream):
        merged = step(self, stream)
        if self.step == 2:
            ready.touch()
            deadline = time.time() + 60
            while armed() and time.time() < deadline:  # until the signal has been taken
                time.sleep(0.02)
        return merged
    loop.Trainer._train_step = hooked
else:
    save_state = checkpoint.save_state
    def slow(state, directory):
        if state["step"] == 3:
            ready.touch()
            time.sleep(60)  # killed here, mid-save
        save_state(state, directory)
    checkpoint.save_state = slow
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    run = tmp_path_factory.mktemp("straight")
    Trainer(TrainConfig(output_dir=str(run), progress=False, **SETTINGS)).train()
    return records(run)


def start_child(tmp_path: Path, mode: str, *flags: str) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "ready"
    env = child_env()
    argv = [sys.executable, "-c", CHILD, str(ready), mode, "train", *FLAGS, *flags]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the child never reached its hook (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.1)
    return proc, ready


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_and_resuming_equals_the_uninterrupted_run(tmp_path, signum, uninterrupted):
    run = tmp_path / "run"
    proc, _ = start_child(tmp_path, "signal", f"--output-dir={run}")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"stopped by {signal.Signals(signum).name} after step 2" in err
    assert "Traceback" not in err
    assert C.is_complete(run / "checkpoint-2") and not (run / "final").exists()
    assert records(run) == uninterrupted[:2]
    resumed = tmp_path / "resumed"
    Trainer(
        TrainConfig(
            output_dir=str(resumed),
            resume_from=str(run / "checkpoint-2"),
            progress=False,
            **SETTINGS,
        )
    ).train()
    assert records(resumed) == uninterrupted


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc, _ = start_child(tmp_path, "save", f"--output-dir={run}", "--save-steps=1")
    proc.kill()  # SIGKILL while checkpoint-3 is being written
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = [p for p in run.iterdir() if p.name.startswith(".checkpoint-3.tmp-")]
    assert len(partial) == 1 and not C.is_complete(partial[0])
    assert not (run / "checkpoint-3").exists() and C.is_complete(run / "checkpoint-2")
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        Trainer(
            TrainConfig(resume_from=str(partial[0]), output_dir=str(tmp_path / "x"), **SETTINGS)
        )
    # Resumed in the same directory: the temporary is cleared, metrics cut back to step 2.
    config = TrainConfig(
        output_dir=str(run), resume_from=str(run / "checkpoint-2"), progress=False, **SETTINGS
    )
    Trainer(config).train()
    assert records(run) == uninterrupted
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
