"""FSDP2 in the trainer on CPU/gloo: the 30B launch commands of ``docs/recipe_30b.md`` at tiny
scale under torchrun, equality with one process (DPO, KTO, tied head, activation
checkpointing), and exact resume from an FSDP checkpoint."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from fastalign.losses import kto as kto_module  # noqa: E402
from fastalign.trainer import default  # noqa: E402
from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402
from tests.distributed import free_port, set_rank_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(max_steps=1, sft_warmup_steps=5, progress=False, batch_size=2, learning_rate=1e-2)
# (loss, tied lm_head, activation checkpointing)
# (loss, tied lm_head, activation checkpointing, packing)
CASES = [
    ("dpo", False, False, False),
    ("dpo", True, True, False),
    ("kto", False, True, False),
    ("kto", True, False, False),
    ("dpo", False, True, True),
    ("kto", True, False, True),
]


# ------------------------------------------------------------------ the launch commands
def launch_commands() -> dict[str, list[str]]:
    """The ```bash blocks of the recipe's "## Launch" section, as argv lists keyed by loss."""
    text = (ROOT / "docs" / "recipe_30b.md").read_text()
    section = text.split("## Launch", 1)[1].split("\n## ", 1)[0]
    commands = {}
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        argv = shlex.split(block.replace("\\\n", " "))
        commands[argv[argv.index("--loss") + 1]] = argv
    return commands


def tiny(argv: list[str], output_dir: Path, steps: int = 2, **flags) -> list[str]:
    """The recipe command at test scale: 2 processes, the embedded model and data (no
    ``--model``/``--dataset``), a few steps, a temporary output dir; other flags as written."""
    assert argv[0] == "torchrun", argv
    out = [sys.executable, "-m", "torch.distributed.run"]
    drop = {"--model", "--dataset"}
    replace = {
        "--nproc-per-node": "2",
        "--max-steps": str(steps),
        "--output-dir": str(output_dir),
        "--grad-accum": "2",
        "--logging-steps": "1",
    }
    args = iter(argv[1:])
    for arg in args:
        if arg in drop:
            next(args)
        elif arg in replace:
            out += [arg, replace[arg]]
            next(args)
        else:
            out.append(arg)
    for name, value in {"sft-warmup-steps": 5, **flags}.items():
        out += [f"--{name}", str(value)]
    return out + ["--no-progress"]


def run_launch(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, whatever is installed
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_recipe_launch_commands_run_at_tiny_scale(tmp_path):
    commands = launch_commands()
    assert set(commands) == {"dpo", "kto"}
    for argv in commands.values():
        assert {"--fsdp", "--activation-checkpointing", "--bf16"} <= set(argv)
        assert argv[argv.index("--nproc-per-node") + 1] == "8"
    # DPO, 3 steps with a checkpoint at step 2, then resumed from it in the same directory:
    # the resumed step 3 must be the uninterrupted step 3.
    dpo = tmp_path / "dpo"
    run_launch(tiny(commands["dpo"], dpo, steps=3, **{"save-steps": 2}))
    assert [r["step"] for r in records(dpo)] == [1, 2, 3]
    assert (dpo / "checkpoint-2" / "model" / "config.json").exists()
    assert (dpo / "final" / "trainer_state.pt").exists()
    uninterrupted = records(dpo)[2]
    run_launch(tiny(commands["dpo"], dpo, steps=3, **{"resume-from": dpo / "checkpoint-2"}))
    assert [r["step"] for r in records(dpo)] == [1, 2, 3]  # truncated to the checkpoint
    resumed = records(dpo)[2]
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-9), key
    kto = tmp_path / "kto"
    run_launch(tiny(commands["kto"], kto))
    assert [r["step"] for r in records(kto)] == [1, 2]
    assert "kl" in records(kto)[-1]
    assert (kto / "final" / "model" / "config.json").exists()


# ------------------------------------------------------------------ FSDP == one process
@contextlib.contextmanager
def tied_default(tied: bool):
    """The embedded default model, its lm_head tied to the embedding or not."""
    model = functools.partial(default.default_model, tie_word_embeddings=tied)
    with mock.patch.object(default, "default_model", model):
        yield


def config(loss: str, checkpointing: bool, output_dir: str, **kwargs) -> TrainConfig:
    return TrainConfig(
        loss=loss,
        activation_checkpointing=checkpointing,
        output_dir=output_dir,
        **FAST,
        **kwargs,
    )


def step_results(trainer: Trainer, batches: list[dict]) -> dict:
    """Loss per microbatch, gradients of their mean, parameters after one clipped AdamW step
    — full tensors, gathered from FSDP's shards."""

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    trainer.optimizer.zero_grad(set_to_none=True)  # the SFT warm-up leaves its last gradients
    attention = trainer.model.model.layers[0].self_attn
    calls = []
    handle = attention.register_forward_hook(lambda *_: calls.append(1))
    losses = []
    for batch in batches:
        out = trainer.compute(batch)
        (out.loss / len(batches)).backward()
        losses.append(float(out.loss.detach()))
    handle.remove()
    params = dict(trainer.model.named_parameters())
    grads = {n: full(p.grad).detach().clone() for n, p in params.items()}
    torch.nn.utils.clip_grad_norm_(list(params.values()), trainer.config.max_grad_norm)
    trainer.optimizer.step()
    updated = {n: full(p.detach()).clone() for n, p in params.items()}
    return dict(losses=losses, grads=grads, params=updated, attention_calls=len(calls))


def _worker(rank, world, port, out_dir, results):
    set_rank_env(rank, world, port)
    try:
        for i, (loss, tied, checkpointing, packing) in enumerate(CASES):
            with tied_default(tied):
                trainer = Trainer(
                    config(loss, checkpointing, f"{out_dir}/{i}", fsdp=True, packing=packing)
                )
            assert trainer.fsdp_root is not None
            results[(rank, i)] = step_results(trainer, [next(trainer._stream())])
    finally:
        torch.distributed.destroy_process_group()


def single_process(loss: str, tied: bool, checkpointing: bool, packing: bool, out_dir: str) -> dict:
    """The same global batch in one process: both ranks' microbatches, gradients averaged.
    For KTO, z0 is the mean over both microbatches' mismatched pairs, as the all-reduce
    makes it."""
    with tied_default(tied):
        trainer = Trainer(config(loss, checkpointing, out_dir, packing=packing))
    batches = []
    for rank in range(2):
        trainer.rank, trainer.world = rank, 2
        batches.append(next(trainer._stream()))
    trainer.rank, trainer.world = 0, 1
    if loss != "kto":
        return step_results(trainer, batches)
    diffs = []

    def record(kl_policy, kl_ref_logps, process_group):
        diffs.append((kl_policy.logps.detach() - kl_ref_logps).double())
        return torch.zeros(())

    with mock.patch.object(kto_module, "_reference_point", record), torch.no_grad():
        for batch in batches:
            trainer.compute(batch)
    z0 = torch.cat(diffs).mean().clamp_min(0.0).float()
    with mock.patch.object(kto_module, "_reference_point", lambda *_: z0):
        return step_results(trainer, batches)


def test_fsdp_two_processes_match_one(tmp_path):
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, str(tmp_path / "fsdp"), results), nprocs=2, join=True)
    for i, (loss, tied, checkpointing, packing) in enumerate(CASES):
        case = f"{loss} tied={tied} checkpointing={checkpointing} packing={packing}"
        one = single_process(loss, tied, checkpointing, packing, str(tmp_path / f"one{i}"))
        ranks = [results[(0, i)], results[(1, i)]]
        assert [r["losses"][0] for r in ranks] == pytest.approx(one["losses"], rel=1e-5), case
        # The policy's first attention block runs once (KTO: once more, no grad, for the KL
        # rows), plus once in backward when checkpointing recomputes it.
        assert ranks[0]["attention_calls"] == 1 + (loss == "kto") + checkpointing, case
        assert ("lm_head.weight" in one["grads"]) == (not tied), case  # tied: one parameter
        for name, grad in one["grads"].items():
            torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ranks[1]["grads"][name], ranks[0]["grads"][name])
            torch.testing.assert_close(
                ranks[0]["params"][name], one["params"][name], rtol=1e-5, atol=1e-6
            )
