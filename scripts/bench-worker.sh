#!/usr/bin/env bash
# The serving figures of one store, in one run: a loader daemon and ringllama-worker processes on
# it, driven by scripts/bench_client.py.
#
#   scripts/bench-worker.sh STORE OUTDIR
#
#   1. saturation: a daemon-fed worker at batch_size 8 and 64 under a GPU budget, bench_client with
#      as many clients as the batch (and twice that), next to ringllama-bench --gpu-budget-gib at
#      the same batch sizes (CUDA builds);
#   2. daemon-fed against local-window streaming: the same worker with --store (its own window);
#   3. restart to first token: SIGTERM the worker, start it again, a client waiting the whole time;
#      the worker's start phases from its log;
#   4. two workers on one GPU from one daemon, each with its own budget of BUDGET_GIB: tokens/s each
#      and in total.
#
# Environment: BUILD_DIR (default build), BACKEND (cuda where nvidia-smi sees a GPU, else cpu),
# BUDGET_GIB (4: the worker's device budget, as ringllama-bench --gpu-budget-gib), GPU (0),
# OUTPUT_LEN (128), PROMPT_LEN (16), CONTEXT (512), BATCHES ("1 8 64"), PREFILL_LEN (512), PARTS
# ("batches prefill restart shared"), REQUESTS_PER_SLOT (4: requests per level =
# this x the batch size). Everything it starts is stopped on exit, Ctrl-C
# included. Logs and bench_client's JSON/PNG go to OUTDIR; the summary to OUTDIR/summary.txt.
set -euo pipefail

store=${1:?usage: bench-worker.sh STORE OUTDIR}
out=${2:?usage: bench-worker.sh STORE OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
gpu=${GPU:-0}
# shellcheck source=scripts/bench-common.sh
source "$root/scripts/bench-common.sh"
read -r -a limit_args <<<"$(budget_args "$gpu")"
reqs=${REQUESTS_PER_SLOT:-4}

start_daemon loaderd
say "store $store, backend $BACKEND, budget ${BUDGET_GIB:-4} GiB, prompt $plen, output $olen tokens"

# 1 + 2. Saturation, daemon-fed and local window, at batch 8 and 64.
parts=" ${PARTS:-batches prefill restart shared} "
for b in ${BATCHES:-1 8 64}; do
  [[ $parts == *" batches "* ]] || break
  # shellcheck disable=SC2046
  start_worker "daemon-b$b" "$gpu" "$b" --daemon "$control" "${limit_args[@]}" $(ahead "$b")
  levels=$b
  [[ $b -gt 1 ]] && levels="$b,$((2 * b))"  # twice the batch: the queue in front of a full batch
  bench "daemon-b$b" "ipc://$run/daemon-b$b.sock" "$levels" "$((reqs * b))"
  stop_worker "$wpid"
  # shellcheck disable=SC2046
  start_worker "local-b$b" "$gpu" "$b" --store "$store" "${limit_args[@]}" $(ahead "$b")
  bench "local-b$b" "ipc://$run/local-b$b.sock" "$b" "$((reqs * b))"
  stop_worker "$wpid"
  d=$(tok_s "$out/daemon-b$b.json" "$b") l=$(tok_s "$out/local-b$b.json" "$b")
  say "$(python3 -c "import sys; d, l = map(float, sys.argv[1:3]); print(f'b{sys.argv[3]}: daemon-fed {d:.1f} tok/s, local window {l:.1f} tok/s: ratio {d / l:.3f}')" "$d" "$l" "$b")"
done
# Prefill: one prompt of PREFILL_LEN tokens in one chunk, its first token's latency, daemon-fed and
# local window.
pl=${PREFILL_LEN:-512}
if [[ $parts == *" prefill "* ]]; then
for src in daemon local; do
  if [[ $src == daemon ]]; then wargs=(--daemon "$control"); else wargs=(--store "$store"); fi
  # shellcheck disable=SC2046
  "$bin/ringllama-worker" --backend "$BACKEND" --gpu "$gpu" --listen "ipc://$run/prefill-$src.sock" --name "prefill-$src" \
    --batch-size 1 --queue-max 8 --max-context $((pl + 16)) --prefill-chunk-tokens "$pl" "${wargs[@]}" \
    "${limit_args[@]}" $(ahead 1) >"$out/prefill-$src.log" 2>&1 &
  wpid=$!
  pids+=("$wpid")
  wait_log "$out/prefill-$src.log" "info: ready" "$wpid"
  python3 "$root/scripts/bench_client.py" --endpoint "ipc://$run/prefill-$src.sock" --concurrency 1 --requests 3 \
    --prompt-len "$pl" --output-len 1 --out "$out/prefill-$src" >"$out/prefill-$src.txt" 2>&1
  stop_worker "$wpid"
done
ttft() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['levels'][0]['ttft_ms_p50'])" "$1"; }
say "$(python3 -c "import sys; d, l, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]); print(f'prefill {n} tokens: daemon-fed {n / d * 1e3:.0f} tok/s (TTFT {d:.0f} ms), local window {n / l * 1e3:.0f} tok/s (TTFT {l:.0f} ms): ratio {l / d:.3f}')" "$(ttft "$out/prefill-daemon.json")" "$(ttft "$out/prefill-local.json")" "$pl")"
fi

