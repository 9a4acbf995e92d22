#!/usr/bin/env bash
# `cmake --install` into a temporary prefix, then the installed binaries run from there (their
# RPATH finds the installed libraries, not the build's), the profiles and the systemd units are
# in place with the prefix's paths filled in, and systemd-analyze accepts the units.
# Usage: install_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail

build=${1:?usage: install_test.sh BUILD_DIR SOURCE_DIR}
src=${2:?usage: install_test.sh BUILD_DIR SOURCE_DIR}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ringllama-install-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tmp=$(cd "$tmp" && pwd -P)  # the paths ldd prints are resolved ones
prefix=$tmp/prefix

fail() {
  echo "install_test: FAIL: $*" >&2
  exit 1
}

cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log" >&2; fail "cmake --install $build --prefix $prefix"; }

for bin in ringllama-pack ringllama-loaderd ringllama-generate ringllama-tokenize; do
  [[ -x $prefix/bin/$bin ]] || fail "$prefix/bin/$bin is not installed"
done
for lib in ringllama_common ringllama_pack ringllama_loader ringllama_engine; do
  [[ -f $prefix/lib/lib$lib.so ]] || fail "$prefix/lib/lib$lib.so is not installed"
done

# Every ringllama library an installed binary loads comes from the prefix.
for bin in "$prefix"/bin/*; do
  deps=$(ldd "$bin") || fail "ldd $bin"
  if grep -q "not found" <<<"$deps"; then
    echo "$deps" >&2
    fail "$bin: a library is not found"
  fi
  while read -r name _ path _; do
    [[ $name == libringllama_* ]] || continue
    path=$(realpath "$path")
    [[ $path == "$prefix/lib/"* ]] || fail "$bin loads $name from $path, not from $prefix/lib"
  done <<<"$deps"
done

# The installed binaries work from the prefix.
"$prefix/bin/ringllama-generate" --help >"$tmp/help.txt" || fail "ringllama-generate --help"
grep -q -- "--store" "$tmp/help.txt" || fail "ringllama-generate --help does not mention --store"
"$prefix/bin/ringllama-pack" --random tiny --out "$tmp/tiny.store" >"$tmp/pack.log" 2>&1 ||
  { cat "$tmp/pack.log" >&2; fail "ringllama-pack --random tiny"; }
"$prefix/bin/ringllama-generate" --store "$tmp/tiny.store" --prompt-ids 1,2,3 --max-tokens 4 --ignore-eos \
  --backend cpu --tokens-out "$tmp/tokens.txt" >"$tmp/generate.log" 2>&1 ||
  { cat "$tmp/generate.log" >&2; fail "ringllama-generate --backend cpu"; }
[[ $(<"$tmp/tokens.txt") =~ ^[0-9]+([ ,][0-9]+){3}$ ]] ||
  fail "expected 4 generated ids, got '$(<"$tmp/tokens.txt")'"

# The profiles, all of them.
for f in "$src"/configs/*.yaml; do
  cmp -s "$f" "$prefix/share/ringllama/configs/${f##*/}" ||
    fail "$prefix/share/ringllama/configs/${f##*/} is missing or differs from $f"
done

# The units, rendered for this prefix.
units=$prefix/lib/systemd/system
for unit in ringllama-loaderd.service ringllama-worker@.service; do
  [[ -f $units/$unit ]] || fail "$units/$unit is not installed"
  if grep -n '@[A-Z_]*@' "$units/$unit"; then fail "$units/$unit: a placeholder is left"; fi
done
grep -qx "ExecStart=$prefix/bin/ringllama-loaderd --config /etc/ringllama/ringllama.yaml" \
  "$units/ringllama-loaderd.service" || fail "ringllama-loaderd.service: ExecStart does not name $prefix/bin"
# A daemon killed with SIGKILL leaves its segment: the unit cleans up after it, in its own directory.
grep -qx "ExecStopPost=-$prefix/bin/ringllama-loaderd --cleanup --config /etc/ringllama/ringllama.yaml" \
  "$units/ringllama-loaderd.service" || fail "ringllama-loaderd.service: no ExecStopPost running --cleanup"
grep -qx "RuntimeDirectory=ringllama" "$units/ringllama-loaderd.service" ||
  fail "ringllama-loaderd.service: no RuntimeDirectory=ringllama"
grep -qx "ExecStart=$prefix/bin/ringllama-worker --config /etc/ringllama/ringllama.yaml --gpu %i" \
  "$units/ringllama-worker@.service" || fail "ringllama-worker@.service: ExecStart does not name $prefix/bin"

if ! command -v systemd-analyze >/dev/null; then
  echo "install_test: systemd-analyze not found (Debian package systemd): the units are not verified"
  exit 0
fi
# verify checks that ExecStart's binary exists, hence the units of this prefix. Unknown keys and
# bad values are only warnings to it: any output fails the test. The worker's instance (GPU 0)
# needs the daemon's unit, which verify finds beside it.
to_verify=("$units/ringllama-loaderd.service")
if [[ -x $prefix/bin/ringllama-worker ]]; then
  to_verify+=("$units/ringllama-worker@0.service")
else
  echo "install_test: ringllama-worker is not built: ringllama-worker@.service is not verified"
fi
if ! systemd-analyze verify "${to_verify[@]}" >"$tmp/verify.log" 2>&1 || [[ -s $tmp/verify.log ]]; then
  cat "$tmp/verify.log" >&2
  fail "systemd-analyze verify ${to_verify[*]}"
fi
echo "install_test: installed into $prefix, ran from there; units verified: ${to_verify[*]##*/}"
