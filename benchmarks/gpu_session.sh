#!/usr/bin/env bash
# One GPU session's work in few long commands: set up, compiled-kernel tests, benchmark grids.
#
#   bash benchmarks/gpu_session.sh all              # every step below, in this order
#   bash benchmarks/gpu_session.sh setup            # wheels in .whl/ (if any) + this package
#   bash benchmarks/gpu_session.sh tests            # compiled Triton kernels + losses on CUDA,
#                                                   # then again with the fused kernels selected
#   bash benchmarks/gpu_session.sh fused [ARGS]     # fused-epilogue kernels: vs a cuBLAS GEMM of
#                                                   # the same shape, tile sweep, profiler, and
#                                                   # the store path's group step, fused vs
#                                                   # GEMM+fold (python -m benchmarks.fused_bench)
#   bash benchmarks/gpu_session.sh bench GRID [K]   # python -m benchmarks.run --grid GRID -k K;
#                                                   # GRID gpu | scale, or gpu-peaked | scale-peaked
#   bash benchmarks/gpu_session.sh memory           # memory model vs measured allocator peaks
#   bash benchmarks/gpu_session.sh packing          # packed vs padded training steps
#   bash benchmarks/gpu_session.sh pack NAME        # everything in $OUT into $OUT/NAME.tgz, alone
#                                                   # (the device tool brings back <= 8 files)
#   bash benchmarks/gpu_session.sh trl              # token_logps compiled + TRL DPO step, stock vs fastalign
#
# Results and logs go to $OUT (default benchmarks/results/gpu-session-DATE; commit what is
# worth keeping). Every grid includes "fastalign-fused" (FASTALIGN_CUDA_KERNEL=fused) beside
# "fastalign" (the default GEMM+fold kernels) and every peer that is installed. Peers missing
# from the machine (Liger, TRL, CCE, QuACK) travel as wheels: `bash benchmarks/gpu_wheels.sh`
# here puts them, pinned, in .whl/ and splits QuACK's ~92 MB CuTe-DSL runtime in two (.whl/
# and .whl-b/; a call carries at most 64 MiB): carry .whl-b in one call (any command), then
# .whl in the next, which runs setup; setup joins the parts. Measured on an H100 2026-11-24:
# setup ~30 s, tests ~40 s (182 tests then; 483 now, twice), bench gpu ~3 min, bench scale
# ~1 min, memory ~2.5 min, packing ~1 min (before the fused kernels and the peaked grids were
# added; those are not measured yet). On the lent device machine (10 min per command, 30 min
# in all) run "all" as separate calls, each ending with "pack NAME" (the tool brings back at
# most 8 files): (1) carry .whl-b, run nothing much (nvidia-smi); (2) carry .whl: setup +
# tests; (3) fused; (4) bench gpu; (5) bench gpu-peaked; (6) bench scale + scale-peaked;
# (7) trl, if time is left. Commit what comes back with the device name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session-$(date +%F)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

setup() {
    # Wheels split by benchmarks/gpu_wheels.sh: part aa in .whl/, part ab in .whl-b/ (carried
    # by an earlier call); joined in $JOINED when both are here.
    local JOINED=${JOINED:-/tmp/whl-joined}
    mkdir -p "$JOINED"
    for first in .whl/*.whl.part-aa; do
        [ -e "$first" ] || continue
        name=$(basename "${first%.part-aa}")
        if [ -f ".whl-b/$name.part-ab" ]; then
            cat "$first" ".whl-b/$name.part-ab" >"$JOINED/$name"
        else
            echo "setup: $name: part ab not here (carry .whl-b in a call first); left out" >&2
        fi
    done
    if compgen -G ".whl/*.whl" >/dev/null || compgen -G "$JOINED/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site $(compgen -G ".whl/*.whl") $(compgen -G "$JOINED/*.whl") \
            || return 1
    fi
    python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

# The op and every loss file on CUDA: the store path (the default for a trainable head) too.
KERNEL_TESTS=(tests/test_triton_logprob.py tests/test_ops.py tests/test_losses_*.py)

# Each test run ends within TEST_LIMIT seconds (setup and both runs fit one 10-minute call),
# and a test stuck for 120 s dumps every thread's stack into the log (a hang leaves a trace).
TEST_LIMIT=${TEST_LIMIT:-270}
PYTEST=(timeout -k 10 "$TEST_LIMIT" python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120)

tests() {
    # (tests/test_triton_compile.py needs no GPU: it runs on CPU, against triton 3.9's ptxas.)
    "${PYTEST[@]}" "${KERNEL_TESTS[@]}" tests/test_fused_epilogue.py tests/test_fused_bench.py \
        2>&1 | tee "$OUT/tests.log"
    # The same API tests with the fused kernels behind the backend (16-bit weights take them;
    # test_losses_store.py then runs the fused kernels' store variant).
    FASTALIGN_CUDA_KERNEL=fused "${PYTEST[@]}" "${KERNEL_TESTS[@]}" 2>&1 | tee "$OUT/tests-fused.log"
}

fused() {
    python3 -m benchmarks.fused_bench --out "$OUT/fused" "$@" 2>&1 | tee -a "$OUT/fused.log"
}

bench() {
    python3 -m benchmarks.run --grid "${1:-gpu}" ${2:+-k "$2"} --out "$OUT" 2>&1 \
        | tee "$OUT/bench-${1:-gpu}.log"
}

[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
case "${1:-}" in
    setup) setup ;;
    tests) tests ;;
    fused) shift; fused "$@" ;;
    bench) bench "${2:-gpu}" "${3:-}" ;;
    memory)
        python3 -m benchmarks.memory_check --device cuda --out "$OUT/memory_check_cuda.json" \
            2>&1 | tee "$OUT/memory.log"
        ;;
    packing)
        for loss in dpo kto; do
            python3 -m benchmarks.packing --device cuda --steps 40 --loss $loss --repeats 2
        done 2>&1 | tee "$OUT/packing.log"
        ;;
    all)
        setup || exit 1
        [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        tests
        fused
        fused --parts overhead store --inputs peaked --out "$OUT/fused-peaked"
        for grid in gpu gpu-peaked scale scale-peaked; do bench "$grid"; done
        ;;
    pack)
        name=${2:-gpu-session}
        tar -czf "/tmp/$name.tgz" -C "$OUT" . && find "$OUT" -mindepth 1 -delete \
            && mv "/tmp/$name.tgz" "$OUT/$name.tgz" && ls -l "$OUT"
        ;;
    trl)
        { "${PYTEST[@]}" tests/test_token_logps.py
          python3 -m benchmarks.trl_step --preset gpu --out "$OUT"; } 2>&1 | tee "$OUT/trl.log"
        ;;
    *)
        echo "usage: $0 all|setup|tests|fused [ARGS]|bench GRID [K]|memory|packing|trl|pack NAME" >&2
        exit 2
        ;;
esac
