"""Checkpoint writing survives faults: atomic swap with a completion marker, rotation, stale
temporaries, a full disk (simulated OSError) cleaned up and reported, metrics truncation."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from fastalign.trainer import checkpoint as C
from tests.trainer_helpers import one_thread  # noqa: F401


def write_files(**files):
    def write(directory: Path) -> None:
        for name, text in files.items():
            (directory / name).write_text(text)

    return write


def test_write_atomic_swaps_a_complete_directory_in(tmp_path):
    path = C.write_atomic(tmp_path / "final", write_files(a="1"), {"step": 1})
    assert C.is_complete(path) and C.read_marker(path) == {"step": 1}
    C.write_atomic(tmp_path / "final", write_files(b="2"), {"step": 2})
    assert sorted(p.name for p in path.iterdir()) == [C.MARKER, "b"]  # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporaries left


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_checkpoint(tmp_path):
    C.write_atomic(tmp_path / "final", write_files(a="good"), {"step": 1})

    def disk_full(directory: Path) -> None:
        (directory / "model.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.safetensors"))

    with pytest.raises(C.CheckpointError, match="No space left on device") as info:
        C.write_atomic(tmp_path / "final", disk_full, {"step": 2})
    assert "model.safetensors" in str(info.value) and "intact" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert (tmp_path / "final" / "a").read_text() == "good" and C.is_complete(tmp_path / "final")


def test_an_interrupt_during_a_write_removes_the_temporary(tmp_path):
    def interrupted(directory: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.write_atomic(tmp_path / "checkpoint-1", interrupted, {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 10):
        C.write_atomic(tmp_path / f"checkpoint-{step}", write_files(), {"step": step})
    (tmp_path / "checkpoint-11").mkdir()  # incomplete: not counted, not deleted
    C.rotate(tmp_path, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-10", "checkpoint-11", "checkpoint-3"]
    C.rotate(tmp_path, keep=0)  # 0 keeps all
    assert len(list(tmp_path.iterdir())) == 3


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".checkpoint-4.tmp-123").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    C.remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_read_state_refuses_missing_incomplete_and_foreign_directories(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        C.read_state(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / C.STATE_FILE).write_bytes(b"\x80\x02trunc")
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        C.read_state(tmp_path / "half")
    (tmp_path / "half" / C.MARKER).write_text("{}")
    with pytest.raises(ValueError, match="refused without running it"):
        C.read_state(tmp_path / "half")


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    source = tmp_path / "old" / "metrics.jsonl"
    source.parent.mkdir()
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    source.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # cut short by a kill
    fresh = tmp_path / "new" / "metrics.jsonl"
    fresh.parent.mkdir()
    C.truncate_metrics(fresh, 2, source)
    assert fresh.read_text().splitlines() == lines[:2]
    C.truncate_metrics(source, 3)
    assert source.read_text().splitlines() == lines[:3]


def test_disk_full_while_training_stops_with_what_failed(tmp_path, monkeypatch, capsys):
    """Through the CLI: an OSError inside the save is an ``error:`` line and status 1; the
    checkpoint of step 1 stays, step 2 leaves no directory."""
    pytest.importorskip("transformers")
    from fastalign.cli import main

    real = C.save_state

    def full_at_step_2(state, directory):
        if state["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / C.STATE_FILE))
        real(state, directory)

    monkeypatch.setattr(C, "save_state", full_at_step_2)
    run = tmp_path / "run"
    argv = ["train", "--loss", "dpo", "--max-steps", "3", "--save-steps", "1", "--batch-size", "4"]
    argv += ["--sft-warmup-steps", "2", "--output-dir", str(run), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: saving checkpoint" in err and "No space left on device" in err
    assert "trainer_state.pt" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert C.is_complete(run / "checkpoint-1")
