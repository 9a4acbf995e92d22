#!/usr/bin/env bash
# The quick start: installs what is missing, builds, packs a built-in random model and
# generates with it. RINGLLAMA_DEMO_SHAPE picks the shape (default tiny).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
bash scripts/build.sh
shape=${RINGLLAMA_DEMO_SHAPE:-tiny}
store=build/demo-store-$shape
if [[ ! -d $store ]]; then
  build/bin/ringllama-pack --random "$shape" --seed 1 --out "$store"
fi
build/bin/ringllama-pack --verify "$store"
echo "== generating 32 tokens greedily from the prompt 1,2,3,4 (CPU backend)"
build/bin/ringllama-generate --store "$store" --backend cpu --prompt-ids 1,2,3,4 --max-tokens 32 --ignore-eos
