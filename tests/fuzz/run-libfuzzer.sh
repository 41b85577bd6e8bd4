#!/usr/bin/env bash
# Coverage-guided fuzzing of every fuzz target with libFuzzer, for a bounded time each
# (KT_FUZZ_SECONDS, default 45; nine targets, so about seven minutes in all), under ASan and UBSan.
# Builds with clang into BUILD (default build-fuzz, -Dfuzz=true). New corpus entries go to a scratch
# directory; the seed corpus in the tree is only read. A crash, leak or timeout stops that target,
# leaves the input in tests/fuzz/regressions/NAME/ (add it to the tree: the `fuzz` suite of the normal
# unit tests replays every file there) and makes the script fail.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:-build-fuzz}
SECS=${KT_FUZZ_SECONDS:-45}

if [ -d "$BUILD" ]; then
    meson setup --reconfigure "$BUILD" -Dfuzz=true -Dbuildtype=debug >/dev/null || exit 1
else
    CC=clang meson setup "$BUILD" -Dfuzz=true -Dbuildtype=debug >/dev/null || exit 1
fi
meson compile -C "$BUILD" || exit 1

declare -A corpus=([smtp_parse]=corpus_smtp [config]=corpus_config [tables]=corpus_tables [auth]=corpus_auth [proxy]=corpus_proxy [dns]=corpus_dns [mta_sts]=corpus_mta_sts [mime_downgrade]=corpus_mime_downgrade [milter]=corpus_milter)
failed=0
for t in smtp_parse config tables auth proxy dns mta_sts mime_downgrade milter; do
    work=$(mktemp -d)
    mkdir -p "tests/fuzz/regressions/$t"
    echo "== fuzz_$t: ${SECS} s"
    if ! ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        "$BUILD/tests/fuzz/fuzz_$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="tests/fuzz/regressions/$t/" "$work" "tests/fuzz/${corpus[$t]}" 2>"$work.log"; then
        tail -n 60 "$work.log"
        echo "== fuzz_$t: FAILED; the input is in tests/fuzz/regressions/$t/ (commit it as a regression input)"
        failed=1
    else
        grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$work.log" | sed "s/^/   /"
    fi
    rm -rf "$work" "$work.log"
done
exit $failed
