"""What each ``--loss`` needs, in one table: its fused function, the data it reads (paired or
unpaired), whether it needs a reference policy, KTO's mismatched rows or TYPO's samples, and
how the run's settings become the loss's keyword arguments."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from .. import checks, losses
from ..losses.cpo import LOSS_TYPES as CPO_TYPES
from ..losses.pair_config import pair_loss_config
from ..losses.pair_losses import PAIR_LOSS_TYPES
from ..losses.unpaired_losses import ROW_LOSS_TYPES
from .config import TrainConfig


def parse_list(value, name: str, kind: type = str) -> list | None:
    """``"a,b"`` (a CLI value) or a list -> a list of ``kind``; None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return [kind(item.strip() if isinstance(item, str) else item) for item in items]
    except ValueError:
        raise ValueError(
            f"{name} must be a comma-separated list of {kind.__name__}s, got {value!r}"
        ) from None


def _given(cfg, **names) -> dict:
    """The loss keywords ``names`` (keyword -> config field) whose field is set (not None)."""
    out = {}
    for keyword, field in names.items():
        value = getattr(cfg, field, None)
        if value is not None:
            out[keyword] = value
    return out


def _smoothed(cfg, **names) -> dict:
    """β, label smoothing and the set ``names`` (keyword -> field): SimPO's and CPO's options."""
    return dict(beta=cfg.beta, label_smoothing=getattr(cfg, "label_smoothing", 0.0)) | _given(
        cfg, **names
    )


def _dpo_options(cfg) -> dict:
    loss_type = parse_list(getattr(cfg, "loss_type", None), "loss_type")
    options = dict(beta=cfg.beta, label_smoothing=getattr(cfg, "label_smoothing", 0.0))
    if loss_type is not None:
        options["loss_type"] = loss_type[0] if len(loss_type) == 1 else loss_type
    weights = parse_list(getattr(cfg, "loss_weights", None), "loss_weights", float)
    if weights is not None:
        options["loss_weights"] = weights
    options["use_weighting"] = bool(getattr(cfg, "use_weighting", False))
    options.update(
        _given(
            cfg,
            rpo_alpha="rpo_alpha",
            ld_alpha="ld_alpha",
            f_divergence_type="f_divergence_type",
            f_alpha_divergence_coef="f_alpha_divergence_coef",
            discopop_tau="discopop_tau",
        )
    )
    return options


def _dpo_needs_reference(cfg) -> bool:
    types = parse_list(getattr(cfg, "loss_type", None), "loss_type") or ["sigmoid"]
    return any(PAIR_LOSS_TYPES[t].uses_reference for t in types if t in PAIR_LOSS_TYPES)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_dpo(cfg) -> None:
    try:
        pair_loss_config(**_dpo_options(cfg))
    except (ValueError, TypeError) as err:  # name the flag, not the keyword
        name, _, rest = str(err).partition(" ")
        raise ValueError(f"{_flag(name)} {rest}" if hasattr(cfg, name) else str(err)) from None


def _check_choice(choices: tuple) -> Callable[[object], None]:
    def check(cfg) -> None:
        value = getattr(cfg, "loss_type", None)
        if value is not None and value not in choices:
            raise ValueError(
                f"--loss-type must be one of {', '.join(choices)} for --loss {cfg.loss}, "
                f"got {value!r}"
            )

    return check


def _check_numbers(**lows: float) -> Callable[[object], None]:
    """The set fields ``lows`` (field -> lowest value) are finite numbers ≥ their bound, as the
    loss itself requires (simpo.py, cpo.py); errors name the flag."""

    def check(cfg) -> None:
        for name, low in lows.items():
            value = getattr(cfg, name, None)
            if value is not None:
                try:
                    checks.check_number(value, _flag(name), low=None if low == -math.inf else low)
                except TypeError as err:  # the CLI reports ValueErrors as `error: ...`
                    raise ValueError(str(err)) from None

    return check


def _check_cpo(cfg) -> None:
    _check_choice(CPO_TYPES)(cfg)
    _check_numbers(cpo_alpha=0.0, gamma=0.0, alphapo_alpha=-math.inf)(cfg)
    loss_type = getattr(cfg, "loss_type", None) or "sigmoid"
    if getattr(cfg, "label_smoothing", 0.0) and loss_type in ("hinge", "ipo"):
        raise ValueError(f"--label-smoothing does not apply to --loss-type {loss_type}; use 0")


