"""``LogpOptions``: checked fields, the head transform read from a Hugging Face config, and
the ``options=`` argument every loss and op takes in place of the flat keywords."""

from __future__ import annotations

import dataclasses
import doctest
from pathlib import Path

import pytest
import torch

import fastalign
from fastalign import LogpOptions, options

LOSSES = ["dpo", "ipo", "kto", "typo", "simpo", "orpo", "cpo"]
OPS = ["sequence_logps", "policy_ref_logps"]


def test_public_and_frozen():
    # LogpOptions came with 0.2.0 (a breaking change); the package and pyproject agree
    assert "LogpOptions" in fastalign.__all__
    assert tuple(int(part) for part in fastalign.__version__.split(".")[:2]) >= (0, 2)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'version = "{fastalign.__version__}"' in pyproject
    opts = LogpOptions(shift=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.shift = False
    assert opts == LogpOptions(shift=True) and hash(opts) == hash(LogpOptions(shift=True))


def test_transform_and_defaults():
    assert LogpOptions().transform() == fastalign.LogitTransform()
    got = LogpOptions(logit_scale=2, temperature=0.5, logit_softcap=3).transform()
    assert got == fastalign.LogitTransform(logit_scale=2.0, temperature=0.5, softcap=3.0)
    assert isinstance(got.logit_scale, float) and isinstance(got.softcap, float)


@pytest.mark.parametrize(
    "field,value,error,match",
    [
        ("shift", 1, TypeError, "shift must be a bool"),
        ("ignore_index", -100.0, TypeError, "ignore_index must be an int"),
        ("logit_scale", 0.0, ValueError, "logit_scale must be a finite number other than 0"),
        ("logit_scale", float("inf"), ValueError, "logit_scale"),
        ("temperature", 0, ValueError, "temperature must be a finite number > 0, got 0"),
        ("temperature", "1", TypeError, "temperature must be a number"),
        ("logit_softcap", -1.0, ValueError, "logit_softcap must be a finite number > 0"),
        ("backend", "cuda", ValueError, "backend must be one of 'auto', 'triton', 'torch'"),
        ("grad_mode", "fast", ValueError, "grad_mode must be one of 'auto', 'store'"),
        ("store_budget_bytes", -1, ValueError, "store_budget_bytes must be an int >= 0"),
        ("store_budget_bytes", 1.5, TypeError, "store_budget_bytes must be an int"),
    ],
)
def test_bad_field_raises_naming_it(field, value, error, match):
    with pytest.raises(error, match=match):
        LogpOptions(**{field: value})


def test_options_must_be_logp_options():
    hidden, weight, labels = torch.randn(2, 3, 4), torch.randn(9, 4), torch.zeros(2, 3).long()
    with pytest.raises(
        TypeError, match="options must be a fastalign.LogpOptions or None, got dict"
    ):
        fastalign.sequence_logps(hidden, weight, labels, options={"shift": True})


def _tiny_config(name: str, **extra):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, name)(
        vocab_size=11, hidden_size=8, num_attention_heads=2, num_key_value_heads=2, **extra
    )


@pytest.mark.parametrize(
    "name,extra,scale,softcap",
    [
        ("LlamaConfig", {}, 1.0, None),
        ("Gemma2Config", {"final_logit_softcapping": 2.0, "head_dim": 8}, 1.0, 2.0),
        ("CohereConfig", {"logit_scale": 0.25}, 0.25, None),
        ("GraniteConfig", {"logits_scaling": 4.0}, 0.25, None),
        ("FalconH1Config", {"lm_head_multiplier": 0.5}, 0.5, None),
    ],
)
def test_from_config_reads_the_head_transform(name, extra, scale, softcap):
    opts = LogpOptions.from_config(_tiny_config(name, **extra))
    assert opts.logit_scale == pytest.approx(scale) and opts.logit_softcap == softcap
    assert dataclasses.replace(opts, logit_scale=1.0, logit_softcap=None) == LogpOptions()


def test_from_config_takes_dicts_and_overrides():
    opts = LogpOptions.from_config(
        {"logits_scaling": 2.0, "output_multiplier": 3.0, "final_logit_softcapping": 5},
        shift=True,
        backend="torch",
    )
    assert (opts.logit_scale, opts.logit_softcap, opts.shift) == (1.5, 5.0, True)
    assert opts.backend == "torch"
    assert LogpOptions.from_config({"logit_scale": 0.5}, logit_scale=2.0).logit_scale == 2.0
    with pytest.raises(ValueError, match="temperature"):
        LogpOptions.from_config({}, temperature=-1.0)


def _call(name: str, **kwargs):
    """``name`` on small valid inputs, with ``kwargs`` added."""
    hidden = torch.randn(4, 5, 8, requires_grad=True)
    weight, labels = torch.randn(30, 8), torch.randint(0, 30, (4, 5))
    if name in OPS:
        if name == "policy_ref_logps":
            return fastalign.policy_ref_logps(
                hidden, weight, labels, torch.randn(4, 5, 8), **kwargs
            )
        return fastalign.sequence_logps(hidden, weight, labels, **kwargs)
    fn = getattr(fastalign, f"{name}_loss_fused")
    if name == "kto":
        desirable = torch.tensor([True, False, True, False])
        return fn(hidden, weight, labels, desirable, ref_logps=torch.zeros(4), kl=0.0, **kwargs)
    if name in ("dpo", "ipo"):
        kwargs = dict(ref_logps=torch.zeros(4), **kwargs)
    if name == "typo":
        kwargs = dict(lam=0.0, **kwargs)
    return fn(hidden, weight, labels, **kwargs)


@pytest.mark.parametrize("name", LOSSES + OPS)
@pytest.mark.parametrize("keyword", ["shift", "backend", "temperature"])
def test_flat_keywords_are_gone(name, keyword):
    value = {"shift": True, "backend": "torch", "temperature": 0.5}[keyword]
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{keyword}'"):
        _call(name, **{keyword: value})


@pytest.mark.parametrize("name", LOSSES + OPS)
def test_options_reach_every_entry_point(name):
    """The same inputs scored at temperature 0.5 give another loss than the defaults (so the
    options are read), and options=None equals the defaults."""

    def value(**kwargs) -> torch.Tensor:
        torch.manual_seed(1)
        out = _call(name, **kwargs)
        if name == "policy_ref_logps":
            out = out[0]  # the policy's sums
        return out.logps.sum() if name in OPS else out.loss

    default, hot = value(), value(options=LogpOptions(temperature=0.5, backend="torch"))
    assert torch.equal(default, value(options=None)) and not torch.allclose(default, hot)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("field,value", [("grad_mode", "store"), ("store_budget_bytes", 1024)])
def test_ops_reject_the_gradient_path(name, field, value):
    with pytest.raises(ValueError, match=f"grad_mode applies to the fused losses; {name}"):
        _call(name, options=LogpOptions(**{field: value}))


def test_docstring_examples_run():
    result = doctest.testmod(options)
    assert result.attempted > 0 and result.failed == 0
