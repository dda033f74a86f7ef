#!/usr/bin/env bash
# The device bundle's entry point, run on the GPU machine (no Rust toolchain, no network):
# every GPU test, compute-sanitizer over the kernel tests once, then PyTorch's times for the
# same shapes (the machine's python3 with torch) and our benches beside them in one table, then
# the whole pipeline end to end on a full-size synthetic checkpoint (SKIP_E2E=1 to leave out).
set -u
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
tests_rc=0
if [ "${SKIP_CPU:-0}" != 1 ]; then
    # The dev machines have neither AMX nor AVX512-BF16: this host may be the only place the
    # bf16 hardware GEMM kernels run (each is checked against its scalar twin before use).
    echo "== host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(nproc) CPUs;" \
        "bf16 features: $(grep -m1 -o -w 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '))"
    ./cpu_gemm_tests 2>&1 | grep -E '^test |test result' | tail -12
    [ "${PIPESTATUS[0]}" = 0 ] || tests_rc=1
    echo "== host CPU kernel table, 2 threads (bf16 rows against the amx_/dpbf16_ probe where present)"
    timeout 180 ./xtask bench clip_ --threads 2 2>&1 | grep -E '^# (bf16|  )|^\|' | head -30
fi
echo "== GPU kernel tests (against the CPU references)"
./cuda_tests --test-threads=1 2>&1 | grep -v '^$' | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || tests_rc=1
echo "== GPU pipeline tests (against the CPU f32 path on the bundled model)"
# The bundle lives at <repo>/target/device-bundle; the fixtures are the repository's.
PHI3V_REPO_ROOT="${PHI3V_REPO_ROOT:-$(cd ../.. && pwd)}" ./pipeline_tests --test-threads=1 2>&1 | grep -v '^$' | tail -20
[ "${PIPESTATUS[0]}" = 0 ] || tests_rc=1
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$sanitizer" ] && [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    echo "== compute-sanitizer memcheck"
    timeout 240 "$sanitizer" --tool memcheck --error-exitcode 9 ./cuda_tests --test-threads=1 \
        norms activations rope merge embedding casts argmax flash_decode 2>&1 | tail -12
else
    echo "== compute-sanitizer: not found, skipped"
fi
echo "== PyTorch baselines"
python3 torch_gpu.py > torch.json 2> torch.err || { echo "torch unavailable:"; tail -3 torch.err; echo '{}' > torch.json; }
echo "== benches"
./cuda_bench torch.json
if [ "${SKIP_E2E:-0}" != 1 ]; then
    # The full-size synthetic checkpoint (8.3 GB of random bf16 weights, real names and shapes),
    # written on this machine's disk, then the whole pipeline on one image at 17 and 5 crops.
    export PHI3V_REPO_ROOT="${PHI3V_REPO_ROOT:-$(cd ../.. && pwd)}"
    synth="${SYNTH_DIR:-/tmp/phi3v-synth}"
    [ -f "$synth/config.json" ] || ./xtask synth --out "$synth" 2>&1 | tail -2
    for crops in 16 4; do
        echo "== end to end, --device cuda, num_crops $crops"
        ./xtask bench --e2e --device cuda --model "$synth" --num-crops "$crops" --new-tokens 32 2>&1 | tail -14
    done
fi
exit "$tests_rc"
