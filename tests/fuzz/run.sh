#!/usr/bin/env bash
# `make fuzz`: builds the cargo-fuzz targets and runs each for a bounded time
# (FUZZ_SECONDS, default 60). A crash, leak, timeout or out-of-memory input that
# libFuzzer finds is copied to tests/fuzz/regressions/<target>/, where
# `cargo test` (tests/fuzz_regressions.rs) replays it from then on: fix the bug,
# commit the input. Exits non-zero when any target found one.
#
# cargo fuzz needs nightly-only compiler flags (-Zsanitizer=address and the
# sanitizer-coverage options). This machine has only the stable toolchain;
# RUSTC_BOOTSTRAP=1 makes stable rustc accept those flags (the AddressSanitizer
# runtime ships with the stable x86_64 standard library).
set -euo pipefail

cd "$(dirname "$0")"
CARGO=${CARGO:-cargo}
SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-"classify_domain_xml vmi_json report_validator"}
export RUSTC_BOOTSTRAP=1

if ! "$CARGO" fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz from crates.io"
    "$CARGO" install cargo-fuzz --locked
fi

echo "== building the fuzz targets (AddressSanitizer, release, debug assertions)"
"$CARGO" fuzz build --fuzz-dir .

summary=()
failed=0
for target in $TARGETS; do
    # libFuzzer adds what it finds to the first corpus directory: a scratch one under
    # target/, so the committed seeds in corpus/<target>/ stay as they are.
    work="target/corpus-work/$target"
    artifacts="artifacts/$target"
    log="target/fuzz-$target.log"
    mkdir -p "$work" "$artifacts" "regressions/$target"
    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s"
    status=0
    "$CARGO" fuzz run --fuzz-dir . "$target" "$work" "corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    found=()
    for artifact in "$artifacts"/crash-* "$artifacts"/leak-* "$artifacts"/timeout-* "$artifacts"/oom-*; do
        [ -e "$artifact" ] || continue
        cp "$artifact" "regressions/$target/"
        found+=("tests/fuzz/regressions/$target/$(basename "$artifact")")
        rm -f "$artifact"
    done
    if [ "$status" -ne 0 ] || [ "${#found[@]}" -gt 0 ]; then
        failed=1
        tail -n 60 "$log"
        summary+=("$target: FAILED (exit $status) after ${execs:-?} executions; kept: ${found[*]:-none}")
    else
        summary+=("$target: ${execs:-?} executions, no crash")
    fi
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "a fuzz target failed: the inputs named above are now regression tests (cargo test -p e2e --test fuzz_regressions)" >&2
fi
exit "$failed"
