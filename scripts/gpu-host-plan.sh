#!/usr/bin/env bash
# The host side of the plan on a GPU machine, from an existing build (nothing is built or installed):
#   1. a random Llama-3.1-8B store under a ~4 GiB GPU budget: ringllama-bench's streamed batch-1
#      decode, then ringllama-generate --store with the default (auto) window, its host plan and
#      the measured decode next to the printed ceiling; then --plan-only with --host-memory 24, 16
#      and 12 (auto picks fewer layers; the disk's bound and the knob that lifts it);
#   2. a Llama-3.1-70B-shaped store of 12 layers behind a loader daemon window of 6 slots: the
#      pinned window (the default) against the plain ring (cycle_slots 6), layers read per step
#      and decode tokens/s, next to the disk's O_DIRECT rate measured in the same run.
# Usage: scripts/gpu-host-plan.sh OUTDIR
#   BUILD_DIR  build folder (default <repo>/build); STORE_8B (default /tmp/ringllama-bench-8b) and
#   STORE_70B_12 (default /tmp/ringllama-70b-12) are packed when absent; TOKENS_70B decode tokens
#   per 70B run (default 4); PARTS the parts to run (default "8b 70b").
set -uo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1
mkdir -p "$out" && out=$(cd "$out" && pwd)
build=${BUILD_DIR:-$root/build}
bin=$build/bin
export LD_LIBRARY_PATH="$build/lib:$build/devlibs:$root/build/devlibs:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
s8=${STORE_8B:-/tmp/ringllama-bench-8b}
s70=${STORE_70B_12:-/tmp/ringllama-70b-12}
tokens70=${TOKENS_70B:-4}
failed=0
run() {  # run NAME TIMEOUT CMD...: output to OUTDIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >"$out/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$out/$name.log" 2>&1 ||
    { echo "$name: exit $?" | tee -a "$out/summary.txt"; [[ -n ${PLAN_OK:-} ]] || failed=1; }
}
prompt=$(seq -s, 1000 1015)
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
limit=$(python3 -c "print(round(4 * 1024 / $total_mib, 4))")
echo "GPU $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $total_mib MiB: gpu_memory_limit $limit = 4 GiB" | tee "$out/summary.txt"
grep -E 'MemAvailable|MemTotal' /proc/meminfo | tee -a "$out/summary.txt"

parts=" ${PARTS:-8b 70b} "
# 1. 8B under 4 GiB.
if [[ $parts == *" 8b "* ]]; then
[[ -f $s8/manifest.yaml ]] || run pack-8b 900 "$bin/ringllama-pack" --random llama-3.1-8b --out "$s8" --quiet
run bench-8b 600 "$bin/ringllama-bench" --store "$s8" --gpu-budget-gib 4 --decode-steps 16 --batches 1
# The bench's own settings inside its budget: a 64 MiB guard, two layers of prefetch.
small=(--free-guard-mb 64 --gpu-ahead-layers 2)
run generate-8b 600 "$bin/ringllama-generate" --store "$s8" --backend cuda --gpu-memory-limit "$limit" "${small[@]}" \
  --batch-size 1 --max-context 512 --prompt-ids "$prompt" --max-tokens 48 --ignore-eos --verbose
# --plan-only exits 1 when the device plan does not fit (it uses the context estimate, not a
# measurement); the host part is printed either way.
for gb in 24 16 12; do
  PLAN_OK=1 run "plan-8b-host-$gb" 120 "$bin/ringllama-generate" --store "$s8" --plan-only --gpu-memory-limit "$limit" "${small[@]}" \
    --batch-size 1 --max-context 512 --host-memory "$gb"
done
python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import re, sys
out = sys.argv[1]
bench = open(f"{out}/bench-8b.log").read()
gen = open(f"{out}/generate-8b.log").read()
b1 = re.search(r"^decode b1\s+([0-9.]+)", bench, re.M)
dec = re.search(r"decode (\d+) tokens in ([0-9.]+) ms", gen)
ceil = re.search(r"^bound: (\S+) \(batch 1: <= ([0-9.]+) tokens/s", gen, re.M)
win = re.search(r"^window \(segment\).*", gen, re.M)
print("8B, 4 GiB of GPU:")
print(" ", win.group(0) if win else "no host plan printed")
if b1 and dec:
    a, g = float(b1.group(1)), int(dec.group(1)) / float(dec.group(2)) * 1e3
    print(f"  ringllama-bench streamed b1 {a:.2f} tok/s; generate --store (auto window) {g:.2f} tok/s: ratio {g / a:.3f} (target >= 0.9)")
