"""fastalign under TRL 1.16: its fused LM head served by ``fastalign.token_logps``.

Change one import (``from fastalign.integrations.trl import DPOTrainer, KTOTrainer``) or add
one call (``patch_trl()``); TRL's loss, metric and reference code run unchanged on top.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Iterator

import torch

from ..token_ops import TOKEN_OUTPUTS, check_inputs, token_logps

SUPPORTED_TRL = "TRL 1.16.x"
# TRL's `ChunkedLogProbFunction.forward` arguments after `ctx`: the seam's contract
TRL_APPLY_ARGS = (
    "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
    "final_logit_softcapping", "logit_scale", "outputs",
)  # fmt: skip
_SEAM_NAMES = ("add_fused_lm_head", "_ChunkedLogProbFunction", "_use_triton",
               "maybe_gather_lm_head_ctx")  # fmt: skip
# How many fused-head calls each side served, and why TRL's kernel was chosen (for tests/logs)
ROUTING = Counter()


def check_trl(utils) -> None:
    """Raise ``ImportError`` naming the supported versions unless ``utils`` (TRL's
    ``trl.trainer.utils``) has the fused LM head seam this integration replaces."""
    missing = [name for name in _SEAM_NAMES if not hasattr(utils, name)]
    if not missing:
        params = list(inspect.signature(utils._ChunkedLogProbFunction.forward).parameters)[1:]
        if tuple(params) != TRL_APPLY_ARGS:
            missing.append(f"_ChunkedLogProbFunction.forward{tuple(params)}")
    if missing:
        version = getattr(getattr(utils, "trl", None), "__version__", None)
        raise ImportError(
            f"fastalign.integrations.trl supports {SUPPORTED_TRL} (the fused LM head of "
            "trl.trainer.utils: add_fused_lm_head -> "
            f"ChunkedLogProbFunction.apply{TRL_APPLY_ARGS}); "
            f"the installed trl {version or _installed_trl_version()} lacks {', '.join(missing)}"
        )


def _installed_trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "(not installed)"


def _trl_utils():
    try:
        from trl.trainer import utils
    except ImportError as error:
        raise ImportError(
            f"fastalign.integrations.trl needs {SUPPORTED_TRL}: pip install 'trl>=1.16,<1.17'"
        ) from error
    check_trl(utils)
    return utils


_utils = _trl_utils()
_TRL_FUNCTION = _utils._ChunkedLogProbFunction
_TRL_USE_TRITON = _utils._use_triton


def _unservable(hidden, weight, bias, outputs) -> str | None:
    """Why fastalign should not serve this call (TRL's kernel does), or None."""
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    if any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors):
        return "tensor subclass (e.g. a DTensor shard)"
    if hidden.device.type not in ("cpu", "cuda"):
        return f"device {hidden.device.type}"
    if not set(outputs) <= set(TOKEN_OUTPUTS):
        return f"outputs {sorted(set(outputs) - set(TOKEN_OUTPUTS))}"
    return None


class FastalignLogProbFunction:
    """Stand-in for TRL's ``ChunkedLogProbFunction``: same ``apply`` arguments and 5 outputs
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, served by
    ``token_logps``; anything it cannot serve goes to TRL's own kernel."""

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=TOKEN_OUTPUTS[1:],
    ):
        reason = _unservable(hidden, weight, bias, outputs)
        kwargs = dict(bias=bias, temperature=temperature, logit_softcap=final_logit_softcapping,
                      logit_scale=logit_scale, outputs=tuple(outputs))  # fmt: skip
        if reason is None:
            try:  # the same checks token_logps runs first; nothing has been computed yet
                check_inputs(hidden, weight, targets, backend="auto", **kwargs)
            except (TypeError, ValueError) as error:
                reason = str(error)
        if reason is None:
            ROUTING["fastalign"] += 1
            gather = _utils.maybe_gather_lm_head_ctx
            return tuple(token_logps(hidden, weight, targets, gather_weight=gather, **kwargs))
        ROUTING["trl"] += 1
        ROUTING[f"trl: {reason}"] += 1
        return _TRL_FUNCTION.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                   final_logit_softcapping, logit_scale, outputs)  # fmt: skip


def _compact_rows(device: torch.device) -> bool:
    """TRL scores only the labelled rows where Triton runs; with fastalign, on CPUs too (only
    compile-per-shape devices such as Neuron keep TRL's every-position path)."""
    return device.type in ("cpu", "cuda") or _TRL_USE_TRITON(device)


@contextlib.contextmanager
def use_fastalign() -> Iterator[None]:
    """Inside the block, TRL's fused-LM-head calls (every trainer) run on fastalign.

    Nestable; restores whatever was installed before on exit. The autograd graph built
    inside keeps fastalign's backward after the block ends.
    """
    saved = _utils._ChunkedLogProbFunction, _utils._use_triton
    _utils._ChunkedLogProbFunction, _utils._use_triton = FastalignLogProbFunction, _compact_rows
    try:
        yield
    finally:
        _utils._ChunkedLogProbFunction, _utils._use_triton = saved


def patch_trl() -> None:
    """Route every TRL trainer's fused LM head to fastalign, process-wide, until
    ``unpatch_trl()``. Example: ``from fastalign.integrations.trl import patch_trl; patch_trl()``.
    """
    _utils._ChunkedLogProbFunction, _utils._use_triton = FastalignLogProbFunction, _compact_rows


def unpatch_trl() -> None:
    """Give TRL its own fused LM head back."""
    _utils._ChunkedLogProbFunction, _utils._use_triton = _TRL_FUNCTION, _TRL_USE_TRITON


def is_patched() -> bool:
    """Whether TRL's fused-LM-head calls go to fastalign right now."""
    return _utils._ChunkedLogProbFunction is FastalignLogProbFunction


class _FastalignHead:
    """Mixin: the trainer's losses, reference log-probs and predictions run under fastalign."""

    def compute_loss(self, *args, **kwargs):
        with use_fastalign():
            return super().compute_loss(*args, **kwargs)

    def compute_ref_log_probs(self, *args, **kwargs):
        with use_fastalign():
            return super().compute_ref_log_probs(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with use_fastalign():
            return super().prediction_step(*args, **kwargs)


from trl import DPOTrainer as _TRLDPOTrainer  # noqa: E402
from trl import KTOTrainer as _TRLKTOTrainer  # noqa: E402


class DPOTrainer(_FastalignHead, _TRLDPOTrainer):
    """TRL's ``DPOTrainer`` (every loss type, weights, WPO, ``ld_alpha``, precomputed and PEFT
    references) with its fused LM head served by fastalign. Same arguments as TRL's."""


class KTOTrainer(_FastalignHead, _TRLKTOTrainer):
    """TRL's ``KTOTrainer`` (with or without the KL term) with its fused LM head served by
    fastalign. Same arguments as TRL's."""


__all__ = [
    "DPOTrainer",
    "KTOTrainer",
    "FastalignLogProbFunction",
    "check_trl",
    "is_patched",
    "patch_trl",
    "unpatch_trl",
    "use_fastalign",
]
