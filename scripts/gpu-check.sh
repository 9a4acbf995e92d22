#!/usr/bin/env bash
# Runs the GPU checks from an existing build, on a machine with a CUDA GPU: every GPU test suite
# (build/bin/gpu_test_*), then compute-sanitizer (memcheck, racecheck) over the CUDA backend on a
# golden fixture, then ringllama-bench on a random llama-3.1-8b store (packed once with
# ringllama-pack, 16 GB). Builds and installs nothing: what it needs must already be in the build
# folder (binaries, lib/, devlibs/ from collect-libs.sh).
#
# Usage: scripts/gpu-check.sh OUTDIR
#   BUILD_DIR   the build folder (default: <repo>/build); its bin/, lib/ and devlibs/ are used
#   SANITIZER   compute-sanitizer to use (default: the one beside nvcc, else on PATH)
#   SANITIZE    0: skip the compute-sanitizer steps
#   BENCH       0: skip the benchmark
#   BENCH_STORE the llama-3.1-8b store to benchmark on (default /tmp/ringllama-bench-8b; packed if absent)
#   BENCH_ARGS  extra ringllama-bench arguments (e.g. "--decode-steps 32")
#   LOADERD     0: skip the loader daemon's fill benchmark
#   SUITES      0: skip the GPU test suites
#   STREAM      0: skip the streamed benchmarks: a random Llama-3.1-8B checkpoint made with transformers
#               (scripts/bench-accelerate.py make, 16 GB, in HF8B, default /tmp/hf8b), packed, run under
#               a 4 GiB GPU budget; a llama-3.1-70b-shaped random store of 6 layers under 12 GiB; then
#               accelerate offload timed on the same 8B checkpoint (4 GiB), and the speed-up printed
# Writes one log per step and the GoogleTest XML reports to OUTDIR, prints a summary table, and
# exits non-zero if any step failed.
set -uo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
build=${BUILD_DIR:-$root/build}
bin=$build/bin
export LD_LIBRARY_PATH="$build/lib:$build/devlibs:$root/build/devlibs:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The suites find the fixtures and the binaries here (RINGLLAMA_TEST_* are no config keys).
export RINGLLAMA_TEST_DATA=${RINGLLAMA_TEST_DATA:-$root/tests/data}
export RINGLLAMA_TEST_BIN_DIR=${RINGLLAMA_TEST_BIN_DIR:-$bin}

sanitizer=${SANITIZER:-}
if [[ -z $sanitizer ]]; then
  if [[ -x /usr/local/cuda/bin/compute-sanitizer ]]; then sanitizer=/usr/local/cuda/bin/compute-sanitizer
  else sanitizer=$(command -v compute-sanitizer || true); fi
fi

names=() results=() times=()
# step NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in OUTDIR/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "== $name: $*" | tee "$out/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$out/$name.log" 2>&1
  rc=$?
  names+=("$name") times+=($((SECONDS - t0)))
  if [[ $rc -eq 0 ]]; then results+=(ok)
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then results+=("TIMEOUT")
  else results+=("FAIL ($rc)"); fi
  tail -n 3 "$out/$name.log"
}
skipped() {
  names+=("$1") results+=("skipped: $2") times+=(0)
}

echo "gpu-check: build $build, logs in $out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true; } | tee "$out/gpu.txt"

