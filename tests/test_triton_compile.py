"""The Triton kernels compile for the GPU (sm_90, the tile sizes CUDA launches use), no GPU needed.

The interpreter runs kernels as Python, so it accepts code that the compiler rejects (a plain
float global read inside a kernel, say). Here every kernel is compiled ahead of time for Hopper
with the compiled path's own ``_fold_blocks``, in a subprocess with
``TRITON_INTERPRET=0``, and its shared memory is checked against the chip's limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

# Hopper's largest shared-memory allocation per block (bytes).
SM90_SHARED_LIMIT = 227 * 1024

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastalign.kernels import logprob as K

    def pointer_type(name, dtype):
        if name in ("table_ptr", "offsets_ptr", "targets_ptr"):
            return "*i64"
        if name in ("b_ptr", "dz_ptr", "probs_ptr"):
            return "*" + dtype
        return "*fp32"  # logits, running statistics, lse, upstream gradients

    def compile_kernel(fn, dtype, constexprs, options):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointer_type(name, dtype)
            elif name in ("multiplier", "softcap"):
                signature[name] = "fp32"
            else:
                signature[name] = "i64"
        src = ASTSource(fn, signature, constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        return kernel.metadata.shared

    report = {}
    fold = K._fold_blocks()
    options = {"num_warps": fold.pop("num_warps")}
    for dtype in ("bf16", "fp32"):
        for write_probs in (False, True):
            constexprs = dict(HAS_SOFTCAP=True, WRITE_PROBS=write_probs, **fold)
            name = f"fold{'+probs' if write_probs else ''}/{dtype}"
            report[name] = compile_kernel(K._fold_kernel, dtype, constexprs, options)
        report[f"grad_logits/{dtype}"] = compile_kernel(
            K._grad_logits_kernel, dtype, dict(HAS_SOFTCAP=True, **fold), options
        )
    print(json.dumps(report))
    """
)


def _ptxas_available() -> bool:
    """Triton's wheel bundles NVIDIA's ptxas; a build without it cannot compile for sm_90."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.access(os.environ.get("TRITON_PTXAS_PATH", bundled), os.X_OK)


def test_every_kernel_compiles_for_sm90():
    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas is not available on this machine")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == {
        f"{kernel}/{dtype}"
        for kernel in ("fold", "fold+probs", "grad_logits")
        for dtype in ("bf16", "fp32")
    }
    for name, shared in report.items():
        assert 0 <= shared <= SM90_SHARED_LIMIT, f"{name} needs {shared} B of shared memory"


TOKEN_STATS_SCRIPT = textwrap.dedent(
    """
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastalign.kernels import token_stats as K

    report = {}
    cfg = K.blocks()
    options = {"num_warps": cfg.pop("num_warps")}
    flags = dict(HAS_SOFTCAP=True, **cfg)
    fold_flags = dict(HAS_ENTROPY=True, HAS_SQ=True, HAS_MEAN=True, HAS_TOP1=True, **flags)
    kernels = {
        "fold": (K._fold_kernel, dict(WRITE_PROBS=False, **fold_flags)),
        "fold+probs": (K._fold_kernel, dict(WRITE_PROBS=True, **fold_flags)),
        "grad": (K._grad_kernel, dict(HAS_LOGP_GRAD=True, HAS_ENTROPY_GRAD=True, **flags)),
    }
    for dtype in ("bf16", "fp32"):
        for name, (fn, constexprs) in kernels.items():
            signature = {}
            for arg in fn.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg == "tile_ptr":
                    signature[arg] = "*" + dtype
                elif arg == "targets_ptr":
                    signature[arg] = "*i64"
                elif arg.endswith("_ptr"):
                    signature[arg] = "*fp32"
                elif arg in ("logit_scale", "softcap", "inv_temp"):
                    signature[arg] = "fp32"
                else:
                    signature[arg] = "i64"
            src = ASTSource(fn, signature, constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            report[f"{name}/{dtype}"] = compiled.metadata.shared
    print(json.dumps(report))
    """
)


def test_token_stats_kernels_compile_for_sm90():
    """kernels/token_stats.py (``token_logps``'s fold and gradient kernels), every flag on."""
    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas is not available on this machine")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run(
        [sys.executable, "-c", TOKEN_STATS_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == {
        f"{k}/{d}" for k in ("fold", "fold+probs", "grad") for d in ("bf16", "fp32")
    }
    for name, shared in report.items():
        assert 0 <= shared <= SM90_SHARED_LIMIT, f"{name} needs {shared} B of shared memory"
