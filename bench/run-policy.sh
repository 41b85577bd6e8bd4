#!/usr/bin/env bash
# run-policy.sh: the cost of an internet MX's client checks. The same load
# (4 KB messages over STARTTLS with TLS 1.3, pipelined, 20 connections; the
# target row of the matrix) against ktrelay twice: "off" without client
# checks (no reverse DNS, no limits: the client is in mynetworks, the
# default limit exceptions), and "on" with reverse DNS and forward
# confirmation, every per-client limit counting (set high enough never to
# refuse), two DNS lists on the client, an rhsbl on the reverse name, HELO
# and sender domain, reject_unknown_{client,helo,sender_domain}: every check
# asks DNS, answered by a DNS server on loopback (python3-dnslib) and then
# cached for the records' TTL, as an MX sees repeat senders. Runs alternate
# off/on (RUNS=N in the environment, default 7); the median of each is
# reported with the ratio, and the best run of each (other load on the
# machine only slows runs down, so the best is the least disturbed).
#
# usage: bench/run-policy.sh [--quick] [--ktrelay PATH] [--ktbench PATH] [--out DIR]
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/bench/lib.sh"
KTRELAY=$REPO/build/ktrelay
KTBENCH=$REPO/build/bench/ktbench
OUT=$REPO/bench/results
QUICK=0
while [ $# -gt 0 ]; do
	case $1 in
	--quick) QUICK=1 ;;
	--ktrelay) KTRELAY=$2; shift ;;
	--ktbench) KTBENCH=$2; shift ;;
	--out) OUT=$2; shift ;;
	-h|--help) sed -n '2,16p' "$0"; exit 0 ;;
	*) echo "run-policy: unknown option $1" >&2; exit 2 ;;
	esac
	shift
done
if [ "$QUICK" = 1 ]; then C=4 M=50 RUNS=1; else C=20 M=500 RUNS=${RUNS:-7}; fi
PORT=10125
DNSPORT=10153

T=$(mktemp -d /tmp/ktbench-policy.XXXXXX)
KT_PID= DNS_PID=
cleanup() {
	set +e
	[ -n "$KT_PID" ] && kill "$KT_PID" 2>/dev/null && wait "$KT_PID" 2>/dev/null
	[ -n "$DNS_PID" ] && kill "$DNS_PID" 2>/dev/null && wait "$DNS_PID" 2>/dev/null
	rm -rf "$T"
}
trap cleanup EXIT

bench_cert "$T"
echo "@bench.test bench.test/catchall/" >"$T/vmailbox"
# ktrelay's worker runs as mail_owner (ktrelay) and creates the mailbox itself: it must reach $T and own
# virtual_mailbox_base, as in run-matrix.sh
id -u ktrelay >/dev/null 2>&1 ||
	useradd --system --home-dir /var/lib/ktrelay --shell /usr/sbin/nologin ktrelay
chmod 711 "$T"

# A DNS server for the checks: the client 127.0.0.1 is client.bench.test (confirmed), the HELO name
# ktbench.test and the sender domain exist, every list answers NXDOMAIN; TTL 300 everywhere.
/usr/bin/python3 - "$DNSPORT" >"$T/dns.log" 2>&1 <<'EOF' &
import socket, sys
from dnslib import DNSRecord, QTYPE, RCODE, RR
zone = {("1.0.0.127.in-addr.arpa", "PTR"): "client.bench.test.", ("client.bench.test", "A"): "127.0.0.1",
        ("ktbench.test", "MX"): "10 mx.ktbench.test.", ("ktbench.test", "A"): "192.0.2.25"}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(4096)
    q = DNSRecord.parse(data)
    name, qt = str(q.q.qname).lower().rstrip("."), QTYPE[q.q.qtype]
    r = q.reply()
    if (name, qt) in zone:
        r.add_answer(*RR.fromZone(f"{name}. 300 IN {qt} {zone[(name, qt)]}"))
    elif not any(n == name for n, _ in zone):
        r.header.rcode = RCODE.NXDOMAIN
        r.add_auth(*RR.fromZone("test. 300 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 300"))
    s.sendto(r.pack(), peer)
EOF
DNS_PID=$!

