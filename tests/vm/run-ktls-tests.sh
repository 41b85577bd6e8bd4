#!/bin/bash
# Runs ktrelay's kernel TLS integration tests (tests/integration/test_ktls.py, test_ktls_relay.py) inside the kTLS VM: prepares
# the VM, boots it through run.sh with the build folder (read-only) and a writable work folder at their host
# paths (the source tree too, read-only), runs pytest there with KTRELAY_BIN from the build folder, and exits with pytest's status (124 on
# timeout, 125 if the VM could not run it). The tests fail rather than skip if the VM lacks kTLS.
# Usage: run-ktls-tests.sh BUILDDIR [WORKDIR] [-- PYTEST-ARGS...]
#   WORKDIR defaults to BUILDDIR/ktls-vm and receives junit.xml; KT_VM_TIMEOUT (default 900 s) bounds the VM.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(cd "$here/../.." && pwd -P)
die() { echo "run-ktls-tests.sh: ERROR: $*" >&2; exit 125; }

[ $# -ge 1 ] && [ "$1" != -- ] || die "usage: $0 BUILDDIR [WORKDIR] [-- PYTEST-ARGS...]"
build=$(cd "$1" 2>/dev/null && pwd -P) || die "cannot enter build folder $1"
shift
work=$build/ktls-vm
if [ $# -gt 0 ] && [ "$1" != -- ]; then
	work=$1
	shift
fi
[ "${1:-}" != -- ] || shift
[ -x "$build/ktrelay" ] || die "$build/ktrelay not found (build first)"
mkdir -p "$work" || die "cannot create $work"
work=$(cd "$work" && pwd -P)

"$here/prepare.sh" >/dev/null || die "prepare.sh failed"
# The source tree is read-only in the VM: no bytecode, no pytest cache. Relay folders go to the VM's /tmp.
"$here/run.sh" --workdir "$work" --share "$src" --share "$build" --timeout "${KT_VM_TIMEOUT:-900}" -- \
	env KTRELAY_BIN="$build/ktrelay" KT_KTLS_REQUIRED=1 PYTHONDONTWRITEBYTECODE=1 \
	bash -c '/usr/bin/python3 -m pytest "$@"; rc=$?; echo "kernel TLS counters after the tests:"
		cat /proc/net/tls_stat; exit $rc' pytest \
	-q -rs -p no:cacheprovider --junitxml="$work/junit.xml" "$src/tests/integration/test_ktls.py" \
	"$src/tests/integration/test_ktls_relay.py" "$@"
rc=$?
echo "run-ktls-tests.sh: status $rc" >&2
exit $rc
