"""One collated batch through the policy, its reference and the fused loss (``compute``);
the :class:`Trainer` inherits it and supplies the models, bodies and settings it reads."""

from __future__ import annotations

import warnings

import torch

from .. import losses
from .model import adapters_disabled, add_router_loss, head_params
from .reference import body_hidden as _hidden


class BatchLoss:
    """``compute(batch)``: the loss output of one batch. Reads the trainer's ``config``,
    ``device``, ``model``, ``body``/``train_body``, ``ref_body``/``ref_model``/``ref_logps``,
    ``logp_options``, ``fsdp_root`` and KTO's ``desirable_weight``/``undesirable_weight``."""

    def _reference_hidden(self, part: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_body is not None:
                return _hidden(self.ref_body, part)
            with adapters_disabled(self.model):
                return _hidden(self.body, part)

    def compute(self, batch: dict, train: bool = True):
        """The loss output for one collated batch (policy forward with autograd)."""
        if self.fsdp_root is None:
            return self._compute(batch, train)
        # Body and fused loss inside the FSDP root's forward: see fsdp.RootForward.
        out = self.fsdp_root(self._compute, batch, train)
        if not torch.is_grad_enabled():
            # No backward will reshard the root (reshard_after_forward=False for the root):
            # free it now, so the next forward gathers the parameters after optimizer steps.
            self.fsdp_root.reshard()
        return out

    def _compute(self, batch: dict, train: bool = True):
        # The policy forward, the body's first, records the MoE router loss (TRL adds it to
        # the loss of the policy's forward only, never the reference's or the KL pairs').
        self.body.aux_loss = None
        return add_router_loss(self._loss(batch, train), self.body)

    def _loss(self, batch: dict, train: bool = True):
        cfg = self.config
        policy = {k: v.to(self.device) for k, v in batch["policy"].items()}
        body = self.train_body if train else self.body
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and self.device.type == "cuda"
        )
        with autocast:
            hidden = _hidden(body, policy)
        weight, bias = head_params(self.model)
        hidden = hidden.to(weight.dtype)
        common = dict(bias=bias, options=self.logp_options)
        if "cu_seqlens" in policy:  # packed: hidden [N, H], labels [N]
            common["cu_seqlens"] = policy["cu_seqlens"]
        spec = self.spec  # the loss table's row: what this loss reads
        args = [hidden, weight, policy["labels"]]
        kwargs = {**spec.options(cfg), **common}
        if spec.reference(cfg):
            kwargs.update(self._reference_args(batch, policy, weight, train))
        if spec.samples and "sample" in batch:
            kwargs.update(self._sample_args(batch, body))
        elif spec.samples:  # no sampled responses in this run (--lam 0)
            kwargs["lam"] = 0.0
        if spec.data == "unpaired":
            return self._kto(batch, args, kwargs, spec.mismatched_rows(cfg))
        return spec.fused(*args, **kwargs)

    def _reference_args(self, batch: dict, policy: dict, weight, train: bool) -> dict:
        """The reference: precomputed rows of this batch, or hidden states (and lm_head)."""
        if self.ref_logps is not None:
            rows = self.ref_logps["train" if train else "test"][batch["index"]]
            return {"ref_logps": torch.cat([rows[:, 0], rows[:, 1]]).to(self.device)}
        ref = {"ref_hidden": self._reference_hidden(policy).to(weight.dtype)}
        if self.ref_model is not None:  # the frozen copy's own lm_head
            ref["ref_weight"], ref["ref_bias"] = head_params(self.ref_model)
        return ref

    def _sample_args(self, batch: dict, body) -> dict:
        """TYPO: responses sampled from the reference, scored by the policy."""
        s = {k: v.to(self.device) for k, v in batch["sample"].items()}
        return dict(
            sample_hidden=_hidden(body, s),
            sample_labels=s["labels"],
            sample_cu_seqlens=s.get("cu_seqlens"),
        )

    def _kto(self, batch, args: list, kwargs: dict, mismatched: bool):
        """KTO on one microbatch: its mismatched pairs (``batch["kl"]``) give z0."""
        kl = {}
        if mismatched and "kl" in batch:
            k = {n: v.to(self.device) for n, v in batch["kl"].items()}
            with torch.no_grad():
                kl_hidden = _hidden(self.body, k)
            kl = dict(
                kl_hidden=kl_hidden,
                kl_labels=k["labels"],
                kl_ref_hidden=self._reference_hidden(k),
                kl_cu_seqlens=k.get("cu_seqlens"),
            )
        elif mismatched:
            kl = dict(kl=0.0)
        with warnings.catch_warnings():
            # λ_D, λ_U were set on the whole data set (kto_class_weights, which warns there);
            # one microbatch's desirable/undesirable mix says nothing about that ratio.
            warnings.filterwarnings("ignore", message="λ_D·n_D/", category=UserWarning)
            return losses.kto_loss_fused(
                *args,
                batch["desirable"].to(self.device),
                desirable_weight=self.desirable_weight,
                undesirable_weight=self.undesirable_weight,
                **kwargs,
                **kl,
            )
