#!/usr/bin/env bash
# bf16, fp8 and int4 weights side by side on one GPU, in one run: a random Llama-3.1-8B store of each
# (packed once into STORES, 16 + 8.6 + 5.0 GB), each streamed under a 4 GiB budget (decode b1, b8,
# b64 and 512-token prefill: tokens/s, bytes per step, the rate against pinned H2D measured in the
# same run), then fp8 and int4 resident (decode b1 against the HBM floor of their packed bytes) and
# int4 decoding after a long context (flash-decoding: the attention's rate against HBM).
#
# Usage: scripts/bench-packed.sh OUTDIR
#   STORES        where the three stores are kept (default /tmp/ringllama-packed); packed if absent
#   BUDGET_GIB    the streamed runs' budget (default 4)
#   STEPS         timed decode steps per batch size (default 16)
#   LONG_CONTEXT  tokens of context for the long decode (default 32768; 0 skips it)
#   BUILD_DIR     the build folder (default <repo>/build)
# Writes each run's log to OUTDIR and the table to OUTDIR/summary.txt.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)
bin=${BUILD_DIR:-$root/build}/bin
stores=${STORES:-/tmp/ringllama-packed}
budget=${BUDGET_GIB:-4} steps=${STEPS:-16} long=${LONG_CONTEXT:-32768}
summary=$out/summary.txt
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

mkdir -p "$stores"
pack_pids=()
for w in bf16 fp8 int4; do
  if [[ ! -f $stores/8b-$w/manifest.yaml ]]; then
    "$bin/ringllama-pack" --random llama-3.1-8b --weights "$w" --out "$stores/8b-$w" --quiet --force \
      >"$out/pack-$w.log" 2>&1 &
    pack_pids+=($!)
  fi
done
for p in "${pack_pids[@]}"; do wait "$p" || { echo "packing failed: see $out/pack-*.log" >&2; exit 1; }; done

# rows LOG: the table ringllama-bench printed (from its header line on).
rows() { sed -n '/^figure/,/^$/p' "$1" | sed '/^$/d'; }

for w in bf16 fp8 int4; do
  "$bin/ringllama-bench" --store "$stores/8b-$w" --gpu-budget-gib "$budget" --decode-steps "$steps" \
    >"$out/streamed-$w.log" 2>&1 || { echo "streamed $w failed: see $out/streamed-$w.log" >&2; exit 1; }
done
for w in fp8 int4; do
  extra=()
  [[ $w == int4 && $long -gt 0 ]] && extra=(--long-context "$long")
  "$bin/ringllama-bench" --store "$stores/8b-$w" --batches 1 --decode-steps 64 "${extra[@]}" \
    >"$out/resident-$w.log" 2>&1 || { echo "resident $w failed: see $out/resident-$w.log" >&2; exit 1; }
done

say "$(grep -m1 "pinned H2D" "$out/streamed-bf16.log" || true)"
say ""
say "streamed, ${budget} GiB budget: tokens/s (GB per step, of pinned H2D)"
printf '%-16s %26s %26s %26s\n' figure bf16 fp8 int4 | tee -a "$summary"
for fig in "decode b1" "decode b8" "decode b64" "prefill 1x512"; do
  line=$(printf '%-16s' "$fig")
  for w in bf16 fp8 int4; do
    cell=$(rows "$out/streamed-$w.log" | awk -v f="$fig" '
      { name = $1 " " $2 } name == f { printf "%.2f (%.2f GB, %.3f)", $3, $4, $7 }')
    line+=$(printf ' %26s' "${cell:-does not fit}")
  done
  say "$line"
done
b1() { rows "$out/streamed-$1.log" | awk '$1 " " $2 == "decode b1" { print $3 }'; }
say "$(python3 -c 'import sys; b, f, i = map(float, sys.argv[1:]); print(f"decode b1 against bf16: fp8 {f / b:.2f}x, int4 {i / b:.2f}x")' \
  "$(b1 bf16)" "$(b1 fp8)" "$(b1 int4)")"
say ""
for w in fp8 int4; do
  say "resident $w: $(rows "$out/resident-$w.log" | grep -E "^(decode b1 |decode b1@|D2D)" | tr -s ' ' | paste -sd ';' -)"
done
if [[ $long -gt 0 ]]; then
  say "long context (int4, resident):"
  rows "$out/resident-int4.log" | grep -E "@" | tee -a "$summary"
fi
echo "summary: $summary"