if [[ $parts == *" batches "* && $BACKEND == cuda && -x $bin/ringllama-bench ]]; then
  "$bin/ringllama-bench" --store "$store" --gpu-budget-gib "$budget" --batches "$(echo ${BATCHES:-1 8 64} | tr ' ' ,)" \
    --decode-steps 16 --decode-prompt "$plen" --prompt-tokens "$pl" >"$out/ringllama-bench.log" 2>&1
  for b in ${BATCHES:-1 8 64}; do
    ref=$(awk -v f="b$b" '$1 == "decode" && $2 == f {print $3; exit}' "$out/ringllama-bench.log")
    [[ -n $ref ]] && say "$(python3 -c "import sys; w, r = map(float, sys.argv[1:3]); print(f'b{sys.argv[3]}: bench_client at saturation {w:.1f} tok/s, ringllama-bench {r:.1f} tok/s: ratio {w / r:.3f}')" "$(tok_s "$out/daemon-b$b.json" "$b")" "$ref" "$b")"
  done
fi

# 3. Restart to first token: a client waits through SIGTERM, exit and start; its request sits in
#    its socket until the new worker listens.
if [[ $parts == *" restart "* ]]; then
# shellcheck disable=SC2046
start_worker restart "$gpu" 8 --daemon "$control" "${limit_args[@]}" $(ahead 8)
# A worker in service: it has answered a request (its host memory is registered) when it stops.
python3 "$root/scripts/ringllama_client.py" --endpoint "ipc://$run/restart.sock" --prompt-ids 1,2,3 --max-tokens 4 \
  --timeout 120 >"$out/restart-first-client.log" 2>&1
t0=$(date +%s.%N)
stop_worker "$wpid"
t1=$(date +%s.%N)
python3 "$root/scripts/ringllama_client.py" --endpoint "ipc://$run/restart.sock" --prompt-ids 1,2,3 --max-tokens 4 \
  --timing --timeout 120 >"$out/restart-client.log" 2>&1 &
cpid=$!
cp "$out/restart.log" "$out/restart-before.log"
# shellcheck disable=SC2046
start_worker restart "$gpu" 8 --daemon "$control" "${limit_args[@]}" $(ahead 8)
wait "$cpid"
first=$(sed -n 's/^first token at \([0-9.]*\).*/\1/p' "$out/restart-client.log")
say "$(python3 -c "import sys; print(f'restart to first token: {(float(sys.argv[1]) - float(sys.argv[2])) * 1e3:.0f} ms from SIGTERM')" "$first" "$t0")"
say "  the old worker drained and exited in $(python3 -c "import sys; print(f'{(float(sys.argv[1]) - float(sys.argv[2])) * 1e3:.0f}')" "$t1" "$t0") ms; $(grep -o 'stopped:.*' "$out/restart-before.log" || echo 'no drain logged')"
say "  worker start: $(grep -o 'started in.*' "$out/restart.log")"
say "  $(grep -o 'host weights registered.*' "$out/restart.log" || true)"
say "  $(grep -o 'CUDA backend start phases:.*' "$out/restart.log" || true)"
stop_worker "$wpid"
fi

# 4. Two workers on one GPU, one daemon, a budget each.
if [[ $parts == *" shared "* ]]; then
# shellcheck disable=SC2046
start_worker shared-a "$gpu" 8 --daemon "$control" "${limit_args[@]}" $(ahead 8)
wa=$wpid
# shellcheck disable=SC2046
start_worker shared-b "$gpu" 8 --daemon "$control" "${limit_args[@]}" $(ahead 8)
wb=$wpid
bench shared-a "ipc://$run/shared-a.sock" 8 "$((reqs * 8))" >/dev/null &
ba=$!
bench shared-b "ipc://$run/shared-b.sock" 8 "$((reqs * 8))" >/dev/null &
bb=$!
wait "$ba" "$bb"
a=$(tok_s "$out/shared-a.json" 8) b=$(tok_s "$out/shared-b.json" 8)
say "$(python3 -c "import sys; a, b = map(float, sys.argv[1:]); print(f'two workers on one GPU, b8 each: {a:.1f} + {b:.1f} = {a + b:.1f} tok/s')" "$a" "$b")"
stop_worker "$wa"
stop_worker "$wb"
fi
echo "summary in $summary; bench_client tables, JSON and plots in $out"
