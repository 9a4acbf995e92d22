#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite through CTest.
# GPU suites (label gpu) skip with a message where no GPU is present; on a GPU machine
# scripts/gpu-check.sh runs them from an existing build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
bash scripts/build.sh
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "test.sh: no CUDA GPU visible: the GPU suites (ctest label gpu) will report Skipped;"
  echo "test.sh: run scripts/gpu-check.sh OUTDIR on a GPU machine for them."
fi
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j "$(nproc)" "$@"
