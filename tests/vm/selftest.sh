#!/bin/bash
# Proves the VM harness gives a working kernel TLS: builds ktls_check on the host, boots the VM through
# run.sh and, inside it, runs TLS 1.2 and TLS 1.3 AES-GCM connections with SSL_OP_ENABLE_KTLS, then requires
# /proc/net/tls_stat to show the kernel set up the expected software TX/RX contexts.
# Usage: selftest.sh [--keep]   (--keep leaves the work folder in place)
# Exit 0 only if kTLS really engaged.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Counter NAME from /proc/net/tls_stat.
tls_stat() { awk -v n="$1" '$1 == n { print $2 }' /proc/net/tls_stat; }

# Runs one ktls_check and checks the counters of kernel TLS contexts grew by at least the expected amount:
# two ends each install TX, and RX too for TLS 1.2.
check_version() {
	local version=$1 want_rx=$2 tx0 rx0 tx rx
	tx0=$(($(tls_stat TlsTxSw) + $(tls_stat TlsTxDevice)))
	rx0=$(($(tls_stat TlsRxSw) + $(tls_stat TlsRxDevice)))
	if ! "$bin" "$version" "$dir/cert.pem" "$dir/key.pem"; then
		echo "selftest: FAIL: ktls_check $version did not get kTLS" >&2
		return 1
	fi
	tx=$(($(tls_stat TlsTxSw) + $(tls_stat TlsTxDevice) - tx0))
	rx=$(($(tls_stat TlsRxSw) + $(tls_stat TlsRxDevice) - rx0))
	echo "selftest: TLS $version: tls_stat TX contexts +$tx, RX contexts +$rx"
	if [ "$tx" -lt 2 ] || [ "$rx" -lt "$want_rx" ]; then
		echo "selftest: FAIL: TLS $version expected TX +2 and RX +$want_rx in /proc/net/tls_stat" >&2
		return 1
	fi
}

if [ "${1:-}" = --guest ]; then
	bin=$2 dir=$3
	[ -r /proc/net/tls_stat ] || { echo "selftest: FAIL: no /proc/net/tls_stat (tls module not loaded)" >&2; exit 1; }
	echo "selftest: kernel $(uname -r), ULPs: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
	cd /tmp
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=ktvm -days 2 \
		-keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null || { echo "selftest: FAIL: openssl req" >&2; exit 1; }
	check_version 1.2 2
	check_version 1.3 0
	cat /proc/net/tls_stat
	echo "selftest: PASS: kTLS engaged (TLS 1.2 TX+RX, TLS 1.3 TX)"
	exit 0
fi

"$here/prepare.sh" >/dev/null || { echo "selftest: FAIL: prepare.sh failed" >&2; exit 1; }
work=$(mktemp -d /tmp/ktvm-selftest.XXXXXX)
[ "${1:-}" = --keep ] || trap 'rm -rf "$work"' EXIT
cc=${CC:-cc}
$cc -O2 -Wall -Wextra -Werror -o "$work/ktls_check" "$here/ktls_check.c" -lssl -lcrypto ||
	{ echo "selftest: FAIL: cannot build ktls_check.c (needs libssl-dev)" >&2; exit 1; }
set +e
"$here/run.sh" --workdir "$work" --timeout "${KT_VM_TIMEOUT:-300}" -- \
	"$here/selftest.sh" --guest "$work/ktls_check" "$work"
rc=$?
set -e
[ $rc = 0 ] && echo "selftest: PASS" || echo "selftest: FAIL (status $rc)" >&2
exit $rc
