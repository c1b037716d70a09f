"""``estimate``: the per-GPU peak of one preference-training step as a sum of named terms.

Parameters (``params.py``), the body's activations (``body.py``) and one loss implementation
(``loss.py``) give each phase of the step its live bytes; the peak is the largest phase.
"""

from __future__ import annotations

from typing import Any

from .. import tiles
from .body import BodyBytes, body_bytes
from .loss import LossBytes, eager_loss, fused_loss, grad_path, gradient_outputs
from .params import ParameterBytes, parameter_bytes, trainable_params
from .result import MemoryEstimate, PathBreakdown
from .step import Step, resolve_step


def estimate(
    config_or_name: Any,
    batch_size: int,
    seq_len: int,
    loss: str = "dpo",
    world_size: int = 1,
    sharding: str = "none",
    lora: int | None = None,
    activation_checkpointing: bool = False,
    dtype: Any = "bfloat16",
    *,
    master_weights: bool | None = None,
    optimizer_state_bytes: int = 8,
    typo_samples: bool = False,
    device: str = "cuda",
    adamw: str | None = None,
    grad_mode: str = "auto",
    cuda_kernel: str | None = None,
) -> MemoryEstimate:
    """Per-GPU memory of one preference-training step, eager full-logits loss vs fused.

    The step: policy forward (with autograd), reference forward (no grad, a frozen copy —
    or with ``lora`` the policy with its adapter disabled), the loss, backward, AdamW step.
    Every figure is bytes on one GPU.

    Args:
        config_or_name: a ``transformers.PretrainedConfig``, a config dict, a path to a
            ``config.json`` or model directory, or a preset name (``PRESETS``).
        batch_size: per-GPU micro-batch: preference pairs for ``dpo``/``ipo``/``typo``
            (``2·batch_size`` sequences, TRL's concatenated layout), examples for ``kto``
            (plus a mismatched KL batch of the same size, scored without grad).
        seq_len: tokens per sequence (prompt + completion, all counted as scored).
        loss: ``"dpo"``, ``"ipo"``, ``"kto"`` stream a reference; ``"typo"``, ``"simpo"``,
            ``"orpo"`` and ``"cpo"`` are reference-free: the policy rows alone (ORPO's and
            CPO's chosen-row NLL comes from the same launch, and on the eager path from the
            same ``log_softmax``); ``typo_samples=True`` adds TYPO's ``batch_size`` sampled
            rows.
        world_size: GPUs; with ``sharding="fsdp"`` weights, gradients and optimizer states
            are divided by it.
        sharding: ``"none"`` (single GPU or DDP: everything replicated) or ``"fsdp"``
            (FSDP2 full shard: each decoder layer all-gathered for its forward and backward
            with the next one prefetched, i.e. two unsharded layers live; the root module —
            embedding, final norm, lm_head — stays unsharded through the step because the
            loss reads the lm_head weight directly; one layer's unsharded gradient and its
            fp32 reduce-scatter copy live in backward).
        lora: LoRA rank, or ``None`` for full fine-tuning. Only adapters get gradients and
            optimizer states; the base model (and the lm_head) is frozen, so the fused loss
            takes its frozen-head path with its fp32 ``[M, H]`` E buffer.
        activation_checkpointing: keep only each decoder layer's input; recompute one layer
            at a time in backward.
        dtype: weights/activations dtype (``"bfloat16"``, ``"float16"``, ``"float32"``).
        master_weights: keep trainable parameters and their gradients in fp32 (FSDP2
            ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on fp32 shards;
            without FSDP, fp32 params plus their bf16 autocast copies). Default: True for
            half dtypes. False: parameters and gradients in ``dtype``.
        optimizer_state_bytes: AdamW bytes per trainable parameter (8: fp32 ``exp_avg`` and
            ``exp_avg_sq``; ``torch.optim.AdamW`` on bf16 parameters keeps them in bf16: 4).
        typo_samples: TYPO with reference samples (a third ``batch_size`` of rows with grad).
        device: ``"cuda"`` (Triton backend tiles) or ``"cpu"`` (chunked torch backend tiles).
        adamw: the AdamW implementation, for its step's temporaries: ``"fused"`` (none;
            default on CUDA: ``torch.optim.AdamW(fused=True)``), ``"foreach"`` (an fp32
            buffer the size of the trainable shard) or ``"single"`` (one largest-parameter
            buffer; torch's default on CPU).
        grad_mode: the fused losses' ``grad_mode``, resolved by their own rule
            (``fastalign.tiles.store_wanted``). ``"auto"`` (the losses' default): store
            with a trainable head, the frozen-head path with ``lora``. ``"store"``: the
            gradients are formed in the forward, group by group of whole gradient units (a
            pair; a KTO row) whose fp32 logits fit
            ``fastalign.tiles.STORE_GROUP_BUDGET_BYTES``; from forward to backward the loss
            holds the fp32 grad_hidden ``[M, H]`` of the scored rows and (trainable head)
            an fp32 ``[V, H]`` lm_head gradient. ``"recompute"``: the forward keeps O(N)
            statistics and the backward recomputes the logits chunk by chunk (a frozen
            head: from the forward's E, no recompute). A unit larger than the budget falls
            back to recompute; ``setup["grad_mode"]`` says which path was counted
            (``"store"``, ``"recompute"`` or ``"frozen"``).
        cuda_kernel: the Triton backend's CUDA kernels, ``"gemm_fold"`` (the default) or
            ``"fused"`` (``None``: what ``FASTALIGN_CUDA_KERNEL`` selects, as the backend
            itself). The fused kernels, for 16-bit weights and a trainable head, keep no
            fp32 logits: a store group holds ``exp(z − max)·s`` in the model dtype, the
            recompute path's forward only logsumexp partials and its backward ``dz``.

    Returns:
        :class:`MemoryEstimate` with ``.eager`` and ``.fused`` :class:`PathBreakdown`,
        ``.total(path)``, ``.fits(gpu_bytes, path)`` and ``.format_table()``.

    Example:
        >>> est = estimate("Qwen/Qwen3-30B-A3B", batch_size=1, seq_len=4096, loss="dpo",
        ...                world_size=8, sharding="fsdp", activation_checkpointing=True)
        >>> est.total("fused") < est.total("eager")
        True
        >>> print(est.format_table("80GB"))  # doctest: +SKIP
    """
    step = resolve_step(
        config_or_name,
        batch_size,
        seq_len,
        loss=loss,
        world_size=world_size,
        sharding=sharding,
        lora=lora,
        activation_checkpointing=activation_checkpointing,
        dtype=dtype,
        master_weights=master_weights,
        optimizer_state_bytes=optimizer_state_bytes,
        typo_samples=typo_samples,
        device=device,
        adamw=adamw,
        grad_mode=grad_mode,
        cuda_kernel=cuda_kernel,
    )
    params, body = parameter_bytes(step), body_bytes(step)
    after_loss = gradient_outputs(step)
    return MemoryEstimate(
        model=step.name,
        params=step.shape.param_counts(),
        trainable_params=trainable_params(step),
        setup=_setup(step),
        eager=breakdown(params, body, eager_loss(step, body), after_loss),
        fused=breakdown(params, body, fused_loss(step, body), after_loss),
        assumptions=assumptions(step),
    )