# 1. Every GPU suite.
shopt -s nullglob
suites=("$bin"/gpu_test_*)
if [[ ${#suites[@]} -eq 0 && ${SUITES:-1} != 0 ]]; then
  echo "no $bin/gpu_test_* (build first)" >&2
  names+=("gpu suites") results+=("FAIL (none built)") times+=(0)
fi
[[ ${SUITES:-1} == 0 ]] && suites=()
for t in "${suites[@]}"; do
  n=$(basename "$t")
  step "$n" 1200 "$t" --gtest_output="xml:$out/$n.xml" --gtest_color=no
done

# 2. The benchmark: decode at batch 1, 8 and 64 and prefill of 512-token prompts against the
#    bandwidth and GEMM rate measured in the same run.
if [[ ${BENCH:-1} == 0 ]]; then
  skipped "bench" "BENCH=0"
elif [[ ! -x $bin/ringllama-bench || ! -x $bin/ringllama-pack ]]; then
  skipped "bench" "no ringllama-bench or ringllama-pack in $bin"
else
  bench_store=${BENCH_STORE:-/tmp/ringllama-bench-8b}
  if [[ ! -f $bench_store/manifest.yaml ]]; then
    step pack-8b 900 "$bin/ringllama-pack" --random llama-3.1-8b --out "$bench_store" --quiet
  fi
  # shellcheck disable=SC2086
  step bench 900 "$bin/ringllama-bench" --store "$bench_store" ${BENCH_ARGS:-}
  sed -n '/^figure/,$p' "$out/bench.log"
fi

# 2a. The loader daemon's window fill against a plain io_uring O_DIRECT read of the same file, on
#     this machine's disk (the 8B store above; a window of 8 layers and the globals).
if [[ ${LOADERD:-1} == 0 ]]; then
  skipped "bench-loaderd" "LOADERD=0"
elif [[ ! -x $bin/ringllama-loaderd || ! -f ${BENCH_STORE:-/tmp/ringllama-bench-8b}/manifest.yaml ]]; then
  skipped "bench-loaderd" "no ringllama-loaderd or no bench store"
else
  step bench-loaderd 600 "$bin/ringllama-loaderd" --bench --store "${BENCH_STORE:-/tmp/ringllama-bench-8b}" \
    --control "ipc:///tmp/ringllama-bench-loaderd.sock" --cpu-cap-layers 8 --bench-rounds 2
  tail -n 6 "$out/bench-loaderd.log"
fi

# 2b. Streamed: models larger than the GPU budget, the layers that do not fit copied from pinned
#     host memory each step; then the accelerate offload baseline on the same 8B weights.
if [[ ${STREAM:-1} == 0 ]]; then
  skipped "stream" "STREAM=0"
elif [[ ! -x $bin/ringllama-bench || ! -x $bin/ringllama-pack ]]; then
  skipped "stream" "no ringllama-bench or ringllama-pack in $bin"
else
  hf8b=${HF8B:-/tmp/hf8b}
  s8b=${STREAM_STORE_8B:-/tmp/ringllama-hf8b} s70=${STREAM_STORE_70B:-/tmp/ringllama-70b-6}
  [[ -f $hf8b/config.json ]] || step make-hf8b 900 python3 "$root/scripts/bench-accelerate.py" make "$hf8b"
  [[ -f $s8b/manifest.yaml ]] || step pack-hf8b 900 "$bin/ringllama-pack" --hf "$hf8b" --out "$s8b" --quiet
  step stream-8b 900 "$bin/ringllama-bench" --store "$s8b" --gpu-budget-gib 4 \
    --decode-steps "${STREAM_STEPS:-6}" --batches 1,8,64
  sed -n '/^streamed/,$p' "$out/stream-8b.log"
  if [[ ${ACCELERATE:-1} != 0 ]]; then
    step accelerate-8b 900 python3 "$root/scripts/bench-accelerate.py" time "$hf8b" --gpu-gib 4 --tokens 4
    ours=$(awk '$1 == "decode" && $2 == "b1" {print $3; exit}' "$out/stream-8b.log")
    theirs=$(sed -n 's/^accelerate: decode \([0-9.]*\) tokens.*/\1/p' "$out/accelerate-8b.log" | head -1)
    if [[ -n $ours && -n $theirs ]]; then
      python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'8B decode b1 under 4 GiB: ringllama {a:.2f} tok/s, accelerate {b:.3f} tok/s: speed-up {a / b:.1f}x')" \
        "$ours" "$theirs" | tee "$out/speedup.txt"
    fi
  fi
  [[ -f $s70/manifest.yaml ]] || step pack-70b-6 900 "$bin/ringllama-pack" --random llama-3.1-70b \
    --layers 6 --out "$s70" --quiet
  step stream-70b-6 900 "$bin/ringllama-bench" --store "$s70" --gpu-budget-gib 12 \
    --decode-steps "${STREAM_STEPS:-6}" --batches 1,8,64
  sed -n '/^streamed/,$p' "$out/stream-70b-6.log"
fi

# 3. compute-sanitizer over the CUDA backend on a fixture: ringllama-generate --backend cuda where
#    this build has it, else the backend suite's comparison of a chunked prefill and 8 decode steps.
if [[ ${SANITIZE:-1} == 0 ]]; then
  skipped "sanitizer" "SANITIZE=0"
elif [[ -z $sanitizer ]]; then
  skipped "memcheck" "no compute-sanitizer"
else
  fixture=""
  for d in "$RINGLLAMA_TEST_DATA"/*/; do
    [[ -f $d/golden.json && -d $d/hf ]] && { fixture=${d%/}; break; }
  done
  store=$(mktemp -d)
  trap 'rm -rf "$store"' EXIT
  generate_cuda=0
  if [[ -n $fixture && -x $bin/ringllama-pack && -x $bin/ringllama-generate ]] &&
     "$bin/ringllama-pack" --hf "$fixture/hf" --out "$store/s" --quiet >"$out/pack.log" 2>&1; then
    prompt=$(python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["prompt_ids"])))' \
             "$fixture/golden.json" 2>/dev/null || echo 1,2,3,4,5,6,7,8,9,10)
    gen=("$bin/ringllama-generate" --store "$store/s" --backend cuda --prompt-ids "$prompt" --max-tokens 8 --ignore-eos)
    "${gen[@]}" >"$out/generate-probe.log" 2>&1 && generate_cuda=1
  fi
  memcheck=("$sanitizer" --tool memcheck --error-exitcode 9 --leak-check full)
  if [[ $generate_cuda -eq 1 ]]; then
    step memcheck-generate 900 "${memcheck[@]}" "${gen[@]}"
  elif [[ -x $bin/gpu_test_cuda_backend ]]; then
    step memcheck-backend 900 "${memcheck[@]}" "$bin/gpu_test_cuda_backend" \
      --gtest_filter='Models/CudaVsCpu.PrefillAndDecodeAgree/gqa3_hd40_llama3_chunked:CudaBackend.*' --gtest_color=no
  else
    skipped "memcheck" "no ringllama-generate --backend cuda and no gpu_test_cuda_backend"
  fi
  if [[ -x $bin/gpu_test_cuda_backend ]]; then
    # Shared-memory races in the attention kernels, on a small model (racecheck is slow).
    step racecheck-backend 900 "$sanitizer" --tool racecheck --error-exitcode 9 "$bin/gpu_test_cuda_backend" \
      --gtest_filter='Models/CudaVsCpu.PrefillAndDecodeAgree/tiny_hd12_gqa2' --gtest_color=no
  fi
fi

# Summary.
echo
printf '%-28s %-22s %6s\n' step result seconds | tee "$out/summary.txt"
failed=0
for i in "${!names[@]}"; do
  printf '%-28s %-22s %6s\n' "${names[$i]}" "${results[$i]}" "${times[$i]}" | tee -a "$out/summary.txt"
  case ${results[$i]} in ok|skipped*) ;; *) failed=1 ;; esac
done
[[ $failed -eq 0 ]] && echo "gpu-check: all passed" || echo "gpu-check: FAILED"
exit $failed
