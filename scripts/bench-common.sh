# Shared by the serving benchmarks (bench-worker.sh, bench-two-gpus.sh): sourced after `store`,
# `out` and `root` are set. Sets bin, run (a private folder for sockets), control, summary, the
# worker helpers, and stops everything started through them on exit (Ctrl-C included).
bin=${BUILD_DIR:-$root/build}/bin
budget=${BUDGET_GIB:-4}
olen=${OUTPUT_LEN:-128} plen=${PROMPT_LEN:-16} ctx=${CONTEXT:-512}
if [[ -z ${BACKEND:-} ]]; then
  BACKEND=cpu
  command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && BACKEND=cuda
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
run=$(mktemp -d /tmp/ringllama-bench-worker.XXXXXX)
control="ipc://$run/loaderd.sock"
summary=$out/summary.txt
: >"$summary"

pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { echo "$*" | tee -a "$summary"; }

# budget_args GPU: the device budget as a fraction of that card, as ringllama-bench
# --gpu-budget-gib plans it (a 64 MiB guard); nothing on the CPU backend.
budget_args() {
  [[ $BACKEND == cuda ]] || return 0
  local total_mib
  total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i "$1")
  echo "--gpu-memory-limit $(python3 -c "import sys; print(f'{float(sys.argv[1]) * 1024 / float(sys.argv[2]):.5f}')" \
    "$budget" "$total_mib") --free-guard-mb 64"
}

# ahead BATCH: the prefetch depth ringllama-bench picks for a 4 GiB budget on an 8B store at that
# batch size (AHEAD_B8, AHEAD_B64 override); nothing on the CPU backend.
ahead() {
  [[ $BACKEND == cuda ]] || return 0
  if [[ $1 -ge 64 ]]; then echo "--gpu-ahead-layers ${AHEAD_B64:-1}"; else echo "--gpu-ahead-layers ${AHEAD_B8:-2}"; fi
}

wait_log() {  # wait_log FILE TEXT PID: until FILE has TEXT, or PID is gone
  for _ in $(seq 1200); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "process $3 exited:"; tail -20 "$1"; return 1; }
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1"
  return 1
}

# start_daemon NAME [ARGS...]: the loader daemon on STORE at $control; sets $dpid, logs to
# OUTDIR/NAME.log.
start_daemon() {
  local name=$1
  shift
  "$bin/ringllama-loaderd" --store "$store" --control "$control" --mlock warn "$@" >"$out/$name.log" 2>&1 &
  dpid=$!
  pids+=("$dpid")
  wait_log "$out/$name.log" "info: ready" "$dpid"
}

stop_daemon() {  # SIGTERM to $dpid, then its exit status must be 0
  kill -TERM "$dpid"
  wait "$dpid" || say "loader daemon exited with status $? after SIGTERM"
}

# start_worker NAME GPU BATCH [ARGS...]: sets $wpid; listens on ipc://$run/NAME.sock, logs to
# OUTDIR/NAME.log.
start_worker() {
  local name=$1 g=$2 batch=$3
  shift 3
  "$bin/ringllama-worker" --backend "$BACKEND" --gpu "$g" --listen "ipc://$run/$name.sock" --name "$name" \
    --batch-size "$batch" --queue-max 1024 --max-context "$ctx" --prefill-chunk-tokens "$plen" "$@" \
    >"$out/$name.log" 2>&1 &
  wpid=$!
  pids+=("$wpid")
  wait_log "$out/$name.log" "info: ready" "$wpid"
}

stop_worker() {  # stop_worker PID: SIGTERM, then its exit status must be 0 (a drained stop)
  kill -TERM "$1"
  local rc=0
  wait "$1" || rc=$?
  [[ $rc -eq 0 ]] || say "worker $1 exited with status $rc after SIGTERM (expected 0: drained)"
}

bench() {  # bench OUTNAME ENDPOINT LEVELS REQUESTS
  python3 "$root/scripts/bench_client.py" --endpoint "$2" --concurrency "$3" --requests "$4" \
    --prompt-len "$plen" --output-len "$olen" --out "$out/$1" | tee "$out/$1.txt"
}

tok_s() {  # tok_s JSON LEVEL: tokens/s of that level
  python3 -c "import json, sys; print(next(l['tokens_per_s'] for l in json.load(open(sys.argv[1]))['levels'] if l['level'] == int(sys.argv[2])))" "$1" "$2"
}