@dataclass(frozen=True)
class LossSpec:
    """One ``--loss``: how the trainer feeds it."""

    name: str
    fused: Callable  # the fastalign fused loss
    data: str  # "paired" (prompt/chosen/rejected) or "unpaired" (prompt/completion/label)
    reference: Callable[[object], bool]  # config -> needs a reference policy
    options: Callable[[object], dict]  # config -> the loss's own keyword arguments
    mismatched_rows: Callable[[object], bool] = lambda cfg: False  # KTO's z0 rows
    samples: bool = False  # TYPO: responses sampled from the reference, scored by the policy
    reads: tuple[str, ...] = ()  # the loss-specific config fields it reads (others: an error)
    check_variant: Callable[[object], None] | None = None  # config -> named error or None

    def check(self, cfg) -> None:
        """Before any work: no option of another loss is set, and this loss's are valid."""
        for name in LOSS_OPTIONS:
            default = _DEFAULTS[name]
            if name not in self.reads and getattr(cfg, name, default) != default:
                users = [s.name for s in LOSS_TABLE.values() if name in s.reads]
                raise ValueError(
                    f"{_flag(name)} does not apply to --loss {self.name} (it is read by "
                    f"--loss {', '.join(users)})"
                )
        if self.check_variant is not None:
            self.check_variant(cfg)


def _always(cfg) -> bool:
    return True


def _never(cfg) -> bool:
    return False


def _kto_type(cfg) -> str:
    return getattr(cfg, "loss_type", None) or "kto"


DPO_OPTIONS = (
    "loss_type",
    "loss_weights",
    "rpo_alpha",
    "ld_alpha",
    "use_weighting",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "discopop_tau",
)
# Every loss-specific field of the config (beta is shared by all); one set to other
# than its default is refused by a loss that does not read it (a default is never "given").
LOSS_OPTIONS = (
    *DPO_OPTIONS,
    "label_smoothing",
    "gamma",
    "nll_weight",
    "cpo_alpha",
    "alphapo_alpha",
    "desirable_weight",
    "undesirable_weight",
    "kto_kl_offset",
    "lam",
    "sample_column",
)
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name in LOSS_OPTIONS}

LOSS_TABLE: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "dpo",
            losses.dpo_loss_fused,
            "paired",
            _dpo_needs_reference,
            _dpo_options,
            reads=(*DPO_OPTIONS, "label_smoothing"),
            check_variant=_check_dpo,
        ),
        LossSpec("ipo", losses.ipo_loss_fused, "paired", _always, lambda c: dict(beta=c.beta)),
        LossSpec(
            "typo",
            losses.typo_loss_fused,
            "paired",
            _never,
            lambda c: dict(lam=c.lam),
            samples=True,
            reads=("lam", "sample_column"),
        ),
        LossSpec(
            "kto",
            losses.kto_loss_fused,
            "unpaired",
            _always,
            lambda c: dict(beta=c.beta, loss_type=_kto_type(c)),
            mismatched_rows=lambda c: _kto_type(c) == "kto",
            reads=("loss_type", "desirable_weight", "undesirable_weight", "kto_kl_offset"),
            check_variant=_check_choice(tuple(ROW_LOSS_TYPES)),
        ),
        LossSpec(
            "simpo",
            losses.simpo_loss_fused,
            "paired",
            _never,
            lambda c: _smoothed(c, gamma="gamma", nll_weight="nll_weight"),
            reads=("label_smoothing", "gamma", "nll_weight"),
            check_variant=_check_numbers(gamma=0.0, nll_weight=0.0),
        ),
        LossSpec("orpo", losses.orpo_loss_fused, "paired", _never, lambda c: dict(beta=c.beta)),
        LossSpec(
            "cpo",
            losses.cpo_loss_fused,
            "paired",
            _never,
            lambda c: _smoothed(
                c,
                loss_type="loss_type",
                cpo_alpha="cpo_alpha",
                simpo_gamma="gamma",
                alphapo_alpha="alphapo_alpha",
            ),
            reads=("loss_type", "label_smoothing", "cpo_alpha", "gamma", "alphapo_alpha"),
            check_variant=_check_cpo,
        ),
    )
}
LOSSES = tuple(LOSS_TABLE)


def loss_spec(name: str) -> LossSpec:
    """The table row of ``--loss name``; an unknown name raises naming the choices."""
    if name not in LOSS_TABLE:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSS_TABLE[name]
