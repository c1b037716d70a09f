"""The Triton kernels compile for the GPU (sm_90, the tile sizes CUDA launches use), no GPU needed.

The interpreter runs kernels as Python, so it accepts code that the compiler rejects (a plain
float global read inside a kernel, say). Here every kernel is compiled ahead of time for Hopper
with the compiled path's own ``_fold_blocks``, in a subprocess with ``TRITON_INTERPRET=0``;
its shared memory is checked against the chip's limit and ptxas's resource report must show
no register spills. The fused-epilogue GEMMs (kernels/fused_gemm.py) are also checked for
what makes them Hopper-grade: ``wgmma`` and TMA tile loads.
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

# Shared by the scripts below: ptxas -v on the PTX Triton produced (the resource report Triton
# itself discards): spill bytes, registers and the target.
PTXAS_PRELUDE = textwrap.dedent(
    """
    import re, subprocess, tempfile
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        PTXAS = get_ptxas(90).path
    except (ImportError, TypeError, AttributeError):
        PTXAS = triton.knobs.nvidia.ptxas.path

    def spills(ptx):
        with tempfile.TemporaryDirectory() as tmp:
            open(f"{tmp}/k.ptx", "w").write(ptx)
            arch = re.search(r"\\.target (\\S+)", ptx).group(1)
            log = subprocess.run([PTXAS, "-v", f"--gpu-name={arch}", f"{tmp}/k.ptx",
                                  "-o", f"{tmp}/k.o"], capture_output=True, text=True, check=True)
        found = re.findall(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", log.stderr)
        registers = re.findall(r"Used (\\d+) registers", log.stderr)
        return sum(int(a) + int(b) for a, b in found), int(registers[0]), arch
    """
)

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
        return dict(shared=kernel.metadata.shared, spill_bytes=spills(kernel.asm["ptx"])[0])

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


# Triton installs to compile against besides the one imported here, as site directories
# separated by os.pathsep: e.g. the GPU image's triton 3.6 (``pip install --no-deps --target
# /tmp/t36 triton==3.6.0``, then FASTALIGN_EXTRA_TRITON=/tmp/t36), whose compiler allocates
# registers differently (it spilled in the dz epilogue where 3.9 did not).
TRITONS = [None] + [p for p in os.environ.get("FASTALIGN_EXTRA_TRITON", "").split(os.pathsep) if p]


def _ptxas_available(site: str | None) -> bool:
    """Triton's wheel bundles NVIDIA's ptxas; a build without it cannot compile for sm_90."""
    root = os.path.dirname(triton.__file__) if site is None else os.path.join(site, "triton")
    bundled = os.path.join(root, "backends", "nvidia", "bin", "ptxas")
    return os.access(os.environ.get("TRITON_PTXAS_PATH", bundled), os.X_OK)


def _compile_report(script: str, site: str | None, **env) -> dict:
    """Run ``script`` (compiled mode) in a subprocess against the Triton in ``site`` (None:
    the installed one) and return the JSON report it prints last."""
    if not _ptxas_available(site):
        pytest.skip("triton's bundled ptxas is not available on this machine")
    env = dict(os.environ, TRITON_INTERPRET="0", **env)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", PTXAS_PRELUDE + script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("site", TRITONS)
def test_every_kernel_compiles_for_sm90(site):
    report = _compile_report(SCRIPT, site)
    assert set(report) == {
        f"{kernel}/{dtype}"
        for kernel in ("fold", "fold+probs", "grad_logits")
        for dtype in ("bf16", "fp32")
    }
    for name, info in report.items():
        assert 0 <= info["shared"] <= SM90_SHARED_LIMIT, f"{name} needs {info} of shared memory"
        assert info["spill_bytes"] == 0, f"{name} spills: {info}"


FUSED_SCRIPT = textwrap.dedent(
    """
    import json, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastalign.kernels import fused_gemm as K, fused_logprob as F, logprob as L

    TILES = {True: F.tile_config(True), False: F.tile_config(False)}  # TRITON_INTERPRET=0
    FLOATS = ("scale2", "cap2", "cap_k", "multiplier")

    def argument_type(name, dtype, tma, writes_out):
        cfg = TILES[tma]
        blocks = {"rows": (cfg.block_m, cfg.block_k), "weight": (cfg.block_n, cfg.block_k),
                  "out": (cfg.block_m, cfg.part_n)}
        if name in blocks and tma and (writes_out or name != "out"):
            return f"tensordesc<{dtype}[{blocks[name][0]}, {blocks[name][1]}]>"
        if name in blocks or name == "b_ptr":
            return "*" + dtype
        if name == "targets_ptr":
            return "*i64"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in FLOATS else "i32"

    def compile_gemm(epilogue, dtype, tma, softcap):
        cfg, fn = TILES[tma], K._fused_gemm_kernel
        dz, store = epilogue == "dz", epilogue == "lse+store"
        constexprs = dict(DZ=dz, STORE=store, HAS_SOFTCAP=softcap, TMA=tma, DOT_FP32=False,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          GROUP_M=cfg.group_m, EPILOGUE_PARTS=cfg.parts, NUM_PROGRAMS=132)
        signature = {n: "constexpr" if n in constexprs
                     else argument_type(n, dtype, tma, writes_out=dz or store)
                     for n in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, signature, constexprs),
                                target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ptx = kernel.asm["ptx"]
        spilled, registers, arch = spills(ptx)
        return dict(wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                    mma_sync="mma.sync" in ptx, spill_bytes=spilled, registers=registers,
                    arch=arch, shared=kernel.metadata.shared)

    report = {}
    for epilogue in ("lse", "dz", "lse+store"):
        for dtype, tma, softcap in (("bf16", True, True), ("bf16", True, False),
                                    ("fp16", True, True), ("bf16", False, True)):
            name = f"{epilogue}/{dtype}/{'tma' if tma else 'pointer'}/softcap={softcap}"
            report[name] = compile_gemm(epilogue, dtype, tma, softcap)
    merge = triton.compile(ASTSource(K._merge_partials_kernel, dict(
        part_max_ptr="*fp32", part_sum_ptr="*fp32", max_ptr="*fp32", sum_ptr="*fp32",
        num_rows="i32", num_parts="i32", BLOCK_R="constexpr"), dict(BLOCK_R=256)),
        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    report["merge"] = dict(spill_bytes=spills(merge.asm["ptx"])[0], shared=merge.metadata.shared)
    fold = L._fold_blocks()
    for dtype in ("bf16", "fp16"):  # the store path's in-place dz, row-wise
        constexprs = dict(HAS_SOFTCAP=True, PART_N=TILES[True].part_n, BLOCK_M=fold["BLOCK_M"],
                          BLOCK_V=fold["BLOCK_V"])
        signature = {n: "constexpr" if n in constexprs else "*" + dtype if n == "probs_ptr"
                     else "*i64" if n == "targets_ptr" else "*fp32" if n.endswith("_ptr")
                     else "fp32" if n in ("softcap", "multiplier") else "i32"
                     for n in K._store_dz_kernel.arg_names}
        store_dz = triton.compile(ASTSource(K._store_dz_kernel, signature, constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=fold["num_warps"]))
        report[f"store_dz/{dtype}"] = dict(spill_bytes=spills(store_dz.asm["ptx"])[0],
                                           shared=store_dz.metadata.shared)
    print(json.dumps(report))
    """
)


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
            shared, spill_bytes = compiled.metadata.shared, spills(compiled.asm["ptx"])[0]
            report[f"{name}/{dtype}"] = dict(shared=shared, spill_bytes=spill_bytes)
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("site", TRITONS)
def test_fused_kernels_use_wgmma_and_tma_without_spills(site):
    """The fused-epilogue GEMMs on sm_90a (forward, dz, and the store path's forward that also
    keeps ``exp2(z₂ − part max)·s``): ``wgmma`` (no ``mma.sync`` fall-back), TMA tile loads
    (``cp.async.bulk.tensor``) on the descriptor path, and no register spills in ptxas's
    report, at the tile configuration the host code launches; the merge and the store path's
    row-wise dz kernel: no spills.

    The pointer-load variant (rows not 16-byte aligned) is checked at its own, smaller tiles.
    """
    report = _compile_report(FUSED_SCRIPT, site, TRITON_DEFAULT_FP_FUSION="1")
    assert len(report) == 15, sorted(report)
    for name, info in report.items():
        assert info["spill_bytes"] == 0, f"{name} spills: {info}"
        assert 0 <= info["shared"] <= SM90_SHARED_LIMIT, f"{name}: {info}"
        if name == "merge" or name.startswith("store_dz/"):
            continue
        assert info["arch"] == "sm_90a" and info["wgmma"] and not info["mma_sync"], name
        assert info["tma"] == ("/tma/" in name), f"{name}: TMA loads {info['tma']}"


@pytest.mark.parametrize("site", TRITONS)
def test_token_stats_kernels_compile_for_sm90(site):
    """kernels/token_stats.py (``token_logps``'s fold and gradient kernels), every flag on."""
    report = _compile_report(TOKEN_STATS_SCRIPT, site)
    assert set(report) == {
        f"{k}/{d}" for k in ("fold", "fold+probs", "grad") for d in ("bf16", "fp32")
    }
    for name, info in report.items():
        assert 0 <= info["shared"] <= SM90_SHARED_LIMIT, f"{name} needs {info} of shared memory"
        assert info["spill_bytes"] == 0, f"{name} spills: {info}"