def breakdown(
    params: ParameterBytes, body: BodyBytes, loss: LossBytes, after_loss: int
) -> PathBreakdown:
    """Parts and phases of one loss path: what is live at each phase of the step.

    ``after_loss``: the gradients the loss hands the body's backward (grad_hidden and the
    lm_head gradient), live while the body's backward runs.
    """
    resident = params.resident
    in_backward = resident + params.gathered_grads + body.saved
    parts = {
        "weights": params.weights,
        "reference weights": params.reference_weights,
        "gradients": params.gradients,
        "optimizer states": params.optimizer,
        "fsdp unsharded": params.gathered + params.gathered_grads,
        "activations": body.saved + body.recompute,
        "loss buffers": loss.buffers,
        "reference forward": body.nograd_forward,
        "cuBLAS workspaces": params.workspaces,
    }
    phases = {
        "forward + reference": resident + body.saved + loss.forward,
        "loss backward": in_backward + loss.backward,
        "body backward": in_backward + body.recompute + body.workspace + after_loss,
        "optimizer step": params.weights
        + params.reference_weights
        + params.optimizer
        + params.gradients
        + params.optimizer_temp
        + params.workspaces,
    }
    return PathBreakdown(parts=parts, phases=phases)


# Step fields reported as they are in ``MemoryEstimate.setup``.
_SETUP_FIELDS = (
    *("loss", "world_size", "sharding", "lora", "activation_checkpointing", "dtype"),
    *("master_weights", "optimizer_state_bytes", "device", "adamw", "cuda_kernel"),
)


