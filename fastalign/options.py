"""``LogpOptions``: the log-prob options every fused loss and op takes, checked once.

One frozen value instead of eight keywords repeated on every entry point; it also reads the
logit transform of a Hugging Face model from its config (``LogpOptions.from_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from . import checks
from ._types import LogitTransform
from .tiles import GRAD_MODES


@dataclass(frozen=True)
class LogpOptions:
    """How tokens are scored: the label shift, the logit transform, the backend and the path.

    Every token t of a sequence is scored with
    ``z_t = softcap(logit_scale · (hidden_t · weightᵀ + bias) / temperature)`` and
    ``logp_t = z_t[labels_t] − logsumexp(z_t)`` in fp32.

    Attributes:
        shift: apply the Hugging Face shift (``hidden[:, :-1]`` scores ``labels[:, 1:]``,
            within each sequence when packed) without copying. Default False.
        ignore_index: label value of positions not scored (prompt, padding). Default -100.
        logit_scale: multiplier of the raw logits, finite and non-zero. Default 1.
        temperature: divisor of the logits, > 0. Default 1.
        logit_softcap: ``c·tanh(z/c)`` cap (Gemma-2/3), > 0, or None for none. Default None.
        backend: ``"auto"`` (Triton on CUDA, chunked torch elsewhere), ``"triton"`` (also on
            CPU under ``TRITON_INTERPRET=1``) or ``"torch"``.
        grad_mode: the fused losses' gradient path: ``"auto"`` (the store path when the
            lm_head is trainable and one unit's fp32 logits fit ``store_budget_bytes``),
            ``"store"`` or ``"recompute"``; see ``fastalign.losses.units``. The ops
            (``sequence_logps``, ``policy_ref_logps``) always recompute and take ``"auto"``.
        store_budget_bytes: the store path's group budget in bytes (int >= 0); None takes
            ``fastalign.tiles.store_group_budget(device)``.

    Every field is checked on construction: a bad value raises ``TypeError``/``ValueError``
    naming the field, before any work starts.

    Example:
        >>> opts = LogpOptions(shift=True, temperature=0.7)
        >>> opts.transform()
        LogitTransform(logit_scale=1.0, temperature=0.7, softcap=None)
        >>> LogpOptions(temperature=0)
        Traceback (most recent call last):
        ...
        ValueError: temperature must be a finite number > 0, got 0
    """

    shift: bool = False
    ignore_index: int = -100
    logit_scale: float = 1.0
    temperature: float = 1.0
    logit_softcap: float | None = None
    backend: str = "auto"
    grad_mode: str = "auto"
    store_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        checks.check_bool(self.shift, "shift")
        checks.check_number(
            self.ignore_index, "ignore_index", integer=True, low=-(2**63), high=2**63 - 1
        )  # an int64, as labels are compared in
        checks.check_number(self.logit_scale, "logit_scale", nonzero=True)
        checks.check_number(self.temperature, "temperature", low=0, low_open=True)
        checks.check_number(
            self.logit_softcap, "logit_softcap", low=0, low_open=True, allow_none=True
        )
        checks.check_choice(self.backend, "backend", checks.BACKENDS)
        checks.check_choice(self.grad_mode, "grad_mode", GRAD_MODES)
        checks.check_number(
            self.store_budget_bytes, "store_budget_bytes", integer=True, low=0, allow_none=True
        )

    def transform(self) -> LogitTransform:
        """The logit transform these options describe (floats, for the kernels)."""
        return LogitTransform(
            logit_scale=float(self.logit_scale),
            temperature=float(self.temperature),
            softcap=None if self.logit_softcap is None else float(self.logit_softcap),
        )

    @classmethod
    def of(cls, options: LogpOptions | None) -> LogpOptions:
        """``options`` itself, or the defaults for None; anything else raises ``TypeError``."""
        if options is None:
            return cls()
        if not isinstance(options, cls):
            raise TypeError(
                f"options must be a fastalign.LogpOptions or None, got {type(options).__name__}"
            )
        return options

    def for_op(self, op: str) -> LogpOptions:
        """These options for an op that always recomputes (no gradient path to choose):
        ``grad_mode``/``store_budget_bytes`` other than the defaults raise ``ValueError``."""
        if self.grad_mode != "auto" or self.store_budget_bytes is not None:
            raise ValueError(
                f"grad_mode applies to the fused losses; {op} always recomputes logits in "
                "backward: leave grad_mode='auto' and store_budget_bytes=None"
            )
        return self

    @classmethod
    def from_config(cls, config, **overrides) -> LogpOptions:
        """Options reproducing the logits of a Hugging Face causal LM from its config.

        Read from ``config`` (a ``transformers.PretrainedConfig`` or a dict): Gemma-2/3
        ``final_logit_softcapping`` → ``logit_softcap``; Cohere ``logit_scale`` → multiplier;
        Granite ``logits_scaling`` → ``1/logits_scaling``; Falcon-H1 ``lm_head_multiplier``
        and ``output_multiplier`` (where a family sets one) → multiplier. A family without
        any of them gets the identity. ``overrides`` sets any other field (``shift=True``
        for a model's own labels, ``backend``, ...) and wins over what the config says.

        Example:
            >>> from transformers import Gemma2Config
            >>> gemma = Gemma2Config(final_logit_softcapping=30.0)
            >>> opts = LogpOptions.from_config(gemma, shift=True)
            >>> opts.logit_softcap, opts.shift
            (30.0, True)
            >>> LogpOptions.from_config({"logits_scaling": 4.0}).logit_scale  # Granite
            0.25
        """
        if isinstance(config, Mapping):
            value = config.get
        else:

            def value(name):
                return getattr(config, name, None)

        scale = 1.0
        if value("logit_scale") is not None:
            scale *= float(value("logit_scale"))
        if value("logits_scaling") is not None:
            scale /= float(value("logits_scaling"))
        for name in ("lm_head_multiplier", "output_multiplier"):
            if value(name) is not None:
                scale *= float(value(name))
        softcap = value("final_logit_softcapping")
        head = cls(logit_scale=scale, logit_softcap=None if softcap is None else float(softcap))
        return replace(head, **overrides)
