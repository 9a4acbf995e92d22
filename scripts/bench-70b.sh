#!/usr/bin/env bash
# Llama-3.1-70B in int4 (random weights, ~39 GB) streamed through the service's data path, in one
# run: a ringllama-loaderd whose window holds every layer feeds `ringllama-bench --daemon` under a
# GPU budget (decode b1, b8, b64 and 512-token prefill: tokens/s, bytes per step, the rate against
# pinned H2D measured in the same run); then the same bench from a window of its own over the same
# store, so that the summary can hold the daemon-fed figures against it. The daemon is stopped with
# SIGTERM and must exit 0 leaving no segment in /dev/shm.
#
# Usage: scripts/bench-70b.sh OUTDIR
#   STORE        the packed store (default /tmp/ringllama-70b); packed once, reused while its manifest
#                exists (it must be the SHAPE and WEIGHTS asked for)
#   SHAPE        the ringllama-pack --random shape (default llama-3.1-70b; tiny checks the plumbing
#                in seconds, e.g. with BENCH on a machine without a GPU)
#   WEIGHTS      bf16, fp8 or int4 (default int4)
#   BUDGET_GIB   the GPU budget of both bench runs (default 16)
#   STEPS        timed decode steps per batch size (default 8)
#   BENCH        the bench program (default BUILD_DIR/bin/ringllama-bench); it gets the bench's arguments
#   BENCH_TIMEOUT  seconds each bench run may take (default 900)
#   BUILD_DIR    the build folder (default <repo>/build)
# Writes pack.log, loaderd.log, daemon-stats.json, daemon-fed.log, own-window.log and summary.txt
# to OUTDIR. Needs room in /dev/shm for the daemon's window (about the store's weights.bin).
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)
bin=${BUILD_DIR:-$root/build}/bin
store=${STORE:-/tmp/ringllama-70b}
shape=${SHAPE:-llama-3.1-70b} weights=${WEIGHTS:-int4}
budget=${BUDGET_GIB:-16} steps=${STEPS:-8}
bench=${BENCH:-$bin/ringllama-bench}
bench_timeout=${BENCH_TIMEOUT:-900}
summary=$out/summary.txt
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
die() { echo "$0: $*" >&2; exit 1; }

for b in ringllama-pack ringllama-loaderd; do
  [[ -x $bin/$b ]] || die "no $bin/$b: build it, or set BUILD_DIR"
done

# The store: packed once. A store of another shape or weight type under the same name is refused
# rather than measured under the wrong name.
if [[ ! -f $store/manifest.yaml ]]; then
  echo "packing $shape $weights into $store (see $out/pack.log)"
  t0=$SECONDS
  "$bin/ringllama-pack" --random "$shape" --weights "$weights" --out "$store" --quiet --force >"$out/pack.log" 2>&1 \
    || die "packing failed: see $out/pack.log"
  echo "packed in $((SECONDS - t0)) s"
fi
manifest_field() { sed -n "s/^ *$1: *//p" "$store/manifest.yaml" | head -1 | tr -d '"'; }
n_layers=$(manifest_field n_layers)
[[ $n_layers =~ ^[0-9]+$ ]] || die "$store/manifest.yaml names no n_layers"
source=$(manifest_field source)
[[ $source == "random:$shape "* ]] || die "$store holds '$source', not $shape: remove it or set STORE elsewhere"
# The packed formats of its matrices (none: every one bf16, which the packer also does for a shape
# whose inputs are not a multiple of the int4 group, e.g. tiny).
packed=$(grep -o 'dtype: \(fp8\|int4\)' "$store/manifest.yaml" | sort -u | sed 's/dtype: //' | tr '\n' ' ' || true)
[[ -z $packed || $packed == "$weights " ]] \
  || die "$store holds ${packed}weights, not $weights: remove it or set STORE elsewhere"
weights_bytes=$(stat -c %s "$store/weights.bin")

# The daemon's window holds every layer: the segment is about weights.bin, in /dev/shm.
shm_free=$(df --output=avail -B1 /dev/shm | tail -1 | tr -d ' ')
((shm_free > weights_bytes)) \
  || die "/dev/shm has $((shm_free >> 20)) MiB free, the window needs about $((weights_bytes >> 20)) MiB"

