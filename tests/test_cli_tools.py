"""``fastalign plot`` and ``fastalign sample``: what they draw, and their input checks."""

from __future__ import annotations

import json

import pytest

from fastalign import cli
from tests.test_cli_errors import assert_clean_error, run_cli

pytest.importorskip("matplotlib")

TRAIN = [dict(step=s, loss=1.0 / s, grad_norm=0.5) for s in range(1, 7)]
EVAL = [{"step": s, "eval/loss": 2.0 / s, "eval/other": 0.1} for s in (2, 4, 6)]


def _records() -> list[dict]:
    """Training records with eval records logged after steps 2, 4 and 6, as the trainer
    writes them."""
    records = []
    for record in TRAIN:
        records.append(record)
        records += [e for e in EVAL if e["step"] == record["step"]]
    return records


def test_plot_panels_overlay_eval_on_its_training_metric():
    panels = cli.plot_panels(_records())
    assert panels == {
        "loss": ["loss", "eval/loss"],
        "grad_norm": ["grad_norm"],
        "other": ["eval/other"],
    }


def test_plot_draws_every_series_without_gaps(tmp_path, monkeypatch):
    """Each line holds only the records that have its key: the training loss has 6 points
    (no NaN gaps at the eval steps), the eval loss 3; a metric first seen in a later record
    is drawn too (before, the keys came from the first record alone)."""
    import matplotlib.axes

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _records()))
    drawn = []
    original = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, label=None, **kwargs):
        drawn.append((label, list(x), list(y)))
        return original(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    out = tmp_path / "m.png"
    assert cli.main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    steps = list(range(1, 7))
    assert sorted(drawn, key=str) == sorted(
        [
            ("train", steps, [1.0 / s for s in steps]),
            ("eval", [2, 4, 6], [1.0, 0.5, 2.0 / 6]),
            ("train", steps, [0.5] * 6),
            ("eval", [2, 4, 6], [0.1] * 3),
        ],
        key=str,
    )


def _sample_argv(tmp_path, **change) -> list[str]:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")  # enough for the path check; never loaded
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(dict(prompt="1+1=", chosen="2", rejected="3")) + "\n")
    args = {
        "--model": str(model),
        "--dataset": str(data),
        "--out": str(tmp_path / "out.jsonl"),
        **change,
    }
    return ["sample", *(x for item in args.items() for x in item)]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--top-p": "2"}, "--top-p must be"),
        ({"--top-p": "0"}, "--top-p must be"),
        ({"--temperature": "0"}, "--temperature must be"),
        ({"--max-new-tokens": "0"}, "--max-new-tokens must be"),
        ({"--top-k": "-1"}, "--top-k must be"),
        ({"--column": ""}, "--column must be a non-empty"),
        ({"--out": "out.txt"}, "expected a .json or .jsonl file"),
        ({"--model": "./no-such-model"}, "--model ./no-such-model: no such directory"),
        ({"--dataset": "EMPTY"}, "the file is empty"),
    ],
)
def test_sample_checks_its_input_before_loading_anything(change, message, tmp_path, capsys):
    """Every check runs before the model loads (the model directory here is a bare
    config.json: loading it would fail differently)."""
    if change.get("--dataset") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text("")
        change["--dataset"] = str(tmp_path / "empty.jsonl")
    assert cli.main(_sample_argv(tmp_path, **change)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_sample_bad_input_through_the_cli(tmp_path):
    proc = run_cli(*_sample_argv(tmp_path, **{"--top-p": "1.5"}), timeout=120)
    assert_clean_error(proc, "--top-p must be")
