#!/usr/bin/env bash
# How close the loader daemon's window fill comes to the disk: reads STORE's weights.bin once with a
# plain io_uring O_DIRECT sequential read and once as ringllama-loaderd fills its window (globals
# and cpu_cap_layers layers, checksums checked), the page cache dropped before each, and prints
# both rates and their ratio (target >= 0.9).
#
#   scripts/bench-loaderd.sh STORE [ringllama-loaderd flags, e.g. --cpu-cap-layers 8 --bench-rounds 2]
#
# Needs root to drop the page cache (it says so when it cannot) and room in /dev/shm for the window.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 STORE [ringllama-loaderd flags]" >&2
  exit 2
fi
store=$1
shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BENCH_BIN_DIR:-}
if [[ -z "$bin" ]]; then
  for d in "$here"/build*/bin; do
    if [[ -x "$d/ringllama-loaderd" ]]; then bin=$d; break; fi
  done
fi
if [[ -z "$bin" || ! -x "$bin/ringllama-loaderd" ]]; then
  echo "$0: no ringllama-loaderd found: build it, or set BENCH_BIN_DIR to its folder" >&2
  exit 1
fi
# A private control endpoint: the bench never binds it, but the segment's name comes from it.
exec "$bin/ringllama-loaderd" --bench --store "$store" --control "ipc:///tmp/ringllama-bench-$$.sock" "$@"
