#!/usr/bin/env bash
# Two GPUs, one DRAM copy of the weights: one loader daemon and one ringllama-worker per GPU on one
# store, driven by scripts/bench_client.py, in one run.
#
#   scripts/bench-two-gpus.sh STORE OUTDIR
#
#   0. placement: nvidia-smi topo -m, the NUMA nodes, and each GPU's pinned H2D rate
#      (ringllama-bench --h2d-only) measured now: the limit next to each worker's achieved GB/s;
#   1. the daemon's window holds every layer: each worker under a BUDGET_GIB device budget (most
#      layers stream); bench_client against both workers at once, then against each alone, at
#      1, 8 (workers of batch_size 8) and 64 (batch_size 64) clients: tokens/s per worker and in
#      total, the total against one worker alone, achieved GB/s per GPU; the host memory of the
#      segment from /proc/meminfo Shmem before the daemon, after it, and after both workers
#      attached (counted once); each worker's time to register the segment for its GPU;
#   2. the daemon's window smaller than the model (SMALL_WINDOW layers): both workers pull from
#      one moving window; the daemon's stats sampled every 0.2 s give how far apart the workers
#      run (layers), its misses and convoy events, the workers' waits for the source, and the
#      tokens/s each gets (and one worker alone on the same window).
#
# Environment: BUILD_DIR, GPUS ("0 1"), BUDGET_GIB (4), OUTPUT_LEN (32), PROMPT_LEN (16),
# CONTEXT (64), REQUESTS_PER_SLOT (2: requests per level = this x the clients), CONFIGS ("8:1 8,64:64":
# batch_size:client levels, comma separated), CONTEXT_B64 (32), PROMPT_LEN_B64 (8), OUTPUT_LEN_B64
# (24), SMALL_WINDOW (12; 0 skips part 2), SMALL_OUTPUT_LEN (4). Summary in OUTDIR/summary.txt, logs and bench_client's
# JSON/PNG next to it. Everything it starts is stopped on exit, Ctrl-C included.
set -euo pipefail

