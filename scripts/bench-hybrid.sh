#!/usr/bin/env bash
# The hybrid (cpu_share: the CPU computes a share of every streamed layer's rows from host memory
# while the GPU streams the rest) against pure streaming, on one GPU, in one run. A random
# Llama-3.1-8B bf16 store (packed once into STORE, 16 GB) under a 4 GiB GPU budget:
#   1. ringllama-bench over its own pinned window of every layer: decode b1, b2, b4, b8, b16 and
#      prefill 512 at cpu_share 0 and auto, each with the bytes per step over each link and the
#      rate achieved on each (PCIe next to pinned H2D, the CPU next to a plain multithreaded read
#      by the same threads), measured in the same run;
#   2. the same fed by a ringllama-loaderd whose window holds every layer (ringllama-bench
#      --daemon), decode b1 and b8;
#   3. the service path: that daemon, one ringllama-worker at cpu_share 0 and then auto, and
#      bench_client at LEVELS clients over ZeroMQ.
#
# Usage: scripts/bench-hybrid.sh OUTDIR
#   STORE        the bf16 store (default /tmp/ringllama-packed/8b-bf16; packed if absent)
#   BUDGET_GIB   the GPU budget (default 4)
#   STEPS        timed decode steps per batch size in the benchmark (default 8)
#   LEVELS       bench_client's client counts (default 1,2,4,8,16)
#   BUILD_DIR    the build folder (default <repo>/build)
# Writes each run's log to OUTDIR and the tables to OUTDIR/summary.txt; exits non-zero if a step
# failed.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1
store=${STORE:-/tmp/ringllama-packed/8b-bf16}
steps=${STEPS:-8} levels=${LEVELS:-1,2,4,8,16}
# The service runs: short prompts and outputs, so that a batch-1 level takes seconds.
: "${OUTPUT_LEN:=16}" "${PROMPT_LEN:=16}" "${CONTEXT:=64}"
BACKEND=cuda
source "$root/scripts/bench-common.sh"

if [[ ! -f $store/manifest.yaml ]]; then
  mkdir -p "$(dirname "$store")"
  "$bin/ringllama-pack" --random llama-3.1-8b --weights bf16 --out "$store" --quiet --force >"$out/pack.log" 2>&1 ||
    { echo "packing failed: see $out/pack.log" >&2; exit 1; }
fi
n_layers=$(sed -n 's/^ *n_layers: *\([0-9]*\).*/\1/p' "$store/manifest.yaml" | head -1)
[[ -n $n_layers ]] || { echo "$store/manifest.yaml names no n_layers" >&2; exit 1; }

# hybrid_rows LOG: the hybrid table ringllama-bench printed (header to the end of its rows).
hybrid_rows() { sed -n '/^hybrid: each link/,/^CPU GB\/s:/p' "$1"; }

say "store $store ($n_layers layers), GPU budget $budget GiB"
"$bin/ringllama-bench" --store "$store" --gpu-budget-gib "$budget" --decode-steps "$steps" --batches 1,2,4,8,16 \
  --cpu-shares 0,auto >"$out/bench.log" 2>&1 || { echo "ringllama-bench failed: see $out/bench.log" >&2; exit 1; }
say "$(grep -m1 "pinned H2D" "$out/bench.log" || true)"
say "$(grep -m1 "^hybrid: " "$out/bench.log" || true)"
say "$(hybrid_rows "$out/bench.log")"

start_daemon loaderd --cpu-cap-layers "$n_layers"
"$bin/ringllama-bench" --daemon "$control" --gpu-budget-gib "$budget" --decode-steps "$steps" --batches 1,8 \
  --cpu-shares 0,auto >"$out/bench-daemon.log" 2>&1 ||
  { echo "ringllama-bench --daemon failed: see $out/bench-daemon.log" >&2; exit 1; }
say ""
say "through the loader daemon (a window of every layer):"
say "$(hybrid_rows "$out/bench-daemon.log")"

for share in 0 auto; do
  # shellcheck disable=SC2046  # budget_args is several words
  start_worker "w-$share" 0 16 --daemon "$control" $(budget_args 0) --cpu-share "$share"
  grep -A8 "^hybrid: each streamed" "$out/w-$share.log" >>"$summary" || true
  # Each level on its own, 2 requests per client (at least 4): a batch-1 level stays short.
  IFS=, read -ra lv <<<"$levels"
  for n in "${lv[@]}"; do
    requests=$((2 * n < 4 ? 4 : 2 * n))
    bench "service-$share-$n" "ipc://$run/w-$share.sock" "$n" "$requests" >/dev/null
  done
  stop_worker "$wpid"
done
stop_daemon

python3 - "$out" "$levels" <<'PY' | tee -a "$summary"
import json, os, sys
out, levels = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
def level(share, n):
    return json.load(open(os.path.join(out, f"service-{share}-{n}.json")))["levels"][0]
pure = {n: level("0", n) for n in levels}
hyb = {n: level("auto", n) for n in levels}
print("\nservice path (worker fed by the daemon, bench_client over ZeroMQ): tokens/s")
print(f"{'clients':>7} {'pure':>9} {'hybrid':>9} {'ratio':>6} {'TPOT p50 pure/hybrid ms':>24} {'errors':>7}")
for n in sorted(pure):
    a, b = pure[n], hyb.get(n)
    if b is None:
        continue
    ratio = b["tokens_per_s"] / a["tokens_per_s"] if a["tokens_per_s"] else 0.0
    errs = sum(a["errors"].values()) + sum(b["errors"].values())
    print(f"{n:>7} {a['tokens_per_s']:>9.2f} {b['tokens_per_s']:>9.2f} {ratio:>6.2f} "
          f"{a['tpot_ms_p50']:>11.1f}/{b['tpot_ms_p50']:<12.1f} {errs:>7}")
PY
