#!/usr/bin/env bash
# Fuzzes the parsers of outside input (tests/fuzz): scripts/fuzz.sh SECONDS [TARGET...]
#
# Builds the libFuzzer targets with clang++ (ASan + UBSan, -O1 -g) into BUILD_DIR (default
# build-fuzz/), runs each TARGET (default: all) for SECONDS on its seed corpus
# tests/fuzz/corpus/TARGET, and prints per target the executions, the coverage and features reached
# and the findings. New inputs go to WORK_DIR/TARGET/corpus (default BUILD_DIR/fuzz-work), never into
# the repository; a finding is saved as WORK_DIR/TARGET/crash-* (or leak-, timeout-, oom-) with the
# log beside it. Exits 1 when any target has a finding.
#   JOBS=N      targets run N at a time (default 1)
#   BUILD=0     skip the build (the targets are already built in BUILD_DIR)
#   Reproduce:  BUILD_DIR/bin/fuzz_TARGET WORK_DIR/TARGET/crash-...
# Fix a finding in the parser and copy the input into tests/fuzz/corpus/TARGET/ as a regression:
# the ordinary build's Fuzz.TARGET.Corpus test replays it in CI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
  echo "usage: $0 SECONDS [TARGET...]" >&2
  exit 2
fi
seconds=$1
shift
build=${BUILD_DIR:-$root/build-fuzz}
work=${WORK_DIR:-$build/fuzz-work}
jobs=${JOBS:-1}
cxx=${CXX_FUZZ:-clang++}

all_targets=()
for d in "$root"/tests/fuzz/corpus/*/; do all_targets+=("$(basename "$d")"); done
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  if [[ ! -f $root/tests/fuzz/fuzz_$t.cpp || ! -d $root/tests/fuzz/corpus/$t ]]; then
    echo "$0: no target '$t' (known: ${all_targets[*]})" >&2
    exit 2
  fi
done

if [[ ${BUILD:-1} != 0 ]]; then
  # Only the libraries the targets link are built; the rest of the project is configured, not compiled.
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=Debug \
    -DRINGLLAMA_FUZZ=ON -DRINGLLAMA_CUDA=OFF -DBUILD_TESTING=OFF >/dev/null
  ninja -C "$build" -j "$(nproc)" $(printf 'fuzz_%s ' "${targets[@]}")
fi

# One target: fuzz, then a one-line summary into $work/$t/summary.
run_one() {
  local t=$1 dir=$work/$1
  mkdir -p "$dir/corpus"
  rm -f "$dir"/crash-* "$dir"/leak-* "$dir"/timeout-* "$dir"/oom-* "$dir/summary"
  local rc=0
  # -close_fd_mask=1: the targets' own stdout (a --help text) stays out of the log.
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
    "$build/bin/fuzz_$t" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -close_fd_mask=1 \
    -print_final_stats=1 -artifact_prefix="$dir/" "$dir/corpus" "$root/tests/fuzz/corpus/$t" \
    >"$dir/log" 2>&1 || rc=$?
  local runs cov ft corp findings
  runs=$(grep -o '^stat::number_of_executed_units: *[0-9]*' "$dir/log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$dir/log" | tail -1 | grep -o '[0-9]*' || true)
  ft=$(grep -o 'ft: [0-9]*' "$dir/log" | tail -1 | grep -o '[0-9]*' || true)
  corp=$(grep -o 'corp: [0-9]*' "$dir/log" | tail -1 | grep -o '[0-9]*' || true)
  findings=$(cd "$dir" && ls crash-* leak-* timeout-* oom-* 2>/dev/null | tr '\n' ' ' || true)
  if [[ -z $findings && $rc -ne 0 ]]; then findings="exit status $rc, see $dir/log"; fi
  printf '%-18s %12s execs  cov %6s  ft %7s  corpus %6s  findings: %s\n' "$t" "${runs:-?}" "${cov:-?}" \
    "${ft:-?}" "${corp:-?}" "${findings:-none}" >"$dir/summary"
}

echo "fuzzing ${targets[*]} for ${seconds}s each, $jobs at a time; work in $work"
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [[ $running -ge $jobs ]]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

status=0
for t in "${targets[@]}"; do
  cat "$work/$t/summary"
  grep -q 'findings: none$' "$work/$t/summary" || status=1
done
if [[ $status -ne 0 ]]; then
  echo "findings: reproduce with $build/bin/fuzz_TARGET FILE; the logs are in $work/TARGET/log" >&2
fi
exit $status
