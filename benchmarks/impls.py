"""Implementations × cases for the benchmarks: each builds a forward+backward closure.

An implementation is a function ``(case, inputs) -> closure`` or raises ``Unavailable`` with
the reason (peer not installed, no CUDA, loss not offered). Cases are the core op
(``logps``), policy+reference (``policy_ref``) and the losses (``dpo``, ``ipo``, ``kto``
with its mismatched rows, ``typo``), all on TRL's concatenated layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastalign

CASES = ("logps", "policy_ref", "dpo", "ipo", "kto", "typo")
# The log-prob case with a frozen lm_head (LoRA): no weight gradient is asked for.
FROZEN = "logps_frozen"
BETA = 0.1


class Unavailable(Exception):
    """This implementation cannot run this case here; the message says why."""


@dataclass(frozen=True)
class Shape:
    """Rows (sequences; pairs × 2 for paired losses), tokens per row, hidden, vocab, dtype."""

    rows: int
    seq_len: int
    hidden: int
    vocab: int
    dtype: str = "float32"

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    def label(self) -> str:
        return f"N={self.tokens} H={self.hidden} V={self.vocab} {self.dtype}"


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
    return {
        "hidden": hidden().requires_grad_(),
        "ref_hidden": hidden(),
        "kl_hidden": hidden(),
        "kl_ref_hidden": hidden(),
        "weight": weight.to(device, dtype).requires_grad_(),
        "labels": labels.to(device),
        "desirable": (torch.arange(shape.rows) % 2 == 0).to(device),
    }


# ----------------------------------------------------------------------------- eager (TRL style)
def eager_logps(hidden, weight, labels):
    """What training code writes today: full logits, fp32 log_softmax, gather, masked sum."""
    logits = hidden @ weight.T  # [B, T, V]
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != -100
    token = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1), mask.sum(-1)


def _losses(logps_fn):
    """Loss closures for every case, given a per-sequence log-prob function."""

    def case_fn(case, x):
        def ref(name="ref_hidden"):
            with torch.no_grad():
                return logps_fn(x[name], x["weight"], x["labels"])[0]

        def run():
            weight = x["weight"].detach() if case == FROZEN else x["weight"]
            s, n = logps_fn(x["hidden"], weight, x["labels"])
            b = s.shape[0] // 2
            if case in ("logps", FROZEN):
                loss = s.sum()
            elif case == "policy_ref":
                loss = (s - ref()).sum()
            elif case == "dpo":
                r = s - ref()
                loss = -F.logsigmoid(BETA * (r[:b] - r[b:])).mean()
            elif case == "ipo":
                r = (s - ref()) / n.clamp_min(1)
                loss = ((r[:b] - r[b:] - 1 / (2 * BETA)) ** 2).mean()
            elif case == "typo":
                sample = logps_fn(x["kl_hidden"], x["weight"], x["labels"])[0]
                loss = F.softplus(s[b:] - s[:b]).mean() - 0.05 * sample.mean()
            elif case == "kto":
                with torch.no_grad():
                    kl_s = logps_fn(x["kl_hidden"], x["weight"], x["labels"])[0]
                z0 = (kl_s - ref("kl_ref_hidden")).mean().clamp_min(0)
                r = s - ref()
                loss = torch.where(
                    x["desirable"],
                    1 - torch.sigmoid(BETA * (r - z0)),
                    1 - torch.sigmoid(BETA * (z0 - r)),
                ).mean()
            loss.backward()

        return run

    return case_fn


def eager(case, x):
    return _losses(eager_logps)(case, x)


_compiled_logps = None


def compiled(case, x):
    """The eager path with its log-prob function under ``torch.compile``."""
    global _compiled_logps
    if _compiled_logps is None:
        _compiled_logps = torch.compile(eager_logps, dynamic=False)
    run = _losses(_compiled_logps)(case, x)
    try:
        run()  # compile now so a failure is reported as unavailable, not mid-benchmark
    except Exception as err:  # noqa: BLE001 - any compile failure means "not on this machine"
        raise Unavailable(f"torch.compile failed here: {type(err).__name__}: {err}") from err
    return run


# ----------------------------------------------------------------------------- fastalign
def fastalign_impl(case, x, grad_mode="auto"):
    """fastalign's default: the fused losses take the store path where one gradient unit
    fits the budget (``grad_mode="auto"``)."""
    backend = "auto"
    common = dict(backend=backend)
    loss_options = dict(common, grad_mode=grad_mode)

    def run():
        if case in ("logps", FROZEN):
            weight = x["weight"].detach() if case == FROZEN else x["weight"]
            loss = fastalign.sequence_logps(x["hidden"], weight, x["labels"], **common)
            loss = loss.logps.sum()
        elif case == "policy_ref":
            policy, ref = fastalign.policy_ref_logps(
                x["hidden"], x["weight"], x["labels"], x["ref_hidden"], **common
            )
            loss = (policy.logps - ref.logps).sum()
        elif case in ("dpo", "ipo"):
            paired = {"dpo": fastalign.dpo_loss_fused, "ipo": fastalign.ipo_loss_fused}[case]
            loss = paired(
                x["hidden"],
                x["weight"],
                x["labels"],
                ref_hidden=x["ref_hidden"],
                beta=BETA,
                **loss_options,
            ).loss
        elif case == "typo":
            loss = fastalign.typo_loss_fused(
                x["hidden"],
                x["weight"],
                x["labels"],
                sample_hidden=x["kl_hidden"],
                sample_labels=x["labels"],
                lam=0.05,
                **loss_options,
            ).loss
        elif case == "kto":
            loss = fastalign.kto_loss_fused(
                x["hidden"],
                x["weight"],
                x["labels"],
                x["desirable"],
                ref_hidden=x["ref_hidden"],
                kl_hidden=x["kl_hidden"],
                kl_labels=x["labels"],
                kl_ref_hidden=x["kl_ref_hidden"],
                beta=BETA,
                **loss_options,
            ).loss
        loss.backward()

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
        return sums, mask.sum(-1)

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
            kl_s = eager_logps(x["kl_hidden"], weight, labels)[0]
            kl_ref = eager_logps(x["kl_ref_hidden"], weight, labels)[0]
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


def cut_cross_entropy(case, x):
    """Apple's CCE (CUDA only): per-token losses via ``linear_cross_entropy``."""
    if not x["hidden"].is_cuda:
        raise Unavailable("cut-cross-entropy runs on CUDA only")
    if case not in ("logps", FROZEN, "policy_ref", "dpo"):
        raise Unavailable("only the log-prob cases are built on CCE here")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as err:
        raise Unavailable(f"cut-cross-entropy not installed: {err}") from err

    def logps(hidden, weight, labels):
        nll = linear_cross_entropy(hidden, weight, labels, reduction="none", ignore_index=-100)
        mask = labels != -100
        return -(nll * mask).sum(-1), mask.sum(-1)

    return _losses(logps)(case, x)


IMPLEMENTATIONS = {
    "eager": eager,
    "torch.compile": compiled,
    "liger": liger,
    "trl.kernels": trl_kernel,
    "cce": cut_cross_entropy,
    "fastalign": fastalign_impl,
    "fastalign-recompute": fastalign_recompute,
}
