#!/usr/bin/env bash
# Configures and builds into build/ (binaries in build/bin), or into BUILD_DIR where it is set (any
# folder, inside the checkout or not). Extra arguments go to cmake, e.g.
# -DCMAKE_CUDA_ARCHITECTURES=89 for an Ada GPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja "$@" >/dev/null
ninja -C "$build" -j "$(nproc)"
