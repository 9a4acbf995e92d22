#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite through CTest.
# GPU suites (label gpu) skip with a message where no GPU is present; on a GPU machine
# scripts/gpu-check.sh runs them from an existing build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j "$(nproc)" "$@"
