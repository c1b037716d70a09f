"""The trainer's loss table: every row drives its fused loss from a config alone (data kind,
reference, KTO's mismatched rows, TYPO's samples, keyword arguments), and the DPO flags map
to dpo_loss_fused's options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastalign.trainer.loss_table import LOSS_TABLE, loss_spec, parse_list
from tests import loss_reference as R


def _config(**overrides):
    base = dict(beta=0.1, lam=0.05, loss_type=None, label_smoothing=0.0, loss_weights=None)
    base.update(overrides)
    return SimpleNamespace(**base)


def _arguments(spec, cfg):
    """What the trainer hands the loss for a tiny batch, decided by the table row only."""
    hidden, ref_hidden, weight, labels = R.paired_inputs(pairs=2, seq_len=5)
    args, kwargs = [hidden, weight, labels], spec.options(cfg)
    if spec.data == "unpaired":
        args.append(torch.tensor([True, False, True, False]))
    if spec.reference(cfg):
        kwargs["ref_hidden"] = ref_hidden
    if spec.mismatched_rows(cfg):
        kwargs.update(kl_hidden=hidden.detach().roll(1, 0), kl_labels=labels.roll(1, 0))
        kwargs["kl_ref_hidden"] = ref_hidden.roll(1, 0)
    if spec.samples:
        kwargs.update(sample_hidden=torch.randn(3, 4, hidden.shape[-1]))
        kwargs["sample_labels"] = torch.randint(0, weight.shape[0], (3, 4))
    return args, kwargs


@pytest.mark.parametrize(
    "name,overrides",
    [(name, {}) for name in LOSS_TABLE]
    + [
        ("dpo", dict(loss_type="sigmoid,sft", loss_weights="1,0.5")),
        ("dpo", dict(loss_type="sft")),
        ("dpo", dict(loss_type="ipo", ld_alpha=0.5, use_weighting=True, rpo_alpha=0.2)),
        ("kto", dict(loss_type="apo_zero_unpaired")),
        ("cpo", dict(loss_type="simpo", gamma=0.3, cpo_alpha=0.5)),
        ("simpo", dict(gamma=0.2, nll_weight=0.1)),
    ],
)
def test_every_row_drives_its_loss(name, overrides):
    spec = loss_spec(name)
    args, kwargs = _arguments(spec, _config(**overrides))
    out = spec.fused(*args, **kwargs)
    out.loss.backward()
    assert torch.isfinite(out.loss) and args[0].grad is not None
    assert set(out.metrics()) >= {"rewards/chosen", "logps/chosen"} or name == "kto"


def test_dpo_flags_become_options():
    cfg = _config(
        loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1", ld_alpha=0.5, rpo_alpha=None
    )
    options = loss_spec("dpo").options(cfg)
    assert options["loss_type"] == ["sigmoid", "bco_pair", "sft"]
    assert options["loss_weights"] == [0.8, 0.2, 1.0]
    assert options["ld_alpha"] == 0.5 and "rpo_alpha" not in options
    assert not loss_spec("dpo").reference(_config(loss_type="sft"))
    assert loss_spec("dpo").reference(_config(loss_type="sigmoid,sft"))


def test_rows_say_what_they_need():
    needs = {
        name: (s.data, s.reference(_config()), s.mismatched_rows(_config()), s.samples)
        for name, s in LOSS_TABLE.items()
    }
    assert needs["dpo"] == ("paired", True, False, False)
    assert needs["kto"] == ("unpaired", True, True, False)
    assert needs["typo"] == ("paired", False, False, True)
    assert needs["simpo"] == needs["orpo"] == needs["cpo"] == ("paired", False, False, False)
    assert not loss_spec("kto").mismatched_rows(_config(loss_type="apo_zero_unpaired"))


@pytest.mark.parametrize(
    "name,overrides,match",
    [
        (
            "dpo",
            dict(gamma=0.3),
            r"--gamma does not apply to --loss dpo \(it is read by --loss simpo, cpo\)",
        ),
        ("ipo", dict(loss_type="hinge"), "--loss-type does not apply to --loss ipo"),
        ("simpo", dict(use_weighting=True), "--use-weighting does not apply to --loss simpo"),
        ("dpo", dict(loss_type="kto_pair"), "--loss-type must be one of 'sigmoid'"),
        ("dpo", dict(loss_type="sigmoid,sft", loss_weights="1"), "--loss-weights has 1 entries"),
        ("dpo", dict(ld_alpha=2.0), r"--ld-alpha must .*\[0, 1\], got 2.0"),
        ("kto", dict(loss_type="sigmoid"), "--loss-type must be one of kto, apo_zero_unpaired"),
        ("cpo", dict(loss_type="robust"), "--loss-type must be one of sigmoid, hinge"),
    ],
)
def test_check_names_the_flag(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        loss_spec(name).check(_config(loss=name, **overrides))


@pytest.mark.parametrize("name", list(LOSS_TABLE))
def test_check_accepts_the_defaults(name):
    loss_spec(name).check(_config(loss=name))


def test_errors():
    with pytest.raises(ValueError, match="unknown loss 'kto_pair'; choose one of dpo"):
        loss_spec("kto_pair")
    with pytest.raises(ValueError, match="loss_weights must be a comma-separated list of floats"):
        parse_list("1,x", "loss_weights", float)
