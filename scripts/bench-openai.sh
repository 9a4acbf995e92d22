#!/usr/bin/env bash
# The OpenAI front door against the ZeroMQ one, in one run: one loader daemon and one
# ringllama-worker that serves both (--http-listen), driven by scripts/bench_client.py in its two
# modes at the same client levels. Prints per level the tokens/s, TTFT and TPOT of each mode and
# the HTTP mode's tokens/s over the ZeroMQ mode's (the cost of HTTP, JSON and server-sent events
# on the same scheduler).
#
#   scripts/bench-openai.sh STORE OUTDIR
#
# Environment: BUILD_DIR, GPU (0), BATCH (64: the worker's batch_size), LEVELS ("64,128": client
# counts, at and past saturation), BUDGET_GIB (4), CONTEXT (32), PROMPT_LEN (8), OUTPUT_LEN (24),
# HTTP_PORT (18080). Without a GPU it runs the CPU backend. Summary in OUTDIR/summary.txt,
# bench_client's JSON/PNG and the logs next to it; everything it starts is stopped on exit.
set -euo pipefail

store=${1:?usage: bench-openai.sh STORE OUTDIR}
out=${2:?usage: bench-openai.sh STORE OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
: "${OUTPUT_LEN:=24}" "${PROMPT_LEN:=8}" "${CONTEXT:=32}"
# shellcheck source=scripts/bench-common.sh
source "$root/scripts/bench-common.sh"
gpu=${GPU:-0} batch=${BATCH:-64} levels=${LEVELS:-64,128} port=${HTTP_PORT:-18080}

say "store $store, backend $BACKEND, budget $budget GiB, batch_size $batch, prompt $plen, output $olen tokens"
start_daemon loaderd
# shellcheck disable=SC2046
start_worker w "$gpu" "$batch" --daemon "$control" $(budget_args "$gpu") $(ahead "$batch") \
  --http-listen "127.0.0.1:$port"
say "$(grep -o 'http: listening.*' "$out/w.log")"

run_mode() {  # run_mode NAME ARGS...: bench_client at every level, JSON in OUTDIR/NAME.json
  local name=$1
  shift
  python3 "$root/scripts/bench_client.py" "$@" --concurrency "$levels" --prompt-len "$plen" --output-len "$olen" \
    --out "$out/$name" | tee "$out/$name.txt"
}
run_mode zmq --endpoint "ipc://$run/w.sock"
run_mode openai --openai "http://127.0.0.1:$port/v1"

python3 - "$out/zmq.json" "$out/openai.json" <<'PY' | tee -a "$summary"
import json, sys
z = {l["level"]: l for l in json.load(open(sys.argv[1]))["levels"]}
o = {l["level"]: l for l in json.load(open(sys.argv[2]))["levels"]}
print(f"{'clients':>7} {'ZeroMQ tok/s':>12} {'OpenAI tok/s':>12} {'ratio':>6} {'TTFT p50 z/o ms':>17} {'TPOT p50 z/o ms':>17} {'errors z/o':>10}")
for n in sorted(z):
    a, b = z[n], o.get(n)
    if b is None:
        continue
    ratio = b["tokens_per_s"] / a["tokens_per_s"] if a["tokens_per_s"] else 0.0
    errs = f"{sum(a['errors'].values())}/{sum(b['errors'].values())}"
    print(f"{n:>7} {a['tokens_per_s']:>12.1f} {b['tokens_per_s']:>12.1f} {ratio:>6.3f} "
          f"{a['ttft_ms_p50']:>8.0f}/{b['ttft_ms_p50']:<8.0f} {a['tpot_ms_p50']:>8.1f}/{b['tpot_ms_p50']:<8.1f} {errs:>10}")
PY
stop_worker "$wpid"
stop_daemon
