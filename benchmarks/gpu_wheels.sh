#!/usr/bin/env bash
# Run HERE (no GPU needed), before a GPU session: the benchmark peers' wheels for the GPU image
# (CPython 3.12, x86_64, torch 2.11+cu130, triton 3.6) into .whl/, for `gpu_session.sh setup`.
#
#   bash benchmarks/gpu_wheels.sh            # download, split what is too large to travel
#
# The device tool carries at most 64 MiB per call. QuACK's CuTe-DSL runtime
# (nvidia-cutlass-dsl-libs-cu13) alone is ~92 MB, so a wheel over SPLIT_MIB is cut in two
# halves: part "aa" stays in .whl/ (~55 MiB with the rest), part "ab" goes to .whl-b/. Carry
# ".whl-b" in one call (any command: ignored paths stay on a warm machine between calls), then
# ".whl" in the next, which runs `gpu_session.sh setup`: it joins the parts when both are
# there, and otherwise installs the rest without them (QuACK then reports itself unavailable
# in the grids). Versions are pinned to what the suite was checked against here; the image
# already holds accelerate, transformers, pyarrow, xxhash and einops.
set -euo pipefail
cd "$(dirname "$0")/.."
SPLIT_MIB=${SPLIT_MIB:-32}
WHEELS=(
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19  # TRL's kernel and step
    liger_kernel==0.8.5 cut-cross-entropy==25.1.1                 # Liger, Apple's CCE
    quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
    nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
)
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
for dir in .whl .whl-b; do
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
done
rm -rf .whl .whl-b  # this script's own folders: emptied, so that one version of each travels
mkdir -p .whl .whl-b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
for wheel in .whl/*.whl; do
    if [ "$(stat -c %s "$wheel")" -gt $((SPLIT_MIB * 1024 * 1024)) ]; then
        split -n 2 -a 2 "$wheel" "$wheel.part-"
        mv "$wheel.part-ab" .whl-b/
        rm "$wheel"
    fi
done
du -sh .whl .whl-b
echo "carry .whl-b in one device call, then .whl in the next, which runs: bash benchmarks/gpu_session.sh setup"
