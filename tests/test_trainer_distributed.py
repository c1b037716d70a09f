"""Two CPU processes over gloo (DDP) give the single-process loss and gradients, padded and
packed, and stop together when one of them gets a signal."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from fastalign.trainer.loop import TrainConfig, Trainer  # noqa: E402
from tests.distributed import free_port, set_rank_env  # noqa: E402

SETUP = dict(loss="dpo", max_steps=1, sft_warmup_steps=5, progress=False)


def _grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    batch = next(trainer._stream())
    out = trainer.compute(batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    return float(out.loss), grads


def _worker(rank, world, port, out_dir, packing, results):
    set_rank_env(rank, world, port)
    try:
        trainer = Trainer(TrainConfig(batch_size=2, output_dir=out_dir, packing=packing, **SETUP))
        loss, grads = _grads(trainer)
        results[rank] = (loss, grads)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_match_one(tmp_path, packing):
    port = free_port()
    results = mp.Manager().dict()
    args = (2, port, str(tmp_path / "ddp"), packing, results)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    single_loss, single_grads = _grads(
        Trainer(
            TrainConfig(batch_size=4, output_dir=str(tmp_path / "one"), packing=packing, **SETUP)
        )
    )
    (loss0, grads0), (loss1, grads1) = results[0], results[1]
    # Each rank holds half of the pairs: the mean of the two means is the full-batch mean.
    assert (loss0 + loss1) / 2 == pytest.approx(single_loss, rel=1e-5)
    for name, grad in single_grads.items():
        torch.testing.assert_close(grads0[name], grads1[name], rtol=0, atol=0)  # all-reduced
        torch.testing.assert_close(grads0[name], grad, rtol=1e-4, atol=1e-6)


def _stop_worker(rank, world, port, results):
    import signal

    from fastalign.trainer.interrupt import agreed_signal

    set_rank_env(rank, world, port)
    torch.distributed.init_process_group("gloo")
    try:
        got = signal.SIGTERM if rank == 1 else None  # only rank 1 was signalled
        results[rank] = (
            agreed_signal(None, True, torch.device("cpu")),
            agreed_signal(got, True, torch.device("cpu")),
        )
    finally:
        torch.distributed.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank():
    """All ranks agree on stopping after the same step (the save is a collective)."""
    import signal

    results = mp.Manager().dict()
    mp.spawn(_stop_worker, args=(2, free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1] == (0, int(signal.SIGTERM))