main_cf() {
	cat <<EOF
myhostname = bench.test
mydestination =
inet_interfaces = 127.0.0.1
mynetworks = 127.0.0.0/8
smtpd_banner = \$myhostname ESMTP
virtual_mailbox_domains = bench.test
virtual_mailbox_base = $T/mail
virtual_mailbox_maps = texthash:$T/vmailbox
smtpd_tls_cert_file = $T/cert.pem
smtpd_tls_key_file = $T/key.pem
smtpd_tls_security_level = may
queue_directory = $T/queue
ktrelay_dns_servers = 127.0.0.1:$DNSPORT
EOF
	if [ "$1" = off ]; then
		echo "smtpd_peername_lookup = no"
	else
		cat <<EOF
smtpd_peername_lookup = yes
smtpd_client_event_limit_exceptions =
smtpd_client_connection_count_limit = 50
smtpd_client_connection_rate_limit = 1000000
smtpd_client_message_rate_limit = 1000000
smtpd_client_recipient_rate_limit = 1000000
smtpd_client_new_tls_session_rate_limit = 1000000
smtpd_client_restrictions = reject_rbl_client zen.bench.test, reject_rbl_client bl.bench.test=127.0.0.[2..4],
    reject_rhsbl_reverse_client dbl.bench.test, reject_unknown_client_hostname
smtpd_helo_restrictions = reject_rhsbl_helo dbl.bench.test, reject_unknown_helo_hostname
smtpd_sender_restrictions = reject_rhsbl_sender dbl.bench.test, reject_unknown_sender_domain
EOF
	fi
}

run() {   # run MODE -> msgs/s on stdout
	# the last run's mail, queue and configuration are set aside, not deleted
	# (lib.sh says why); everything goes at exit
	set_aside "$T" mail queue conf
	mkdir -p "$T/mail" "$T/queue" "$T/conf"
	chown ktrelay: "$T/mail"
	sync
	main_cf "$1" >"$T/conf/main.cf"
	echo "127.0.0.1:$PORT inet n - n - - smtpd" >"$T/conf/master.cf"
	"$KTRELAY" run -c "$T/conf" >>"$T/stderr-$1.log" 2>&1 &
	KT_PID=$!
	wait_port "$PORT" || true
	# one message first, so that the measured run finds the answers cached
	"$KTBENCH" --port "$PORT" --mode starttls --tls-version 1.3 --connections 1 --messages 1 --size 4096 \
		--to x@bench.test --csv >/dev/null
	line=$("$KTBENCH" --port "$PORT" --mode starttls --tls-version 1.3 --connections "$C" --messages "$M" \
		--size 4096 --pipelining --to x@bench.test --quickack --csv --label "$1" --server-pids-cmd "echo $KT_PID; pgrep -P $KT_PID || true")
	kill "$KT_PID"
	wait "$KT_PID" || true
	KT_PID=
	ok=$(echo "$line" | cut -d, -f11)
	if [ "$ok" != $((C * M)) ]; then
		echo "run-policy: $1: only $ok of $((C * M)) messages accepted" >&2
		tail -5 "$T/stderr-$1.log" >&2
		exit 1
	fi
	# msg/s and the server's CPU time per message in microseconds
	echo "$line" | awk -F, '{ printf "%s %.0f\n", $16, $23 * 1e6 }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# Other load on the machine only ever slows a run down: the best run of each mode is the least disturbed.
best_max() { sort -n | tail -1; }
best_min() { sort -n | head -1; }

off=() on=() off_cpu=() on_cpu=()
for _ in $(seq "$RUNS"); do
	read -r r c < <(run off)
	off+=("$r") off_cpu+=("$c")
	read -r r c < <(run on)
	on+=("$r") on_cpu+=("$c")
done
# the "on" server really looked things up and logged names
grep -q "connect from client.bench.test\[127.0.0.1\]" "$T/stderr-on.log" || { echo "run-policy: no reverse name in the log" >&2; exit 1; }
m_off=$(printf '%s\n' "${off[@]}" | median)
m_on=$(printf '%s\n' "${on[@]}" | median)
c_off=$(printf '%s\n' "${off_cpu[@]}" | median)
c_on=$(printf '%s\n' "${on_cpu[@]}" | median)
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%d-%H%M%S)
{
	echo "run-policy $STAMP on $(hostname) ($(nproc) cores), tree $(git -C "$REPO" describe --always --dirty 2>/dev/null)"
	echo "load: STARTTLS TLS 1.3, 4 KB, pipelined, $C connections x $M messages, $RUNS runs each, alternating"
	echo "checks off: ${off[*]} msg/s, median $m_off"
	echo "checks on:  ${on[*]} msg/s, median $m_on"
	echo "on/off: $(echo "$m_on $m_off" | awk '{ printf "%.3f", $1 / $2 }')"
	echo "server CPU per message: off ${off_cpu[*]} us, median $c_off; on ${on_cpu[*]} us, median $c_on"
	b_off=$(printf '%s\n' "${off[@]}" | best_max) b_on=$(printf '%s\n' "${on[@]}" | best_max)
	echo "best run: off $b_off msg/s, $(printf '%s\n' "${off_cpu[@]}" | best_min) us/msg;" \
		"on $b_on msg/s, $(printf '%s\n' "${on_cpu[@]}" | best_min) us/msg; on/off $(echo "$b_on $b_off" | awk '{ printf "%.3f", $1 / $2 }')"
} | tee "$OUT/$STAMP-policy.txt"
