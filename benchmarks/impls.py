"""Implementations × cases for the benchmarks: each builds a forward+backward closure.

An implementation is a function ``(case, inputs) -> closure`` or raises ``Unavailable`` with
the reason (peer not installed, no CUDA, loss not offered). Cases are the core op
(``logps``), policy+reference (``policy_ref``) and the losses (``dpo``, ``ipo``, ``kto``
with its mismatched rows, ``typo``), all on TRL's concatenated layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fastalign
from fastalign import eager as eager_ref

CASES = ("logps", "policy_ref", "dpo", "ipo", "kto", "typo")
# The log-prob case with a frozen lm_head (LoRA): no weight gradient is asked for.
FROZEN = "logps_frozen"
BETA = 0.1
LAM = 0.05  # TYPO's sample weight


class Unavailable(Exception):
    """This implementation cannot run this case here; the message says why."""


@dataclass(frozen=True)
class Shape:
    """Rows (sequences; pairs × 2 for paired losses), tokens per row, hidden, vocab, dtype,
    and the inputs: "uniform" (logits ~N(0, 1)) or "peaked" (benchmarks/peaked.py)."""

    rows: int
    seq_len: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    inputs: str = "uniform"

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    def label(self) -> str:
        peaked = " peaked" if self.inputs == "peaked" else ""
        return f"N={self.tokens} H={self.hidden} V={self.vocab} {self.dtype}{peaked}"


def make_inputs(shape: Shape, device: str, seed: int = 0) -> dict:
    """Policy/reference/mismatched/sample hidden states, lm_head and labels (prompt masked)."""
    # Drawn on the target device: CPU draws of GPU-sized inputs would take longer than the
    # cells they feed.
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device)

    def hidden():
        return randn(shape.rows, shape.seq_len, shape.hidden).to(dtype)

    labels = torch.randint(
        0, shape.vocab, (shape.rows, shape.seq_len), generator=gen, device=device
    )
    labels[:, : max(1, shape.seq_len // 8)] = -100  # a short prompt
    weight = randn(shape.vocab, shape.hidden) / shape.hidden**0.5
    inputs = {
        "hidden": hidden().requires_grad_(),
        "ref_hidden": hidden(),
        "kl_hidden": hidden(),
        "kl_ref_hidden": hidden(),
        "weight": weight.to(device, dtype).requires_grad_(),
        "labels": labels.to(device),
        "desirable": (torch.arange(shape.rows) % 2 == 0).to(device),
    }
    if shape.inputs == "peaked":
        from benchmarks.peaked import peak

        inputs = peak(inputs, gen)
    return inputs


# ----------------------------------------------------------------------------- eager (TRL style)
def _eager_loss(case: str, x: dict, logps_fn) -> torch.Tensor:
    """The loss of ``case`` from a per-sequence log-prob function (``fastalign.eager``'s
    signature and result): the policy first, then its no-grad streams."""
    weight = x["weight"].detach() if case == FROZEN else x["weight"]
    policy = logps_fn(x["hidden"], weight, x["labels"])

    def no_grad(name: str) -> torch.Tensor:
        with torch.no_grad():
            return logps_fn(x[name], x["weight"], x["labels"]).logps

    s = policy.logps
    if case in ("logps", FROZEN):
        return s.sum()
    if case == "policy_ref":
        return (s - no_grad("ref_hidden")).sum()
    if case == "dpo":
        return eager_ref.dpo_loss(s, no_grad("ref_hidden"), BETA)
    if case == "ipo":
        return eager_ref.ipo_loss(s, no_grad("ref_hidden"), policy.num_tokens, BETA)
    if case == "typo":
        sample = logps_fn(x["kl_hidden"], x["weight"], x["labels"]).logps
        return eager_ref.typo_loss(s, sample, lam=LAM)
    kl_policy, kl_ref = no_grad("kl_hidden"), no_grad("kl_ref_hidden")
    return eager_ref.kto_loss(s, no_grad("ref_hidden"), kl_policy, kl_ref, x["desirable"], BETA)


def _losses(logps_fn):
    """Loss closures for every case, given a per-sequence log-prob function."""

    def case_fn(case, x):
        def run():
            _eager_loss(case, x, logps_fn).backward()

        return run

    return case_fn


def eager(case, x):
    return _losses(eager_ref.eager_logps)(case, x)


_compiled_logps = None


def compiled(case, x):
    """The eager path with its log-prob function under ``torch.compile``."""
    global _compiled_logps
    if _compiled_logps is None:
        _compiled_logps = torch.compile(eager_ref.eager_logps, dynamic=False)
    run = _losses(_compiled_logps)(case, x)
    try:
        run()  # compile now so a failure is reported as unavailable, not mid-benchmark
    except Exception as err:  # noqa: BLE001 - any compile failure means "not on this machine"
        raise Unavailable(f"torch.compile failed here: {type(err).__name__}: {err}") from err
    return run


# ----------------------------------------------------------------------------- fastalign
def _fastalign_loss(case: str, x: dict, grad_mode: str = "auto") -> torch.Tensor:
    """The loss of ``case`` through fastalign's public API (``backend="auto"``); ``grad_mode``
    goes to the losses (the log-prob cases have one path: their upstream gradient is
    unknown)."""
    weight = x["weight"].detach() if case == FROZEN else x["weight"]
    policy = (x["hidden"], weight, x["labels"])
    if case in ("logps", FROZEN):
        return fastalign.sequence_logps(*policy).logps.sum()
    if case == "policy_ref":
        scored, ref = fastalign.policy_ref_logps(*policy, x["ref_hidden"])
        return (scored.logps - ref.logps).sum()
    options = dict(options=fastalign.LogpOptions(grad_mode=grad_mode))
    if case == "typo":
        samples = dict(sample_hidden=x["kl_hidden"], sample_labels=x["labels"], lam=LAM)
        return fastalign.typo_loss_fused(*policy, **samples, **options).loss
    options = dict(options, ref_hidden=x["ref_hidden"], beta=BETA)
    if case == "kto":
        kl = dict(kl_hidden=x["kl_hidden"], kl_labels=x["labels"])
        kl.update(kl_ref_hidden=x["kl_ref_hidden"])
        return fastalign.kto_loss_fused(*policy, x["desirable"], **kl, **options).loss
    losses = {"dpo": fastalign.dpo_loss_fused, "ipo": fastalign.ipo_loss_fused}
    return losses[case](*policy, **options).loss


def fastalign_impl(case, x, grad_mode: str = "auto"):
    """fastalign's default (``backend="auto"``; the losses' ``grad_mode="auto"`` takes the
    store path where one gradient unit fits the budget); ``grad_mode``: a variant column's,
    e.g. ``"recompute"``."""

    def run():
        _fastalign_loss(case, x, grad_mode).backward()

    return run


def fastalign_recompute(case, x):
    """fastalign's recompute path, the baseline of its fast paths: the losses with
    ``grad_mode="recompute"`` (store path off), the frozen-head case with the frozen-head
    fast path switched off."""
    if case in ("logps", "policy_ref"):
        raise Unavailable("the log-prob cases have one path (their upstream gradient is unknown)")
    if case != FROZEN:
        return fastalign_impl(case, x, grad_mode="recompute")
    run_fast = fastalign_impl(case, x)

    def run():
        fastalign.ops.FROZEN_HEAD_FAST_PATH = False
        try:
            run_fast()
        finally:
            fastalign.ops.FROZEN_HEAD_FAST_PATH = True

    return run


def fastalign_fused(case, x):
    """fastalign with the fused-epilogue GEMMs (``FASTALIGN_CUDA_KERNEL=fused``); CUDA only."""
    if not x["hidden"].is_cuda:
        raise Unavailable("the fused-epilogue kernels are measured on CUDA only")
    from fastalign.kernels import logprob

    run_default = fastalign_impl(case, x)

    def run():
        previous, logprob.CUDA_KERNEL = logprob.CUDA_KERNEL, "fused"
        try:
            run_default()
        finally:
            logprob.CUDA_KERNEL = previous

    return run


# ----------------------------------------------------------------------------- peers
def trl_kernel(case, x):
    """TRL's chunked log-prob autograd function (cuBLAS tiles + online LSE; torch on CPU)."""
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError as err:
        raise Unavailable(f"trl.kernels not importable: {err}") from err

    def logps(hidden, weight, labels):
        mask = labels != -100
        token = ChunkedLogProbFunction.apply(
            hidden[mask], weight, None, labels[mask], 1.0, chunk, None, 1.0, ()
        )[0]
        sums = torch.zeros(mask.shape, dtype=token.dtype, device=token.device)
        sums = sums.masked_scatter(mask, token).sum(-1)
        return eager_ref.EagerLogps(sums, mask.sum(-1))

    return _losses(logps)(case, x)