run=$(mktemp -d /tmp/ringllama-bench-70b.XXXXXX)
control="ipc://$run/loaderd.sock"
dpid=
cleanup() {
  if [[ -n $dpid ]]; then
    kill -TERM "$dpid" 2>/dev/null || true
    wait "$dpid" 2>/dev/null || true
  fi
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The segments in /dev/shm now, one name a line.
shm_list() {
  local f
  for f in /dev/shm/ringllama-*; do [[ -e $f ]] && echo "${f##*/}"; done
  return 0
}
shm_before=$(shm_list)
t0=$SECONDS
"$bin/ringllama-loaderd" --store "$store" --control "$control" --cpu-cap-layers "$n_layers" --mlock warn \
  >"$out/loaderd.log" 2>&1 &
dpid=$!
# Ready once the globals and the whole window are read (the store, once, from the disk or the page cache).
for ((i = 0; ; ++i)); do
  grep -q "info: ready" "$out/loaderd.log" 2>/dev/null && break
  kill -0 "$dpid" 2>/dev/null || { tail -20 "$out/loaderd.log" >&2; dpid=; die "the loader daemon exited"; }
  ((i < 6000)) || die "the loader daemon was not ready within 600 s: see $out/loaderd.log"
  sleep 0.1
done
window_s=$((SECONDS - t0))

failed=()
t0=$SECONDS
timeout "$bench_timeout" "$bench" --daemon "$control" --store "$store" --gpu-budget-gib "$budget" --decode-steps "$steps" \
  >"$out/daemon-fed.log" 2>&1 || failed+=("daemon-fed (status $?): see $out/daemon-fed.log")
daemon_bench_s=$((SECONDS - t0))
"$bin/ringllama-loaderd" --stats --control "$control" >"$out/daemon-stats.json" 2>&1 \
  || failed+=("daemon stats: see $out/daemon-stats.json")
segment=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["segment"])' "$out/daemon-stats.json" \
  2>/dev/null || true)

# SIGTERM: a clean stop exits 0 and removes the segment (its name from the stats, else any new one).
kill -TERM "$dpid"
rc=0
wait "$dpid" || rc=$?
dpid=
[[ $rc -eq 0 ]] || failed+=("the loader daemon exited with status $rc after SIGTERM: see $out/loaderd.log")
if [[ -n $segment && -e /dev/shm/${segment#/} ]]; then
  failed+=("the loader daemon left its segment /dev/shm/${segment#/}")
fi
leftover=$(comm -13 <(echo "$shm_before") <(shm_list) | tr '\n' ' ')
[[ -z ${leftover// /} ]] || failed+=("new segments left in /dev/shm: $leftover")

t0=$SECONDS
timeout "$bench_timeout" "$bench" --store "$store" --gpu-budget-gib "$budget" --decode-steps "$steps" \
  >"$out/own-window.log" 2>&1 || failed+=("own window (status $?): see $out/own-window.log")
own_bench_s=$((SECONDS - t0))

# rows LOG: the table ringllama-bench printed (from its header line on).
rows() { sed -n '/^figure/,/^$/p' "$1" | sed '/^$/d'; }
cell() {  # cell LOG FIGURE: "tok/s (GB per step, of pinned H2D)"
  rows "$1" | awk -v f="$2" '{ name = $1 " " $2 } name == f { printf "%.2f (%.3f GB, %.3f)", $3, $4, $7 }'
}
tok_s() { rows "$1" | awk -v f="$2" '$1 " " $2 == f { print $3 }'; }

stored=${packed:-bf16 }
say "$shape $weights (matrices stored as ${stored% }), $n_layers layers," \
  "$(awk -v b="$weights_bytes" 'BEGIN { printf "%.1f", b / 1e9 }') GB of weights; GPU budget $budget GiB, $steps decode steps"
say "daemon-fed: $(grep -m1 "pinned H2D" "$out/daemon-fed.log" || echo "no pinned H2D line")"
say "daemon-fed: $(grep -m1 "^weights from" "$out/daemon-fed.log" || echo "no weights line")"
say "$(grep -m1 "^daemon window:" "$out/daemon-fed.log" || echo "daemon-fed: no daemon window line")"
say "$(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))
w = s["window"]
print("loader daemon: window of {} slots ({} pinned), ready in {} s; {:.2f} GB read at {:.2f} GB/s, {} loads, "
      "{} misses, {} read errors".format(w["slots"], w["pinned_layers"], sys.argv[2], s["bytes_read"] / 1e9,
                                         s["read_gb_per_s"], s["loads"], s["slot_misses"], s["read_errors"]))
' "$out/daemon-stats.json" "$window_s" 2>/dev/null || echo "loader daemon: no stats")"
say "bench runs: daemon-fed $daemon_bench_s s, own window $own_bench_s s"
say ""
printf '%-16s %30s %30s %10s\n' figure "daemon-fed" "own window" "daemon/own" | tee -a "$summary"
for fig in "decode b1" "decode b8" "decode b64" "prefill 1x512"; do
  d=$(tok_s "$out/daemon-fed.log" "$fig") o=$(tok_s "$out/own-window.log" "$fig")
  ratio=-
  [[ -n $d && -n $o ]] && ratio=$(awk -v d="$d" -v o="$o" 'BEGIN { if (o > 0) printf "%.3f", d / o; else print "-" }')
  dc=$(cell "$out/daemon-fed.log" "$fig") oc=$(cell "$out/own-window.log" "$fig")
  printf '%-16s %30s %30s %10s\n' "$fig" "${dc:-none}" "${oc:-none}" "$ratio" | tee -a "$summary"
done
say "cells: tokens/s (GB streamed per step, effective rate over pinned H2D); none: the run has no such row"
for run_name in daemon-fed own-window; do
  say ""
  say "$run_name, as ringllama-bench printed it:"
  rows "$out/$run_name.log" | tee -a "$summary"
done
for f in "${failed[@]}"; do say "FAILED: $f"; done
echo "summary: $summary"
[[ ${#failed[@]} -eq 0 ]]
