"""Bad input fails early and clearly: ``error: ...`` naming the flag, file and line, exit
status 2, before any model loads, no run directory left, no Hub request, no hang. Most cases
call the validation layer in-process; a handful run the real CLI in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from fastalign.trainer import validation as V  # noqa: E402
from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402
from tests.trainer_helpers import ROOT, child_env, malicious_checkpoint, one_thread  # noqa: E402, F401

ROWS = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a)} for a in range(3)]

BAD_FLAGS = [
    (dict(batch_size=0), "--batch-size must be an integer ≥ 1, got 0"),
    (dict(batch_size=-4), "--batch-size must be an integer ≥ 1, got -4"),
    (dict(grad_accum=0), "--grad-accum must be an integer ≥ 1"),
    (dict(logging_steps=0), "--logging-steps must be an integer ≥ 1"),
    (dict(max_steps=0), "--max-steps must be"),
    (dict(loss="kto", batch_size=1), "--loss kto needs --batch-size ≥ 2"),
    (dict(loss="typo", lam=-1.0), "--lam must be a number ≥ 0, got -1.0"),
    (dict(loss="kto", desirable_weight=0.0), "--desirable-weight must be a number > 0"),
    (dict(max_prompt_length=0), "--max-prompt-length must be an integer ≥ 1"),
    (dict(max_completion_length=-1), "--max-completion-length must be"),
    (dict(warmup_ratio=-1.0), r"--warmup-ratio must be a number in \[0, 1\]"),
    (dict(learning_rate=float("nan")), "--learning-rate must be a number > 0, got nan"),
    (dict(beta=0.0), "--beta must be a number > 0"),
    (dict(save_total_limit=-1), "--save-total-limit must be"),
    (dict(loss_type="kto_pair"), "--loss-type must be one of"),
    (dict(reference="peft"), "--reference peft needs a LoRA adapter"),
    (dict(loss="kto", reference="precomputed"), "KTO's mismatched pairs"),
    (dict(model="./no/such/model"), "--model ./no/such/model: no such directory"),
    (dict(ref_model="/no/such/reference"), "--ref-model /no/such/reference: no such"),
    (dict(loss="rlhf"), "unknown loss 'rlhf'"),
    (dict(loss="simpo", ref_model="/tmp/ref"), "--ref-model /tmp/ref does not apply to --loss"),
    (dict(loss="orpo", reference="precomputed"), "--reference precomputed does not apply to"),
    (dict(loss="typo", reference="peft", lora_rank=4), "--reference peft does not apply to"),
    (dict(loss_type="sft", reference="precomputed"), "--reference precomputed does not apply"),
    (dict(loss="simpo", nll_weight=-1.0), "--nll-weight must be a finite number >= 0.0, got -1"),
    (dict(loss="simpo", gamma=float("nan")), "--gamma must be a finite number >= 0.0, got nan"),
    (dict(loss="cpo", gamma=-0.5), "--gamma must be a finite number >= 0.0"),
    (dict(loss="cpo", cpo_alpha=-1.0), "--cpo-alpha must be a finite number >= 0.0"),
    (dict(loss="cpo", alphapo_alpha=float("inf")), "--alphapo-alpha must be a finite number"),
    (dict(loss="cpo", loss_type="hinge", label_smoothing=0.1), "--label-smoothing does not"),
    (dict(loss="dpo", undesirable_weight=3.0), "--undesirable-weight does not apply to --loss"),
    (dict(loss="ipo", label_smoothing=0.3), "--label-smoothing does not apply to --loss ipo"),
    (dict(loss="dpo", lam=0.1), "--lam does not apply to --loss dpo .*typo"),
    (dict(loss="kto", sample_column="s"), "--sample-column does not apply to --loss kto"),
    (dict(loss="dpo", kto_kl_offset=-1), "--kto-kl-offset does not apply to --loss dpo .*kto"),
    (dict(lora_dropout=0.1), "--lora-dropout 0.1 does not apply here: .* --lora-rank > 0"),
    (dict(seed=2**32), r"--seed must be an integer in \[0, 2\*\*32 - 1\], got 4294967296"),
    (dict(backend="cuda"), "--backend must be one of auto, triton, torch, got 'cuda'"),
]
# Flags at their default (argparse fills every default) or where they apply are not refused.
GOOD_FLAGS = [
    dict(loss="kto", label_smoothing=0.0, desirable_weight=1.0, undesirable_weight=2.0),
    dict(loss="kto", kto_kl_offset=-1, lam=0.05, sample_column="sample"),
    dict(loss="typo", lam=0.5, sample_column="s"),
    dict(loss="simpo", label_smoothing=0.2, gamma=0.0, nll_weight=0.5),
    dict(loss="cpo", loss_type="alphapo", alphapo_alpha=-0.5, cpo_alpha=0.0, gamma=1.0),
    dict(lora_rank=2, lora_alpha=8.0, lora_dropout=0.1, lora_target_modules="q_proj"),
    dict(loss="orpo", sft_warmup_steps=0, lora_target_modules="all-linear", seed=2**32 - 1),
]


@pytest.mark.parametrize("settings, message", BAD_FLAGS, ids=[m[:24] for _, m in BAD_FLAGS])
def test_bad_flags_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        V.check_config(TrainConfig(**settings))


@pytest.mark.parametrize(
    "settings", GOOD_FLAGS, ids=[s["loss"] if "loss" in s else "lora" for s in GOOD_FLAGS]
)
def test_flags_that_apply_or_are_at_their_default_pass(settings):
    V.check_config(TrainConfig(**settings))


def test_router_coefficient_on_a_moe_config_passes(tmp_path):
    from transformers import MixtralConfig

    MixtralConfig(num_hidden_layers=1).save_pretrained(tmp_path)  # the config only, no weights
    V.check_config(TrainConfig(model=str(tmp_path), router_aux_loss_coef=0.01))
    with pytest.raises(ValueError, match="--router-aux-loss-coef 0.01 does not apply here"):
        V.check_config(TrainConfig(router_aux_loss_coef=0.01, router_aux_loss=False))


def test_model_paths_local_or_hub():
    V.check_model_path("Qwen/Qwen3-0.6B", "--model")  # a Hub id: left to from_pretrained
    with pytest.raises(ValueError, match="no config.json there"):
        V.check_model_path(str(ROOT / "tests"), "--model")
    for local in ("../missing", "~/missing-model", "runs/a/b/final/model", "model/"):
        with pytest.raises(ValueError, match="no such directory"):
            V.check_model_path(local, "--model")


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_data_file_errors_name_file_and_line(tmp_path):
    columns = ("prompt", "chosen", "rejected")
    cases = {
        "missing": (None, "missing.jsonl: no such file"),
        "empty": ([""], "empty.jsonl: the file is empty"),
        "malformed": ([ROWS[0], '{"prompt": "1+1=", "chosen": 2'], r"malformed.jsonl, line 2: not"),
        "array": ([ROWS[0], "[1, 2]"], "array.jsonl, line 2: expected a JSON object"),
        "no_column": (ROWS[:2] + [{"prompt": "x", "chosen": "y"}], "line 3: column 'rejected'"),
        "null": ([{**ROWS[0], "chosen": None}], "line 1: column 'chosen' is missing or null"),
        "number": ([{**ROWS[0], "chosen": 5}], "line 1: column 'chosen' must be a string or"),
        "one_row_mixed": ([{**ROWS[0], "prompt": [{"role": "user", "content": "1+1="}]}],
                          "line 1: column 'chosen' is plain text, but line 1's 'prompt' is chat"),
    }  # fmt: skip
    for name, (lines, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        if lines is not None:
            write_jsonl(path, lines)
        with pytest.raises(ValueError, match=message):
            V.check_file(path, "paired", columns)
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": 1}])
    with pytest.raises(ValueError, match="kto.jsonl, line 1: column 'label' must be true or false"):
        V.check_file(kto, "unpaired", ("prompt", "completion"))
    broken = tmp_path / "rows.json"
    broken.write_text('[\n {"prompt": "a",\n  "chosen": }\n]')
    with pytest.raises(ValueError, match=r"rows.json, line 3: not valid JSON"):
        V.check_file(broken, "paired", columns)
    chat = [{"role": "user", "content": "1+1="}]
    fine = [{"prompt": chat, "chosen": [{"role": "assistant", "content": "2"}]}]
    fine[0]["rejected"] = [{"role": "assistant", "content": "3"}]
    V.check_file(write_jsonl(tmp_path / "chat.jsonl", fine), "paired", columns)  # accepted


def test_more_batch_rows_than_data_fails_before_any_model_loads(tmp_path, monkeypatch):
    from fastalign.trainer import default

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(default, "default_model", no_model)
    data = write_jsonl(tmp_path / "three.jsonl", ROWS)
    run = tmp_path / "runs" / "run"  # its missing parent is not left behind either
    with pytest.raises(ValueError, match="--batch-size 4 needs at least 4 training rows; the"):
        Trainer(TrainConfig(dataset=str(data), batch_size=4, output_dir=str(run)))
    half_pairs = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "1+1=", "chosen": "2"}] * 3)
    with pytest.raises(ValueError, match="lacks column"):  # (full pairs KTO unpairs, as TRL)
        Trainer(TrainConfig(loss="kto", dataset=str(half_pairs), batch_size=2, output_dir=str(run)))
    assert not run.parent.exists()


def test_main_reports_errors_with_status_2(tmp_path, capsys):
    from fastalign.cli import main

    run = tmp_path / "run"
    for flags, message in [
        (["--grad-accum", "0"], "--grad-accum must be"),
        (["--logging-steps", "0"], "--logging-steps must be"),
        (["--resume-from", str(tmp_path / "nope")], "no such checkpoint directory"),
    ]:
        assert main(["train", "--loss", "dpo", "--output-dir", str(run), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    half = tmp_path / "half"
    half.mkdir()
    assert main(["train", "--loss", "dpo", "--resume-from", str(half)]) == 2
    assert "no COMPLETE marker" in capsys.readouterr().err
    assert not run.exists()


# ------------------------------------------------------------------ real subprocesses
def run_cli(
    *argv: str, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m fastalign.cli ...`` of this checkout, offline; a hang fails the test."""
    command = [sys.executable, "-m", "fastalign.cli", *argv]
    env = child_env() if env is None else env
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]  # after any third-party progress bars
    assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_cli_bad_input_subprocesses(tmp_path):
    """Each case once through the real CLI: status 2, one ``error:`` line, no run directory."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{not json"])
    target = tmp_path / "pwned.txt"
    evil = malicious_checkpoint(tmp_path / "evil", target)
    cases = [
        (["--batch-size", "1000"], "--batch-size 1000 needs at least 1000 training rows"),
        (["--dataset", str(bad)], "bad.jsonl, line 2: not valid JSON"),
        (["--model", str(tmp_path / "no-model")], "no such directory"),
        (["--model", "no-such-org/no-such-model"], "could not be loaded"),  # offline Hub id
        (["--resume-from", str(evil)], "refused without running it"),
    ]
    for i, (flags, message) in enumerate(cases):
        run = tmp_path / f"run{i}"
        start = time.perf_counter()
        proc = run_cli("train", "--loss", "dpo", "--output-dir", str(run), *flags)
        assert_clean_error(proc, message)
        assert not run.exists(), flags
        if flags[0] == "--model":  # no Hub retries
            assert time.perf_counter() - start < 60
    assert not target.exists()  # the crafted checkpoint's payload never ran


def test_cli_plot_of_an_empty_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert_clean_error(run_cli("plot", str(tmp_path), timeout=60), "has no records yet")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "lo\n')
    assert_clean_error(run_cli("plot", str(tmp_path), timeout=60), "metrics.jsonl, line 2")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"loss": 0.6}\n')
    assert_clean_error(run_cli("plot", str(tmp_path), timeout=60), "line 2: not a metrics record")


def _data_file(tmp_path: Path, name: str) -> Path:
    """The tiny data files of the refusals below."""
    chat = {"prompt": [{"role": "user", "content": "9+2="}], "chosen": [{"role": "assistant",
            "content": "11"}], "rejected": [{"role": "assistant", "content": "12"}]}  # fmt: skip
    if name == "nonutf8.jsonl":
        row = b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
        (tmp_path / name).write_bytes(row * 2 + row.replace(b"+", b"\xff"))
    elif name == "mixed.jsonl":
        write_jsonl(tmp_path / name, ROWS * 2 + [chat])
    elif name == "columnar.json":
        columns = {key: [row[key] for row in ROWS * 2] for key in ROWS[0]}
        (tmp_path / name).write_text(json.dumps(columns))
    elif name == "test_only":
        write_jsonl((tmp_path / name).mkdir() or tmp_path / name / "test.jsonl", ROWS * 2)
    elif name == "good.jsonl":
        write_jsonl(tmp_path / name, ROWS * 2)
    elif name == "model":
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
    else:  # a plain file where a directory is expected
        (tmp_path / name).write_text("not a directory")
    return tmp_path / name


# (flags, with {name} a file made by _data_file, message). Each was accepted and failed late
# (after the model was built, or with a traceback) or named a field instead of the flag.
REFUSED = [
    (["--loss", "simpo", "--nll-weight", "-1"], "--nll-weight must be a finite number >= 0.0"),
    (["--loss", "simpo", "--gamma", "nan"], "--gamma must be a finite number >= 0.0, got nan"),
    (["--loss", "cpo", "--cpo-alpha", "-1"], "--cpo-alpha must be a finite number >= 0.0"),
    (["--loss", "cpo", "--alphapo-alpha", "nan"], "--alphapo-alpha must be a finite number"),
    (["--dataset", "{nonutf8.jsonl}"], "nonutf8.jsonl, line 3: not UTF-8 text (byte 0xff"),
    (["--dataset", "{good.jsonl}", "--eval-dataset", "{nonutf8.jsonl}"],
     "error: --eval-dataset {nonutf8.jsonl}, line 3: not UTF-8"),
    (["--dataset", "{mixed.jsonl}"], "mixed.jsonl, line 7: column 'prompt' is chat messages"),
    (["--dataset", "{test_only}"], "test_only has no 'train' split (it has 'test')"),
    (["--dataset", "{columnar.json}"], "columnar.json: expected a list of row objects"),
    (["--desirable-weight", "1"], "--desirable-weight does not apply to --loss dpo"),
    (["--undesirable-weight", "3"], "--undesirable-weight does not apply to --loss dpo"),
    (["--lora-alpha", "8"], "--lora-alpha 8.0 does not apply here: it scales a LoRA adapter"),
    (["--lora-target-modules", "q_proj"], "--lora-target-modules q_proj does not apply here"),
    (["--loss", "kto", "--label-smoothing", "0.3"], "--label-smoothing does not apply to --loss"),
    (["--loss", "typo", "--label-smoothing", "0.3"], "--label-smoothing does not apply to --loss"),
    (["--model", "{model}", "--sft-warmup-steps", "50"], "--sft-warmup-steps 50 does not apply"),
    (["--router-aux-loss-coef", "0.01"], "0.01 does not apply: the embedded default model is"),
    (["--model", "{model}", "--router-aux-loss-coef", "0.1"], "{model} is not a Mixture-of-Exp"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32 - 1], got -1"),
    (["--output-dir", "{file.txt}"], "--output-dir {file.txt}: not a directory"),
    (["--output-dir", "{file.txt}/run"], "--output-dir {file.txt}/run: not a directory"),
    (["--backend", "triton"], "--backend triton needs a CUDA GPU (none is visible)"),
    # judged once the model is built (peft's own name matching), before any step or directory
    (["--lora-rank", "2", "--lora-target-modules", "nonexistent"],
     "--lora-target-modules nonexistent: Target modules"),
]  # fmt: skip


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f)[:40] for f, _ in REFUSED])
def test_cli_refuses_before_any_work(flags, message, tmp_path):
    """Through the real CLI: ``error:`` naming the flag, status 2, no run directory."""
    paths: dict[str, str] = {}

    def made(text: str) -> str:  # "{name}" -> the path of that file, made once in tmp_path
        def path(match) -> str:
            if match[1] not in paths:
                paths[match[1]] = str(_data_file(tmp_path, match[1]))
            return paths[match[1]]

        return re.sub(r"\{(.+?)\}", path, text)

    flags, message = [made(f) for f in flags], made(message)
    env = {k: v for k, v in child_env().items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # --backend triton: no GPU and no interpreter
    run = tmp_path / "run"
    output = [] if "--output-dir" in flags else ["--output-dir", str(run)]
    loss = [] if "--loss" in flags else ["--loss", "dpo"]
    proc = run_cli("train", *loss, *output, *flags, "--no-progress", env=env, timeout=60)
    assert_clean_error(proc, message)
    assert not run.exists()