def liger(case, x):
    """Liger-Kernel's fused-linear chunked losses (DPO and KTO only)."""
    if case not in ("dpo", "kto"):
        raise Unavailable("Liger-Kernel has no fused loss for this case")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearKTOLoss
    except ImportError as err:
        raise Unavailable(f"liger-kernel not installed: {err}") from err
    on_cuda = x["hidden"].is_cuda
    hidden, weight, labels = x["hidden"], x["weight"], x["labels"]
    if case == "dpo":
        loss_fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=on_cuda, use_ref_model=True)

        def run():
            out = loss_fn(weight, hidden, labels, ref_input=x["ref_hidden"], ref_weight=weight)
            (out[0] if isinstance(out, tuple) else out).backward()

        return run
    loss_fn = LigerFusedLinearKTOLoss(beta=BETA, compiled=on_cuda, use_ref_model=True)

    def run_kto():
        # Liger takes the reference point as a precomputed tensor: score the mismatched rows
        # the way its users do (eager, no grad) so the work compared is the same.
        with torch.no_grad():
            kl_s = eager_ref.eager_logps(x["kl_hidden"], weight, labels).logps
            kl_ref = eager_ref.eager_logps(x["kl_ref_hidden"], weight, labels).logps
            kl = (kl_s - kl_ref).mean().clamp_min(0)
        out = loss_fn(
            hidden,
            weight,
            labels,
            preference_labels=x["desirable"],
            ref_input=x["ref_hidden"],
            ref_weight=weight,
            kl=kl,
        )
        (out[0] if isinstance(out, tuple) else out).backward()

    return run_kto