def _setup(step: Step) -> dict[str, Any]:
    """The setup as ``MemoryEstimate.setup`` reports it (``grad_mode``: the path counted;
    ``grad_mode_asked``: the argument)."""
    rows = step.rows
    setup = dict(batch_size=step.batch_size, seq_len=rows.seq_len)
    setup.update({name: getattr(step, name) for name in _SETUP_FIELDS})
    setup.update(grad_mode=grad_path(step), grad_mode_asked=step.grad_mode)
    tokens = (rows.tokens, rows.ref_tokens, rows.nograd_tokens)
    setup.update(zip(("policy_tokens", "reference_tokens", "nograd_policy_tokens"), tokens))
    return setup


def assumptions(step: Step) -> list[str]:
    """What the estimate takes for granted, in words (printed under the table)."""
    state = f"AdamW states {step.optimizer_state_bytes} B/param"
    notes = [
        "every token of every sequence is scored (prompt tokens cost the eager path the same)",
        "SDPA flash/memory-efficient attention (no padding mask): no T x T scores are kept",
        f"trainable params and grads in fp32 (master weights), {state}"
        if step.master_weights
        else f"params and grads in {step.dtype}, {state}",
        "gradients are set to None before each step (zero_grad default) and appear during "
        "backward while activations are freed; the peak is the largest phase",
        f"AdamW implementation: {step.adamw}",
    ]
    if step.sharding == "fsdp":
        notes.append(
            "FSDP2 full shard: 2 unsharded decoder layers (current + prefetched), the unsharded "
            "root (embedding, lm_head) of policy and reference, one unsharded layer gradient "
            "(+ its fp32 reduce-scatter copy)"
        )
    if step.device == "cuda":
        notes.append(
            "not counted: CUDA context, NCCL buffers and caching-allocator fragmentation "
            "(keep ~5-10% headroom)"
        )
    if step.lora:
        notes.append(
            f"LoRA r={step.lora} on attention and dense/shared MLP projections; reference = "
            "the policy with its adapter disabled (no second copy)"
        )
    if step.separate_reference:
        notes.append("reference: a frozen copy of the policy in the compute dtype")
    if step.loss in ("orpo", "cpo"):
        notes.append(
            f"{step.loss} eager: the chosen rows' NLL read from the same log_softmax (TRL's "
            "trainer runs a second cross_entropy over the chosen logits: not counted)"
        )
    path = grad_path(step)
    notes.append(f"fused gradient path: {path} (grad_mode={step.grad_mode!r})")
    if path != "store" and tiles.store_wanted(step.grad_mode, step.head_trainable):
        notes.append(
            f"grad_mode={step.grad_mode!r}: the store path is not taken (one gradient unit's "
            f"logits over the group budget): {path} counted"
        )
    if step.device == "cuda" and step.cuda_kernel == "fused":
        notes.append(
            "CUDA kernels: fused (no fp32 logits) for the trainable head's groups"
            if step.fused_kernels
            else "CUDA kernels: fused selected, but this setup keeps GEMM+fold (fp32 weights "
            "or a frozen lm_head)"
        )
    return notes
