"""The unpaired (KTO-family) losses, each written once as a per-row function of per-row stats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .units import UnitLoss, UnitStats


@dataclass(frozen=True)
class RowParams:
    """β and the class weights λ_D, λ_U (TRL's ``desirable_weight``/``undesirable_weight``)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def kto_rows(
    logratios: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, params: RowParams
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7): ``λ_D(1 − σ(β(r − z0)))`` for desirable rows,
    ``λ_U(1 − σ(β(z0 − r)))`` for undesirable ones; ``r = s − s_ref`` ``[R]``, z0 detached."""
    beta = params.beta
    return torch.where(
        desirable,
        params.desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
        params.undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))),
    )


def apo_zero_unpaired_rows(
    logratios: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, params: RowParams
) -> torch.Tensor:
    """APO-zero, unpaired (D'Oosterlinck et al. 2024, eq. 7 split per example; TRL's KTO
    ``apo_zero_unpaired``): ``λ_D(1 − σ(βr))`` desirable, ``λ_U·σ(βr)`` undesirable. No
    reference point: ``z0`` is ignored (TRL logs ``kl = 0``)."""
    beta = params.beta
    return torch.where(
        desirable,
        params.desirable_weight * (1 - torch.sigmoid(beta * logratios)),
        params.undesirable_weight * torch.sigmoid(beta * logratios),
    )


@dataclass(frozen=True)
class RowLossType:
    """One row of the unpaired table: the per-row loss and whether it needs KTO's z0."""

    name: str
    row_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RowParams], torch.Tensor]
    needs_z0: bool


ROW_LOSS_TYPES: dict[str, RowLossType] = {
    t.name: t
    for t in (
        RowLossType("kto", kto_rows, True),
        RowLossType("apo_zero_unpaired", apo_zero_unpaired_rows, False),
    )
}


def row_unit_loss(
    loss_type: str, ref_logps: torch.Tensor, desirable: torch.Tensor, params: RowParams
) -> UnitLoss:
    """The gradient-unit form (a row) of a z0-free unpaired loss; ``ref_logps``/``desirable``
    ``[B]`` are picked by row."""
    row_loss = ROW_LOSS_TYPES[loss_type].row_loss

    def unit_loss(s: UnitStats) -> torch.Tensor:  # [n]
        logratios = s.logps - ref_logps[s.rows]
        zero = torch.zeros((), dtype=s.logps.dtype, device=s.logps.device)
        return row_loss(logratios, desirable[s.rows], zero, params)

    return UnitLoss(unit_loss)
