#!/usr/bin/env bash
# One GPU session's work in few long commands: set up, compiled-kernel tests, benchmark grid.
#
#   bash benchmarks/gpu_session.sh setup            # wheels in .whl/ (if any) + this package
#   bash benchmarks/gpu_session.sh tests            # compiled Triton kernels + losses on CUDA
#   bash benchmarks/gpu_session.sh bench GRID [K]   # python -m benchmarks.run --grid GRID -k K
#   bash benchmarks/gpu_session.sh memory           # memory model vs measured allocator peaks
#   bash benchmarks/gpu_session.sh packing          # packed vs padded training steps
#   bash benchmarks/gpu_session.sh trl              # token_logps compiled + TRL DPO step, stock vs fastalign
#
# Logs and results go to $OUT (default /tmp/fastalign-gpu). Peers missing from the machine
# (Liger, TRL, CCE; TRL needs datasets, dill, multiprocess) travel as wheels in .whl/, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl liger_kernel trl datasets dill multiprocess \
#     cut-cross-entropy
# (pin the versions installed here). Measured on an H100 2026-11-24: setup ~30 s, tests ~40 s,
# bench gpu ~3 min, bench scale ~1 min, memory ~2.5 min, packing ~1 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastalign-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

setup() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 1
    fi
    python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
case "${1:-}" in
    setup) setup ;;
    tests)
        python3 -m pytest -q -p no:cacheprovider tests/test_triton_logprob.py \
            tests/test_losses_dpo.py tests/test_losses_ipo.py tests/test_losses_kto.py \
            tests/test_losses_typo.py tests/test_losses_common.py 2>&1 | tee "$OUT/tests.log"
        ;;
    bench)
        python3 -m benchmarks.run --grid "${2:-gpu}" ${3:+-k "$3"} --out "$OUT" 2>&1 \
            | tee "$OUT/bench-${2:-gpu}.log"
        ;;
    memory)
        python3 -m benchmarks.memory_check --device cuda --out "$OUT/memory_check_cuda.json" \
            2>&1 | tee "$OUT/memory.log"
        ;;
    packing)
        for loss in dpo kto; do
            python3 -m benchmarks.packing --device cuda --steps 40 --loss $loss --repeats 2
        done 2>&1 | tee "$OUT/packing.log"
        ;;
    trl)
        { python3 -m pytest -q -p no:cacheprovider tests/test_token_logps.py
          python3 -m benchmarks.trl_step --preset gpu --out "$OUT"; } 2>&1 | tee "$OUT/trl.log"
        ;;
    *) echo "usage: $0 setup|tests|bench GRID [K]|memory|packing|trl" >&2; exit 2 ;;
esac
