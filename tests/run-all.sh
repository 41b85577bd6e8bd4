#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine (run as root, or with sudo
# available): installs what it needs, then
#   1. builds ktrelay (release) and runs the unit tests and the fuzz corpus,
#   2. runs the integration tests (real daemon, swaks, smtplib, openssl, Dovecot,
#      testssl.sh) against that build, checks that -Dbuildtype=release builds, and
#      fuzzes every parser target with libFuzzer for a bounded time (clang),
#   3. builds again with AddressSanitizer + UndefinedBehaviorSanitizer and runs
#      unit and integration tests and the network fuzzer against that build,
#   4. boots Debian 12's 6.1 kernel under qemu and runs the kTLS tests inside,
#   5. runs the benchmark matrix in --quick mode as a smoke test (no speed check).
# Set KT_SKIP_VM=1, KT_SKIP_ASAN=1, KT_SKIP_FUZZ=1 or KT_SKIP_BENCH=1 to leave a stage out locally;
# KT_FUZZ_SECONDS (per libFuzzer target) and KT_NETFUZZ_SECONDS bound the fuzzing.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

DEPS=(gcc pkg-config meson ninja-build liburing-dev libssl-dev libjemalloc-dev libcmocka-dev libc-ares-dev
      libcrypt-dev libmicrohttpd-dev libsystemd-dev libcurl4-openssl-dev libpcre2-dev openssl python3 python3-pytest python3-prometheus-client
      pflogsumm man-db systemd swaks
      dovecot-imapd dovecot-lmtpd postfix testssl.sh qemu-system-x86
      busybox-static cpio kmod gnuplot-nox passwd procps iproute2 haproxy python3-dnslib clang unbound ldnsutils)
# milters for tests/integration/test_milter.py and the opendkim benchmark row
DEPS+=(python3-milter opendkim opendkim-tools)
missing=()
for p in "${DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    # Postfix is a benchmark peer and a next hop in tests, run as private
    # instances: a local-only install, and the distribution's services are
    # never started.
    printf '%s\n' "postfix postfix/main_mailer_type select Local only" \
        "postfix postfix/mailname string localhost.localdomain" | $SUDO debconf-set-selections
    # policy-rc.d keeps the packages' services from starting during the
    # install; it is removed again when this script exits (only if it made it).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=/usr/bin/python3
passed=0
failed=0
failed_names=()
stage() {
    local name=$1; shift
    echo
    echo "== $name"
    local t0=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        echo "== $name: ok ($((SECONDS - t0)) s)"
    else
        failed=$((failed + 1))
        failed_names+=("$name")
        echo "== $name: FAILED ($((SECONDS - t0)) s)"
    fi
}

build() {   # build DIR [meson options]
    local dir=$1; shift
    if [ -d "$dir" ]; then
        meson setup --reconfigure "$dir" "$@" >/dev/null
    else
        meson setup "$dir" "$@" >/dev/null
    fi && meson compile -C "$dir"
}

unit() {    # unit DIR
    meson test -C "$1" --suite unit --suite fuzz --print-errorlogs
}

integration() {   # integration DIR
    KTRELAY_BIN="$ROOT/$1/ktrelay" "$PY" -m pytest -q -p no:cacheprovider tests/integration
}

stage "build (release)" build build
stage "unit tests (release)" unit build
stage "integration tests (release)" integration build
# -Dbuildtype=release (-O3) must build under -Werror too: gcc warns differently at -O3
stage "build (-Dbuildtype=release)" build build-release -Dbuildtype=release
# coverage-guided fuzzing of every parser target, about five minutes in all (clang, libFuzzer)
if [ "${KT_SKIP_FUZZ:-0}" != 1 ]; then
    stage "fuzz targets (libFuzzer, ${KT_FUZZ_SECONDS:-45} s each)" tests/fuzz/run-libfuzzer.sh build-fuzz
fi
if [ "${KT_SKIP_ASAN:-0}" != 1 ]; then
    stage "build (ASan+UBSan)" build build-asan -Dsanitize=true -Dbuildtype=debug
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    stage "unit tests (ASan+UBSan)" unit build-asan
    stage "integration tests (ASan+UBSan)" integration build-asan
    stage "network fuzzer (ASan+UBSan, ${KT_NETFUZZ_SECONDS:-60} s)" "$PY" tests/fuzz/netfuzz.py \
        --bin build-asan/ktrelay --seconds "${KT_NETFUZZ_SECONDS:-60}"
    unset ASAN_OPTIONS UBSAN_OPTIONS
fi
if [ "${KT_SKIP_VM:-0}" != 1 ] && [ -x tests/vm/run-ktls-tests.sh ]; then
    stage "kTLS tests in a Linux 6.1 VM" tests/vm/run-ktls-tests.sh build
fi
if [ "${KT_SKIP_BENCH:-0}" != 1 ] && [ -x bench/run-matrix.sh ]; then
    stage "benchmark smoke run (--quick)" bench/run-matrix.sh --quick --out "$ROOT/build/bench-smoke"
fi

echo
[ ${#failed_names[@]} -eq 0 ] || echo "failed stages: ${failed_names[*]}"
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
