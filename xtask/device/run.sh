#!/usr/bin/env bash
# The device bundle's entry point, run on the GPU machine (no Rust toolchain, no network):
# the host CPU's GEMM tests and kernel table beside torch's (the only place the AMX and
# AVX512-BF16 paths can run), every GPU test, compute-sanitizer over the kernel tests once,
# PyTorch's GPU times for the same shapes and our benches beside them in one table, then the
# whole pipeline end to end on a full-size synthetic checkpoint. SKIP_CPU=1, SKIP_GPU=1,
# SKIP_SANITIZER=1 and SKIP_E2E=1 leave parts out. Each step has a time limit (the device lease is 15 minutes); its
# whole output goes to $OUT/<step>.log (or the bundle folder) and a filtered tail to stdout.
set -u
cd "$(dirname "$0")"
export PHI3V_REPO_ROOT="${PHI3V_REPO_ROOT:-$(cd ../.. && pwd)}"
logs="${OUT:-.}"
tests_rc=0
# step LOG LIMIT_S FILTER CMD...: runs CMD under `timeout`, appends its whole output to
# $logs/LOG.log (few files: $OUT brings back eight), prints what FILTER (an extended regex) keeps
# of it, and records a failure.
step() {
    local log=$1 limit=$2 filter=$3 start=$SECONDS rc out
    shift 3
    out=$(mktemp)
    timeout "$limit" "$@" >"$out" 2>&1
    rc=$?
    { echo "\$ $*"; cat "$out"; } >>"$logs/$log.log"
    grep -E "$filter" "$out" | tail -40
    rm -f "$out"
    echo "-- $log: exit $rc in $((SECONDS - start)) s$([ "$rc" = 124 ] && echo " (time limit ${limit} s)")"
    [ "$rc" = 0 ] || tests_rc=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
if [ "${SKIP_CPU:-0}" != 1 ]; then
    echo "== host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(nproc) CPUs;" \
        "bf16 features: $(grep -m1 -o -w 'amx_bf16\|amx_tile\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '))"
    step cpu_tests 120 '^test |test result|panicked' ./cpu_gemm_tests
    # `--compare torch` looks for the reference venv's python: here the machine's python3
    # (with torch, which uses oneDNN and AMX on the CPU where it can) stands in for it. A
    # wrapper, not a link: that python3 is itself a venv's, found from its own path.
    venv="$PHI3V_REPO_ROOT/.pyref"
    if [ ! -e "$venv/bin/python" ] && python3 -c 'import torch' 2>/dev/null; then
        mkdir -p "$venv/bin" &&
            printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$venv/bin/python" &&
            chmod +x "$venv/bin/python" &&
            cp "$PHI3V_REPO_ROOT/xtask/python/requirements.txt" "$venv/requirements.stamp"
    fi
    echo "== host CPU kernel table, 1 and 2 threads, beside torch (bf16 rows against the amx_/dpbf16_ probe where present)"
    step cpu_bench 150 '^# |^\||^Error|rows in' ./xtask bench clip_ prefill757_qkv --threads 2 --compare torch
    echo "== the same bf16 rows on AVX512-BF16 (AMX turned off), where the CPU has it"
    PHI_KERNELS_AMX=0 step cpu_bench 60 '^# bf16|^\|.*bf16 ' ./xtask bench clip_ prefill757_qkv --threads 2
fi
if [ "${SKIP_GPU:-0}" = 1 ]; then
    exit "$tests_rc"
fi
echo "== GPU kernel tests (against the CPU references)"
step cuda_tests 150 '^test |test result|panicked|FAILED|failures:' ./cuda_tests --test-threads=1
echo "== GPU pipeline tests (against the CPU f32 path on the bundled model)"
step pipeline_tests 150 '^test |test result|panicked|FAILED|failures:' ./pipeline_tests --test-threads=1
echo "== PyTorch baselines, then our benches beside them"
timeout 90 python3 torch_gpu.py >torch.json 2>>"$logs/bench.log" || { echo "torch unavailable:"; tail -3 "$logs/bench.log"; echo '{}' >torch.json; }
step bench 120 '.' ./cuda_bench torch.json
if [ "${SKIP_E2E:-0}" != 1 ]; then
    # The full-size synthetic checkpoint (8.3 GB of random bf16 weights, real names and shapes),
    # written on this machine's disk, then the whole pipeline on one square image: 17 crops at
    # num_crops 16 (a 4x4 grid and the global view), 5 at num_crops 4.
    synth="${SYNTH_DIR:-/tmp/phi3v-synth}"
    [ -f "$synth/config.json" ] || step e2e 150 'wrote|Error' ./xtask synth --out "$synth"
    for crops in 16 4; do
        echo "== end to end, --device cuda, num_crops $crops"
        step e2e 120 '.' ./xtask bench --e2e --device cuda --model "$synth" \
            --image "$PHI3V_REPO_ROOT/fixtures/images/square.png" --num-crops "$crops" --new-tokens 32
    done
fi
# Last: the memory checker is slow, and the lease may run out before it ends.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$sanitizer" ] && [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    echo "== compute-sanitizer memcheck"
    step sanitizer 60 'ERROR|error|test result|SUMMARY' "$sanitizer" --tool memcheck --error-exitcode 9 \
        ./cuda_tests --test-threads=1 norms activations rope merge embedding casts argmax flash_decode
else
    echo "== compute-sanitizer: not found, skipped"
fi
exit "$tests_rc"
