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
            # bf16: the store path's in-place half dz (a barrier per tile) is the variant built
            K._grad_logits_kernel,
            dtype,
            dict(HAS_SOFTCAP=True, HALF_IN_PLACE=dtype == "bf16", **fold),
            options,
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