def _per_token_peer(case, x, peer: str, package: str, load):
    """A CUDA-only peer that gives per-token losses: ``load()`` imports it and returns
    ``nll(hidden [B, T, H], weight [V, H], labels [B, T]) -> [B, T]``; the log-prob cases
    are built on its sums over the scored tokens."""
    if not x["hidden"].is_cuda:
        raise Unavailable(f"{peer} runs on CUDA only")
    if case not in ("logps", FROZEN, "policy_ref", "dpo"):
        raise Unavailable(f"only the log-prob cases are built on {peer} here")
    try:
        nll = load()
    except ImportError as err:
        raise Unavailable(f"{package} not installed: {err}") from err

    def logps(hidden, weight, labels):
        mask = labels != -100
        return eager_ref.EagerLogps(-(nll(hidden, weight, labels) * mask).sum(-1), mask.sum(-1))

    return _losses(logps)(case, x)


def cut_cross_entropy(case, x):
    """Apple's CCE: per-token losses via ``linear_cross_entropy``."""

    def load():
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y, reduction="none", ignore_index=-100)

    return _per_token_peer(case, x, "CCE", "cut-cross-entropy", load)


def quack(case, x):
    """QuACK (Dao-AILab, CuTe DSL, SM90+): per-token losses from its cross-entropy kernel.

    QuACK's chunked linear cross-entropy reduces to one scalar (mean or sum) and scales one
    gradient for every token, so it cannot give the per-sequence sums a preference loss needs;
    ``linear_cross_entropy_func(reduction="none")`` can: bf16 logits from ``F.linear``, then
    QuACK's online-softmax cross-entropy kernel with its in-place backward.
    """

    def load():
        from quack.linear_cross_entropy import linear_cross_entropy_func

        def nll(hidden, weight, labels):
            rows, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
            out = linear_cross_entropy_func(
                rows, weight, None, targets, reduction="none", inplace_backward=True
            )
            return out.view(labels.shape)

        return nll

    return _per_token_peer(case, x, "QuACK (SM90+)", "quack-kernels", load)


IMPLEMENTATIONS = {
    "eager": eager,
    "torch.compile": compiled,
    "liger": liger,
    "trl.kernels": trl_kernel,
    "cce": cut_cross_entropy,
    "quack": quack,
    "fastalign": fastalign_impl,
    "fastalign-recompute": fastalign_recompute,
    "fastalign-fused": fastalign_fused,
}