store=${1:?usage: bench-two-gpus.sh STORE OUTDIR}
out=${2:?usage: bench-two-gpus.sh STORE OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
: "${OUTPUT_LEN:=32}" "${CONTEXT:=64}"
# shellcheck source=scripts/bench-common.sh
source "$root/scripts/bench-common.sh"
[[ $BACKEND == cuda ]] || { echo "bench-two-gpus.sh: needs CUDA GPUs (nvidia-smi sees none)" >&2; exit 2; }
read -r g0 g1 <<<"${GPUS:-0 1}"
[[ -n ${g1:-} ]] || { echo "bench-two-gpus.sh: GPUS must name two GPUs" >&2; exit 2; }
reqs=${REQUESTS_PER_SLOT:-2}
py() { python3 -c "$@"; }
shmem() { awk '/^Shmem:/ {print $2 * 1024}' /proc/meminfo; }
gib() { py "import sys; print(f'{int(sys.argv[1]) / 2**30:.2f} GiB')" "$1"; }

# 0. Placement and the links.
nvidia-smi topo -m >"$out/topo.txt" 2>&1 || true
say "placement (nvidia-smi topo -m):"
sed 's/\x1b\[[0-9;]*m//g' "$out/topo.txt" | grep -E "^(GPU|\s)" | head -4 | tee -a "$summary"
say "$(lscpu | grep -E '^NUMA node\(s\)|^Model name' | tr -s ' ' | paste -sd ';')"
declare -A h2d
for g in "$g0" "$g1"; do
  line=$(CUDA_VISIBLE_DEVICES=$g "$bin/ringllama-bench" --h2d-only)
  h2d[$g]=$(sed -n 's/.*pinned H2D \([0-9.]*\) GB\/s.*/\1/p' <<<"$line")
  say "GPU $g: $line"
done

worker_args() {  # worker_args GPU BATCH
  echo "--daemon $control $(budget_args "$1") $(ahead "$2")"
}
# both NAME LEVEL: bench_client against the two workers at once, one client set each.
both() {
  bench "$1-w0" "ipc://$run/w0.sock" "$2" "$(($2 * reqs))" >/dev/null &
  local a=$!
  bench "$1-w1" "ipc://$run/w1.sock" "$2" "$(($2 * reqs))" >/dev/null &
  local b=$!
  wait "$a" "$b"
}
field() {  # field JSON LEVEL KEY
  py "import json, sys; print(next(l.get(sys.argv[3], 0) for l in json.load(open(sys.argv[1]))['levels'] if l['level'] == int(sys.argv[2])))" "$1" "$2" "$3"
}

# 1. The whole model in the daemon's window.
shm_before=$(shmem)
start_daemon loaderd
shm_daemon=$(shmem)
say "store $store, budget ${budget} GiB per GPU, prompt $plen, output $olen tokens"
say "Shmem: $(gib "$shm_before") before the daemon, $(gib "$shm_daemon") with it (+$(gib $((shm_daemon - shm_before))): the segment)"
printf '%-6s %-22s %-22s %-9s %-10s %-30s\n' level "both: w0 + w1 tok/s" "alone: w0, w1 tok/s" total/one \
  "of 1.8x" "GB/s GPU$g0 | GPU$g1 (pinned)" | tee -a "$summary"
IFS=, read -r -a configs <<<"${CONFIGS:-8:1 8,64:64}"
for cfg in "${configs[@]}"; do
  batch=${cfg%%:*}
  # At batch_size 64 a 4 GiB budget holds a shorter context (as ringllama-bench plans it).
  if [[ $batch -ge 64 ]]; then
    ctx=${CONTEXT_B64:-32} plen=${PROMPT_LEN_B64:-8} olen=${OUTPUT_LEN_B64:-24}
  else
    ctx=$CONTEXT plen=${PROMPT_LEN:-16} olen=$OUTPUT_LEN
  fi
  # shellcheck disable=SC2046
  start_worker w0 "$g0" "$batch" $(worker_args "$g0" "$batch")
  w0=$wpid
  # shellcheck disable=SC2046
  start_worker w1 "$g1" "$batch" $(worker_args "$g1" "$batch")
  w1=$wpid
  shm_workers=$(shmem)
  say "batch_size $batch: Shmem with both workers attached $(gib "$shm_workers") ($(py "import sys; print(f'{(int(sys.argv[1]) - int(sys.argv[2])) / 2**20:+.0f} MiB')" "$shm_workers" "$shm_daemon") against the daemon alone)"
  for level in ${cfg#*:}; do
    both "both-c$level" "$level"
    bench "alone-c$level-w0" "ipc://$run/w0.sock" "$level" "$((level * reqs))" >/dev/null
    bench "alone-c$level-w1" "ipc://$run/w1.sock" "$level" "$((level * reqs))" >/dev/null
    a=$(tok_s "$out/both-c$level-w0.json" "$level") b=$(tok_s "$out/both-c$level-w1.json" "$level")
    sa=$(tok_s "$out/alone-c$level-w0.json" "$level") sb=$(tok_s "$out/alone-c$level-w1.json" "$level")
    ga=$(field "$out/both-c$level-w0.json" "$level" achieved_gb_per_s)
    gb=$(field "$out/both-c$level-w1.json" "$level" achieved_gb_per_s)
    py "import sys
a, b, sa, sb, ga, gb, ha, hb = map(float, sys.argv[2:10])
one = (sa + sb) / 2
r = (a + b) / one if one else 0
print(f'{sys.argv[1]:<6} {a:>7.1f} + {b:<7.1f} = {a + b:<6.1f} {sa:>7.1f}, {sb:<12.1f} {r:<9.2f} {\"yes\" if r >= 1.8 else \"NO\":<10} {ga:.1f} ({ha:.1f}) | {gb:.1f} ({hb:.1f})')" \
      "$level" "$a" "$b" "$sa" "$sb" "$ga" "$gb" "${h2d[$g0]}" "${h2d[$g1]}" | tee -a "$summary"
  done
  for g in 0 1; do  # the registration ends after ready (in the background): read it now
    say "  w$g (GPU $([[ $g == 0 ]] && echo "$g0" || echo "$g1")): $(grep -o 'started in.*' "$out/w$g.log"); $(grep -o 'host weights registered.*' "$out/w$g.log" || echo 'no registration logged')"
  done
  stop_worker "$w0"
  stop_worker "$w1"
  cp "$out/w0.log" "$out/w0-b$batch.log"
  cp "$out/w1.log" "$out/w1-b$batch.log"
done
say "(total/one: both workers' tokens/s over the mean of each alone; GB/s: bytes streamed host-to-device over the wall time while both ran, the GPU's pinned H2D in parentheses)"
stop_daemon

# 2. A window smaller than the model: both workers pull from one moving window.
small=${SMALL_WINDOW:-12}
if [[ $small -gt 0 ]]; then
  ctx=$CONTEXT plen=${PROMPT_LEN:-16} olen=${SMALL_OUTPUT_LEN:-4}
  start_daemon loaderd-small --cpu-cap-layers "$small"
  say "daemon window of $small layers (smaller than the model): output $olen tokens, 8 clients per worker"
  # shellcheck disable=SC2046
  start_worker w0 "$g0" 8 $(worker_args "$g0" 8)
  w0=$wpid
  # shellcheck disable=SC2046
  start_worker w1 "$g1" 8 $(worker_args "$g1" 8)
  w1=$wpid
  sample() {  # the daemon's workers' positions (layers counted over all passes) every 0.2 s
    while :; do
      "$bin/ringllama-loaderd" --stats --control "$control" 2>/dev/null | tr -d '\n' || true
      echo
      sleep 0.2
    done
  }
  sample >"$out/small-stats.jsonl" &
  spid=$!
  pids+=("$spid")
  both small-both 8
  kill "$spid" 2>/dev/null || true
  for g in 0 1; do
    python3 "$root/scripts/ringllama_client.py" --endpoint "ipc://$run/w$g.sock" --stats >"$out/small-w$g-stats.json"
  done
  bench small-alone-w0 "ipc://$run/w0.sock" 8 8 >/dev/null
  a=$(tok_s "$out/small-both-w0.json" 8) b=$(tok_s "$out/small-both-w1.json" 8)
  sa=$(tok_s "$out/small-alone-w0.json" 8)
  py "import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        st = json.loads(line)
    except ValueError:
        continue
    pos = [w['position'] for w in st.get('workers', []) if w.get('active') and w['position'] >= 0]
    if len(pos) == 2:
        rows.append((abs(pos[0] - pos[1]), st))
last = rows[-1][1] if rows else {}
d = sorted(r[0] for r in rows)
def p(q):
    return d[min(len(d) - 1, int(q * (len(d) - 1)))] if d else float('nan')
print(f'both: w0 {float(sys.argv[2]):.2f} + w1 {float(sys.argv[3]):.2f} tok/s; w0 alone on the same window {float(sys.argv[4]):.2f} tok/s')
print(f'drift (|w0 - w1| in layers, {len(d)} samples while both ran): median {p(0.5)}, p90 {p(0.9)}, max {d[-1] if d else \"-\"}')
print(f'daemon: {last.get(\"slot_misses\", \"-\")} slot misses (a worker waited for a read), {last.get(\"convoy_events\", \"-\")} convoy events, {last.get(\"loads\", \"-\")} layer loads, {last.get(\"bytes_read\", 0) / 1e9:.1f} GB read at {last.get(\"read_gb_per_s\", 0):.2f} GB/s')
for g in (0, 1):
    s = json.load(open(sys.argv[5 + g]))
    b = s.get('stream') or next((v.get('stream') for v in s.values() if isinstance(v, dict) and 'stream' in v), {})
    print(f'w{g}: waited for the source {b.get(\"source_stalls\", \"-\")} times, {b.get(\"source_wait_seconds\", 0):.1f} s in all; {b.get(\"passes\", \"-\")} passes')
" "$out/small-stats.jsonl" "$a" "$b" "$sa" "$out/small-w0-stats.json" "$out/small-w1-stats.json" | tee -a "$summary"
  stop_worker "$w0"
  stop_worker "$w1"
  stop_daemon
fi
echo "summary in $summary; bench_client tables, JSON and plots in $out"