if dec and ceil:
    g, c = int(dec.group(1)) / float(dec.group(2)) * 1e3, float(ceil.group(2))
    print(f"  printed ceiling ({ceil.group(1)}) {c:.2f} tok/s; measured {g:.2f}: {g / c:.3f} of it (target within 15%)")
for gb in (24, 16, 12):
    t = open(f"{out}/plan-8b-host-{gb}.log").read()
    w = re.search(r"^window \(segment\).*", t, re.M)
    b = re.search(r"^bound: .*", t, re.M)
    adv = re.search(r"^the disk binds.*", t, re.M)
    print(f"  --host-memory {gb}: {w.group(0).split('  ')[-1] if w else '?'}")
    print(f"    {b.group(0) if b else 'no bound'}{'; ' + adv.group(0) if adv else ''}")
PY
fi

# 2. 70B-shaped, 12 layers, behind a 6-slot daemon window: pinned against the ring.
if [[ $parts == *" 70b "* ]]; then
[[ -f $s70/manifest.yaml ]] || run pack-70b-12 1200 "$bin/ringllama-pack" --random llama-3.1-70b --layers 12 --out "$s70" --quiet
limit70=$(python3 -c "print(round(16 * 1024 / $total_mib, 4))")
for policy in pinned ring; do
  extra=()
  [[ $policy == ring ]] && extra=(--cycle-slots 6)
  # The daemon's socket directory must be private (a world-writable /tmp is refused).
  ctl="ipc://$(mktemp -d /tmp/ringllama-hostplan.XXXXXX)/$policy.sock"
  "$bin/ringllama-loaderd" --store "$s70" --control "$ctl" --cpu-cap-layers 6 --mlock warn "${extra[@]}" \
    >"$out/loaderd-70b-$policy.log" 2>&1 &
  dpid=$!
  for _ in $(seq 600); do "$bin/ringllama-loaderd" --control "$ctl" --stats >/dev/null 2>&1 && break; sleep 0.2; done
  "$bin/ringllama-loaderd" --control "$ctl" --stats >"$out/stats-70b-$policy-before.json" 2>&1
  run "generate-70b-$policy" 900 "$bin/ringllama-generate" --daemon "$ctl" --backend cuda --gpu-memory-limit "$limit70" \
    --resident-layers 0 --gpu-ahead-layers 2 --batch-size 1 --max-context 256 --prompt-ids "$prompt" \
    --max-tokens $((tokens70 + 1)) --ignore-eos --verbose
  "$bin/ringllama-loaderd" --control "$ctl" --stats >"$out/stats-70b-$policy-after.json" 2>&1
  kill -TERM $dpid; wait $dpid
done
python3 - "$out" "$tokens70" <<'PY' | tee -a "$out/summary.txt"
import json, re, sys
out, tokens = sys.argv[1], int(sys.argv[2])
rows = {}
for policy in ("pinned", "ring"):
    a = json.load(open(f"{out}/stats-70b-{policy}-after.json"))
    b = json.load(open(f"{out}/stats-70b-{policy}-before.json"))
    gen = open(f"{out}/generate-70b-{policy}.log").read()
    dec = re.search(r"decode (\d+) tokens in ([0-9.]+) ms", gen)
    passes = re.search(r"(\d+) passes", gen)  # --verbose: the passes the worker ran
    loads = a["loads"] - b["loads"]
    rows[policy] = (loads / int(passes.group(1)) if passes else 0.0,
                    int(dec.group(1)) / float(dec.group(2)) * 1e3 if dec else 0.0, a["read_gb_per_s"], a["window"])
print("70B-shaped, 12 layers, daemon window of 6 slots, every layer streamed to the GPU:")
print(f"  {'policy':8} {'layers read/step':>16} {'decode tok/s':>12} {'daemon read GB/s':>16}  window")
for p, (lps, tps, gbps, w) in rows.items():
    print(f"  {p:8} {lps:16.2f} {tps:12.4f} {gbps:16.2f}  {w['pinned_layers']} pinned, {w['cycling_slots']} cycling")
if rows["ring"][1] > 0:
    print(f"  pinned / ring decode: {rows['pinned'][1] / rows['ring'][1]:.2f}x (expected ~1.5x: 12 / 8 layers read)")
PY
"$bin/ringllama-loaderd" --bench --store "$s70" --control ipc:///tmp/ringllama-hostplan-bench.sock --cpu-cap-layers 6 \
  --bench-rounds 1 --mlock warn >"$out/disk-70b.log" 2>&1
tail -n 4 "$out/disk-70b.log" | tee -a "$out/summary.txt"
fi
[[ $failed -eq 0 ]] && echo "gpu-host-plan: done" || echo "gpu-host-plan: FAILED"
exit $failed
