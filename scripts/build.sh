#!/usr/bin/env bash
# Configures and builds into build/ (binaries in build/bin). Extra arguments go to cmake,
# e.g. -DCMAKE_CUDA_ARCHITECTURES=89 for an Ada GPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cmake -S . -B build -G Ninja "$@" >/dev/null
ninja -C build -j "$(nproc)"
