#!/usr/bin/env bash
# run-matrix.sh: runs the same SMTP load against ktrelay and Postfix, one server
# at a time on the same ports with equivalent configuration (same certificate,
# same TLS protocol range, Maildir delivery under a temp dir), and prints a
# table with both numbers and the ratio ktrelay/Postfix per row, next to the
# machine's own ceilings (AEAD, ECDSA signing, loopback, fsync'd disk writes).
# Every server it starts is stopped on exit, also on failure. Every row starts
# from an empty Maildir and an empty queue; a row that cannot have them fails.
#
# usage: bench/run-matrix.sh [--quick] [--servers ktrelay,postfix] [--out DIR]
#                            [--ktrelay PATH] [--ktbench PATH] [--no-ceiling]
#                            [--rows REGEX] [--repeat N]
# The dkim-* rows send through a listener whose smtpd_milters is one opendkim
# signing every message (a key made by opendkim-genkey here); run them alone
# with --rows '^dkim'.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/bench/lib.sh"
QUICK=0
SERVERS=ktrelay,postfix
OUT=$REPO/bench/results
KTRELAY=
KTBENCH=
CEILING=1
ROWS=.
REPEAT=
PORT=10025
TLSPORT=10465
SINKPORT=10026
# the dkim rows: a listener whose smtpd_milters is one opendkim (signing), the same for both servers
DKIMPORT=10027
DKIM_MILTER_PORT=10891
DKIM_PID=

while [ $# -gt 0 ]; do
	case $1 in
	--quick) QUICK=1 ;;
	--servers) SERVERS=$2; shift ;;
	--out) OUT=$2; shift ;;
	--ktrelay) KTRELAY=$2; shift ;;
	--ktbench) KTBENCH=$2; shift ;;
	--no-ceiling) CEILING=0 ;;
	--rows) ROWS=$2; shift ;;
	--repeat) REPEAT=$2; shift ;;
	-h|--help) sed -n '2,10p' "$0"; exit 0 ;;
	*) echo "run-matrix: unknown option $1" >&2; exit 2 ;;
	esac
	shift
done

if [ "$QUICK" = 1 ]; then
	SMALL_C=8 SMALL_M=40 BIG_C=2 BIG_M=4 HS_C=4 HS_M=25 IDLE_KT=200 IDLE_PF=100 RELAY_C=8 RELAY_M=40
	LIMIT=6 DRAIN_MAX=20 SPEED_S=1 LOOP_MB=256 DISK_FILES=16 REPEAT=${REPEAT:-1}
else
	SMALL_C=20 SMALL_M=500 BIG_C=4 BIG_M=100 HS_C=8 HS_M=250 IDLE_KT=10000 IDLE_PF=1000 RELAY_C=20 RELAY_M=200
	LIMIT=60 DRAIN_MAX=300 SPEED_S=3 LOOP_MB=2048 DISK_FILES=128 REPEAT=${REPEAT:-3}
fi

T=$(mktemp -d /tmp/ktbench-matrix.XXXXXX)
chmod 755 "$T"
KT_PID=
PF_CONF=
SINK_PID=

cleanup() {
	set +e
	if [ -n "$DKIM_PID" ]; then kill "$DKIM_PID" 2>/dev/null; wait "$DKIM_PID" 2>/dev/null; fi
	if [ -n "$KT_PID" ] && kill -0 "$KT_PID" 2>/dev/null; then
		kill "$KT_PID"
		for _ in $(seq 50); do kill -0 "$KT_PID" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$KT_PID" 2>/dev/null
	fi
	if [ -n "$PF_CONF" ]; then
		postfix -c "$PF_CONF" stop >/dev/null 2>&1 || postfix -c "$PF_CONF" abort >/dev/null 2>&1
	fi
	[ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null
	[ -n "${KEEP_TMP:-}" ] || rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Idle sessions need an fd each on both ends.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# ---- tools ----
if [ -z "$KTBENCH" ]; then
	for p in "$REPO/build/bench/ktbench" /tmp/build-*/bench/ktbench; do
		if [ -x "$p" ] && [ "$p" -nt "$REPO/bench/ktbench.c" ]; then KTBENCH=$p; break; fi
	done
fi
if [ -z "$KTBENCH" ]; then
	# ktbench stands alone, so a direct compile is enough when no build is at hand
	cc -O2 -D_GNU_SOURCE -o "$T/ktbench" "$REPO/bench/ktbench.c" -lssl -lcrypto
	KTBENCH=$T/ktbench
fi
if [ -z "$KTRELAY" ]; then
	for p in "$REPO/build/ktrelay" "$REPO/build/src/ktrelay"; do
		if [ -x "$p" ]; then KTRELAY=$p; break; fi
	done
fi

mkdir -p "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
HOST=$(hostname -s 2>/dev/null || hostname)
CSV=$OUT/$STAMP-$HOST.csv
TXT=$OUT/$STAMP-$HOST.txt
PNG=$OUT/$STAMP-$HOST.png
exec > >(tee "$TXT") 2>&1

echo "ktbench matrix $STAMP on $HOST ($(nproc) cores, $(uname -r)), mode: $([ "$QUICK" = 1 ] && echo quick || echo full)"
echo "ktbench: $KTBENCH; tree: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"

# ---- shared certificate ----
bench_cert "$T"

# ktrelay's workers run as mail_owner (default ktrelay) and write virtual
# mailboxes of that uid themselves (the io_uring fast path); both servers
# deliver as that user.
id -u ktrelay >/dev/null 2>&1 ||
	useradd --system --home-dir /var/lib/ktrelay --shell /usr/sbin/nologin ktrelay
MAIL_UID=$(id -u ktrelay)
MAIL_GID=$(id -g ktrelay)
chmod 711 "$T"
MAILDIR=$T/mail
printf 'user@bench.test user/\n' >"$T/vmailbox"

# Parameters both servers read with the same meaning.
common_main_cf() {
	cat <<EOF
myhostname = bench.test
mydomain = bench.test
mydestination =
inet_interfaces = 127.0.0.1
mynetworks = 127.0.0.0/8
smtpd_banner = \$myhostname ESMTP
message_size_limit = 52428800
virtual_mailbox_domains = bench.test
virtual_mailbox_base = $MAILDIR
virtual_mailbox_maps = texthash:$T/vmailbox
virtual_uid_maps = static:$MAIL_UID
virtual_gid_maps = static:$MAIL_GID
smtpd_tls_cert_file = $T/cert.pem
smtpd_tls_key_file = $T/key.pem
smtpd_tls_security_level = may
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_loglevel = 0
relayhost = [127.0.0.1]:$SINKPORT
EOF
}

reset_maildir() {
	# the last row's mail is set aside, not deleted (lib.sh says why); a failed
	# move fails the row instead of piling it on top
	set_aside "$T" mail || return 1
	mkdir "$MAILDIR" && chown "$MAIL_UID:$MAIL_GID" "$MAILDIR" || return 1
	if [ "$(delivered_count)" != 0 ]; then
		echo "run-matrix: the Maildir is not empty at the start of the row" >&2
		return 1
	fi
	sync
}

# Messages waiting in ktrelay's queue (a row starts only when it is 0); tmp/
# holds spare files kept for reuse, not mail.
kt_queue_len() {
	find "$T/kt/queue/new" -type f 2>/dev/null | wc -l
}

delivered_count() {
	find "$MAILDIR" -path '*/new/*' -type f 2>/dev/null | wc -l
}

port_free() {
	for _ in $(seq 100); do
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
		sleep 0.1
	done
	echo "run-matrix: port $1 still busy" >&2
	return 1
}

# utime+stime+cutime+cstime in seconds over a list of pids (children that
# exited and were reaped are in their parent's cutime/cstime).
cpu_seconds() {
	local tck
	tck=$(getconf CLK_TCK)
	for p in "$@"; do cat "/proc/$p/stat" 2>/dev/null || true; done |
		sed 's/.*) //' | awk -v t="$tck" '{ s += $12 + $13 + $14 + $15 } END { printf "%.3f", s / t }'
}

# ---- servers ----
start_ktrelay() {
	local dir=$T/kt
	rm -rf "$dir"
	mkdir -p "$dir/queue"
	{
		common_main_cf
		echo "queue_directory = $dir/queue"
		echo "data_directory = $dir"
		echo "tls_ktls_enable = ${1:-yes}"
	} >"$dir/main.cf"
	cat >"$dir/master.cf" <<EOF
127.0.0.1:$PORT inet n - n - - smtpd
127.0.0.1:$TLSPORT inet n - n - - smtpd
  -o smtpd_tls_wrappermode=yes
127.0.0.1:$DKIMPORT inet n - n - - smtpd
  -o smtpd_milters=inet:127.0.0.1:$DKIM_MILTER_PORT
EOF
	reset_maildir || return 1
	"$KTRELAY" run -c "$dir" >"$T/ktrelay.log" 2>&1 &
	KT_PID=$!
	if ! wait_port "$PORT"; then
		echo "ktrelay did not start listening on $PORT:"
		tail -20 "$T/ktrelay.log"
		return 1
	fi
}

stop_ktrelay() {
	[ -n "$KT_PID" ] || return 0
	kill "$KT_PID" 2>/dev/null || true
	wait "$KT_PID" 2>/dev/null || true
	KT_PID=
}

start_postfix() {
	PF_CONF=$T/pf
	local q=$T/pf-queue
	rm -rf "$PF_CONF" "$q" "$T/pf-data"
	mkdir -p "$PF_CONF" "$q" "$T/pf-data"
	chown postfix "$T/pf-data"
	{
		common_main_cf
		cat <<EOF
compatibility_level = 3.6
queue_directory = $q
data_directory = $T/pf-data
maillog_file = $T/postfix.log
maillog_file_prefixes = $T
alias_maps =
alias_database =
local_recipient_maps =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = $((IDLE_PF + 50))
smtpd_tls_session_cache_database =
virtual_mailbox_limit = 0
virtual_destination_concurrency_limit = 20
EOF
	} >"$PF_CONF/main.cf"
	# Debian's master.cf with our listener in place of port 25 and no chroot,
	# since the queue lives in a temp dir.
	{
		echo "127.0.0.1:$PORT inet n - n - - smtpd"
		echo "127.0.0.1:$TLSPORT inet n - n - - smtpd"
		echo "  -o smtpd_tls_wrappermode=yes"
		echo "127.0.0.1:$DKIMPORT inet n - n - - smtpd"
		echo "  -o smtpd_milters=inet:127.0.0.1:$DKIM_MILTER_PORT"
		# the unix services of the distribution's master.cf (the packaged
		# template when Postfix was installed unconfigured)
		mcf=/etc/postfix/master.cf
		[ -f "$mcf" ] || mcf=/usr/share/postfix/master.cf.dist
		awk '/^[a-z]/ && $2 != "inet" { print }' "$mcf"
	} >"$PF_CONF/master.cf"
	postconf -c "$PF_CONF" -F '*/*/chroot = n' >/dev/null
	reset_maildir || return 1
	# postfix reports start-up errors only to a terminal or syslog; script(1)
	# gives it a terminal so that they show up here
	script -qec "postfix -c $PF_CONF start" /dev/null >"$T/postfix-start.log" 2>&1 || {
		echo "postfix did not start:"
		cat "$T/postfix-start.log"
		return 1
	}
	wait_port "$PORT"
}

stop_postfix() {
	[ -n "$PF_CONF" ] || return 0
	postfix -c "$PF_CONF" stop >/dev/null 2>&1 || true
	PF_CONF=
}

postfix_pids() {
	local m
	m=$(head -1 "$T/pf-queue/pid/master.pid" 2>/dev/null | tr -d ' ') || return 0
	[ -n "$m" ] || return 0
	echo "$m"
	pgrep -P "$m" || true
}

queue_len() {
	find "$T/pf-queue/incoming" "$T/pf-queue/active" "$T/pf-queue/deferred" \
		"$T/pf-queue/maildrop" -type f 2>/dev/null | wc -l
}

# Postfix's smtp-sink as the next hop of the relay row: it accepts every
# message and keeps nothing, so the row measures the relay, not a disk.
start_sink() {
	port_free "$SINKPORT"
	smtp-sink -u nobody -a -m 1000 "127.0.0.1:$SINKPORT" 1024 >"$T/sink.log" 2>&1 &
	SINK_PID=$!
	wait_port "$SINKPORT"
}

# Lines that report a recipient relayed to the sink as sent, in the server's log.
sent_count() {
	local log=$T/ktrelay.log
	[ "$1" = postfix ] && log=$T/postfix.log
	grep -c "relay=127\.0\.0\.1\[127\.0\.0\.1\]:$SINKPORT.*status=sent" "$log" 2>/dev/null || true
}

# ---- rows ----
# name|ktbench options|kind (msg, hs, relay, idle)
rows() {
	local m s sz tl
	for m in plain tls12 tls13; do
		case $m in
		plain) tl="--mode plain" ;;
		tls12) tl="--mode starttls --tls-version 1.2" ;;
		tls13) tl="--mode starttls --tls-version 1.3" ;;
		esac
		for s in 4k 1m; do
			if [ $s = 4k ]; then sz="--size 4096 --connections $SMALL_C --messages $SMALL_M"
			else sz="--size 1048576 --connections $BIG_C --messages $BIG_M"; fi
			echo "$m-$s-data|$tl $sz --pipelining --quickack|msg"
			echo "$m-$s-bdat|$tl $sz --pipelining --bdat --quickack|msg"
		done
	done
	echo "relay-4k|--mode plain --size 4096 --connections $RELAY_C --messages $RELAY_M --pipelining --quickack --to user@relay.test|relay"
	echo "handshake-tls13|--mode starttls --tls-version 1.3 --connections $HS_C --messages $HS_M --handshake-only --quickack|hs"
	echo "newconn-msg-tls13|--mode starttls --tls-version 1.3 --size 4096 --connections $HS_C --messages $HS_M --new-connection-per-message --quickack|msg"
	echo "idle-tls13|--mode starttls --tls-version 1.3 --idle-settle 3|idle"
	# the same 4 KB STARTTLS load through one opendkim signing milter (start_opendkim)
	echo "dkim-tls13-4k-data|--port $DKIMPORT --mode starttls --tls-version 1.3 --size 4096 --connections $SMALL_C --messages $SMALL_M --pipelining --quickack|msg"
}

# opendkim signing the load's mail (sender domain ktbench.test), for the dkim rows.
start_opendkim() {
	command -v opendkim >/dev/null || { echo "run-matrix: opendkim is not installed; dkim rows skipped"; return 1; }
	mkdir -p "$T/dkim"
	opendkim-genkey -D "$T/dkim" -d ktbench.test -s bench
	printf 'bench._domainkey.ktbench.test ktbench.test:bench:%s\n' "$T/dkim/bench.private" >"$T/dkim/keytable"
	printf '*@ktbench.test bench._domainkey.ktbench.test\n' >"$T/dkim/signingtable"
	cat >"$T/dkim/opendkim.conf" <<EOF
Mode s
Socket inet:$DKIM_MILTER_PORT@127.0.0.1
Background no
Syslog no
RequireSafeKeys no
KeyTable $T/dkim/keytable
SigningTable refile:$T/dkim/signingtable
Canonicalization relaxed/simple
EOF
	port_free "$DKIM_MILTER_PORT"
	opendkim -f -x "$T/dkim/opendkim.conf" >"$T/opendkim.log" 2>&1 &
	DKIM_PID=$!
	wait_port "$DKIM_MILTER_PORT"
}

KTLS=0
if grep -qw tls /proc/sys/net/ipv4/tcp_available_ulp 2>/dev/null; then KTLS=1; fi

echo "server,row,drain_s,e2e_msgs_s,server_cpu_total_s,server_cpu_us_per_msg,delivered,$("$KTBENCH" --csv-header),runs,min,max" >"$CSV"

# run_rows SERVER PIDS_FUNC ROW_SUFFIX ROW_FILTER
# One run of one row; prints the CSV record (without the repeat columns).
run_once() {
	local server=$1 pidf=$2 name=$3 opts=$4 kind=$5
	local line drain=0 pids cpu0 cpu1 ok e2e cpu_us delivered rc=0 d0 n=0 sent0=0
	reset_maildir || { echo "  $name: failed (Maildir)" >&2; return 1; }
	# the last row's queue files go once their delivery is recorded
	while [ $n -lt 100 ]; do
		if [ "$server" = postfix ]; then [ "$(queue_len)" = 0 ] && break
		else [ "$(kt_queue_len)" = 0 ] && break; fi
		sleep 0.1
		n=$((n + 1))
	done
	n=0
	if [ "$server" = postfix ] && [ "$(queue_len)" != 0 ]; then
		echo "  $name: failed (Postfix's queue is not empty at the start)" >&2
		return 1
	fi
	if [ "$server" = ktrelay ] && [ "$(kt_queue_len)" != 0 ]; then
		echo "  $name: failed (ktrelay's queue is not empty at the start)" >&2
		return 1
	fi
	[ "$kind" = relay ] && sent0=$(sent_count "$server")
	pids=$($pidf | tr '\n' ' ')
	# shellcheck disable=SC2086
	cpu0=$(cpu_seconds $pids)
	# shellcheck disable=SC2086
	line=$("$KTBENCH" --port "$PORT" --to user@bench.test --duration-limit "$LIMIT" \
		--server-pids-cmd "$pidf_cmd" --csv --label "$server" $opts) || rc=$?
	if [ -z "$line" ]; then
		echo "  $name: ktbench failed (exit $rc)" >&2
		return 1
	fi
	ok=$(echo "$line" | cut -d, -f11)
	if [ "$kind" = relay ]; then
		# end to end: from the first injection to the last status=sent
		d0=$(date +%s.%N)
		while [ $(($(sent_count "$server") - sent0)) -lt "$ok" ] && [ $n -lt $((DRAIN_MAX * 50)) ]; do
			sleep 0.02
			n=$((n + 1))
		done
		drain=$(echo "$(date +%s.%N) $d0" | awk '{ printf "%.3f", $1 - $2 }')
	elif [ "$server" = postfix ] && [ "$kind" != idle ] && [ "$kind" != hs ]; then
		d0=$(date +%s.%N)
		while [ "$(queue_len)" -gt 0 ] && [ $n -lt $((DRAIN_MAX * 10)) ]; do
			sleep 0.1
			n=$((n + 1))
		done
		drain=$(echo "$(date +%s.%N) $d0" | awk '{ printf "%.3f", $1 - $2 }')
	fi
	pids=$($pidf | tr '\n' ' ')
	# shellcheck disable=SC2086
	cpu1=$(cpu_seconds $pids)
	delivered=$(delivered_count)
	[ "$kind" = relay ] && delivered=$(($(sent_count "$server") - sent0))
	# the load's own elapsed time plus the queue drain, without ktbench's start-up
	e2e=$(echo "$line" | awk -F, -v dr="$drain" '{ d = $15 + dr; printf "%.1f", (d > 0 ? $11 / d : 0) }')
	cpu_us=$(echo "$cpu0 $cpu1 $ok" | awk '{ printf "%.1f", ($3 > 0 ? ($2 - $1) / $3 * 1e6 : 0) }')
	echo "$line" | awk -F, -v n="$name" -v d="$delivered" -v dr="$drain" -v rc="$rc" '{
		if ($27 > 0 || n ~ /^idle/)
			printf "  %-18s idle %s sessions, %.1f kB/session, errors %s\n", n, $27, $28, $13
		else
			printf "  %-18s %9.1f msg/s %8.2f MB/s p99 %8.2f ms  ok %s fail %s err %s delivered %s drain %ss%s\n",
			       n, $16, $17, $20, $11, $12, $13, d, dr, (rc ? "  (exit " rc ")" : "")
	}' >&2
	echo "$server,$name,$drain,$e2e,$(echo "$cpu0 $cpu1" | awk '{ printf "%.3f", $2 - $1 }'),$cpu_us,$delivered,$line"
}

# Runs each row REPEAT times and keeps the median run (by msg/s, or by kB
# per session for the idle row), with the spread in the last columns.
run_rows() {
	local server=$1 pidf=$2 suffix=$3 filter=$4
	local name opts kind idle r rec recs key n
	while IFS='|' read -r name opts kind; do
		[[ $name =~ $filter ]] || continue
		[[ $name =~ $ROWS ]] || continue
		[[ $name == dkim-* && $DKIM_OK != 1 ]] && continue   # no milter: the dkim rows cannot run
		name=$name$suffix
		if [ "$kind" = idle ]; then
			idle=$IDLE_KT
			[ "$server" = postfix ] && idle=$IDLE_PF
			opts="$opts --idle $idle"
		fi
		recs=
		# the idle row runs once: a server keeps memory (allocator arenas,
		# Postfix's idle smtpd processes) after a first run, so repeats
		# would measure a delta against an already grown baseline
		n=$REPEAT
		[ "$kind" = idle ] && n=1
		for r in $(seq "$n"); do
			rec=$(run_once "$server" "$pidf" "$name" "$opts" "$kind") || continue
			recs+=$rec$'\n'
		done
		[ -n "$recs" ] || continue
		key=23
		[ "$kind" = idle ] && key=35
		printf '%s' "$recs" | sort -t, -k"$key","$key"g | awk -F, -v k="$key" '
			{ l[NR] = $0; v[NR] = $k }
			END { printf "%s,%d,%s,%s\n", l[int((NR + 1) / 2)], NR, v[1], v[NR] }' >>"$CSV"
	done < <(rows)
}

# the master and its children (the worker process, the local delivery agent)
ktrelay_pids() { [ -n "$KT_PID" ] && { echo "$KT_PID"; pgrep -P "$KT_PID" || true; }; }

IFS=, read -r -a SERVER_LIST <<<"$SERVERS"
DKIM_OK=0
if [[ dkim-tls13-4k-data =~ $ROWS ]] && start_opendkim; then DKIM_OK=1; fi
if ! start_sink; then
	echo "run-matrix: smtp-sink did not start on $SINKPORT:"
	cat "$T/sink.log"
	exit 1
fi
for server in "${SERVER_LIST[@]}"; do
	port_free "$PORT"
	case $server in
	ktrelay)
		if [ -z "$KTRELAY" ] || ! "$KTRELAY" version >/dev/null 2>&1; then
			echo "== ktrelay: skipped (no working binary; build it or pass --ktrelay PATH)"
			continue
		fi
		echo "== ktrelay ($("$KTRELAY" version 2>&1 | head -1), $KTRELAY built $(date -r "$KTRELAY" '+%F %T'))"
		if ! start_ktrelay yes; then stop_ktrelay; continue; fi
		pidf_cmd="echo $KT_PID; pgrep -P $KT_PID"
		run_rows ktrelay ktrelay_pids "" "."
		stop_ktrelay
		if [ "$KTLS" = 1 ]; then
			port_free "$PORT"
			echo "== ktrelay, kTLS off"
			start_ktrelay no
			pidf_cmd="echo $KT_PID; pgrep -P $KT_PID"
			run_rows ktrelay ktrelay_pids "-ktls-off" "^tls"
			stop_ktrelay
		fi
		;;
	postfix)
		echo "== postfix ($(postconf -h mail_version))"
		if ! start_postfix; then stop_postfix; continue; fi
		pidf_cmd="m=\$(head -1 $T/pf-queue/pid/master.pid); echo \$m; pgrep -P \$m"
		run_rows postfix postfix_pids "" "."
		stop_postfix
		;;
	*) echo "run-matrix: unknown server $server" >&2 ;;
	esac
done
if [ "$KTLS" = 0 ]; then
	echo "kTLS: /proc/sys/net/ipv4/tcp_available_ulp does not list tls on this machine ($(tr '\n' ' ' </proc/sys/net/ipv4/tcp_available_ulp)); kTLS on/off rows skipped"
fi

# ---- machine ceiling ----
ceiling() {
	local aead evp
	echo "== machine ceiling"
	openssl speed -seconds "$SPEED_S" -evp aes-128-gcm 2>/dev/null |
		awk '/^(AES-128-GCM|aes-128-gcm)/ { printf "  aes-128-gcm       %8.0f MB/s (16 KB blocks, one core)\n", $NF / 1000 }'
	aead=$(awk -F, 'NR > 1 && $10 ~ /TLSv1.3/ { print $17; exit }' "$CSV")
	case $aead in
	TLS_AES_256_GCM_SHA384) evp=aes-256-gcm ;;
	TLS_AES_128_GCM_SHA256) evp=aes-128-gcm ;;
	TLS_CHACHA20_POLY1305_SHA256) evp=chacha20-poly1305 ;;
	*) evp= ;;
	esac
	if [ -n "$evp" ] && [ "$evp" != aes-128-gcm ]; then
		openssl speed -seconds "$SPEED_S" -evp "$evp" 2>/dev/null |
			awk -v e="$evp" -v a="$aead" 'tolower($1) == e { printf "  %-17s %8.0f MB/s (negotiated AEAD %s)\n", e, $NF / 1000, a }'
	elif [ -n "$aead" ]; then
		echo "  negotiated AEAD   $aead"
	fi
	local sign x25519
	sign=$(openssl speed -seconds "$SPEED_S" ecdsap256 2>/dev/null | awk '/ecdsa \(nistp256\)/ { print $(NF-1), $NF }')
	echo "$sign" | awk '{ printf "  ecdsa p-256       %8.0f signs/s, %.0f verifies/s (one core)\n", $1, $2 }'
	x25519=$(openssl speed -seconds "$SPEED_S" ecdhx25519 2>/dev/null | awk '/X25519/ { print $NF }')
	printf '  x25519            %8.0f ops/s (one core)\n' "${x25519:-0}"
	# a full TLS 1.3 handshake costs the server one ECDSA signature and two
	# X25519 operations (key generation and the shared secret)
	HS_LIMIT=$(echo "${sign%% *} ${x25519:-0}" | awk '{ if ($1 > 0 && $2 > 0) printf "%.0f", 1 / (1 / $1 + 2 / $2); else print 0 }')
	echo "  TLS 1.3 handshake limit $HS_LIMIT/s per core (1 ECDSA P-256 sign + 2 X25519, openssl speed)"
	echo "hs_limit_per_core,$HS_LIMIT" >"$T/ceiling.csv"
	python3 - "$LOOP_MB" <<'EOF'
import socket, sys, threading, time
total = int(sys.argv[1]) << 20
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def sink():
    c, _ = srv.accept(); n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
t = threading.Thread(target=sink); t.start()
cl = socket.create_connection(srv.getsockname()); buf = b"x" * (1 << 20)
t0 = time.monotonic()
for _ in range(total >> 20): cl.sendall(buf)
cl.close(); t.join(); dt = time.monotonic() - t0
print("  loopback TCP      %8.0f MB/s (one stream, %d MB)" % (total / dt / 1e6, total >> 20))
EOF
	python3 - "$OUT" "$DISK_FILES" <<'EOF'
import os, sys, tempfile, time
d = tempfile.mkdtemp(dir=sys.argv[1], prefix=".fsync-"); n = int(sys.argv[2])
try:
    for size, label in ((1 << 20, "1 MB"), (4096, "4 KB")):
        buf = os.urandom(size); t0 = time.monotonic()
        for i in range(n if size > 4096 else n * 4):
            p = os.path.join(d, "f%d" % i)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, buf); os.fsync(fd); os.close(fd)
        dt = time.monotonic() - t0; k = n if size > 4096 else n * 4
        print("  fsync'd writes    %8.1f MB/s, %.0f files/s (%s files + fsync, results fs)" % (k * size / dt / 1e6, k / dt, label))
finally:
    for f in os.listdir(d): os.unlink(os.path.join(d, f))
    os.rmdir(d)
EOF
}
[ "$CEILING" = 1 ] && ceiling

# ---- table ----
echo "== results (msg/s accepted; e2e = accepted and delivered into Maildir, incl. queue drain; relay rows: until the last status=sent at the sink)"
awk -F, '
NR == 1 { next }
{
	key = $2; if (!(key in seen)) { seen[key] = 1; order[++n] = key }
	acc[$1, key] = $23; e2e[$1, key] = $4; p99[$1, key] = $27; cpu[$1, key] = $6
	idle[$1, key] = $34; kbi[$1, key] = $35; err[$1, key] = $20 + $19
}
function ratio(a, b) { return (a != "" && b != "" && b > 0) ? sprintf("%.2f", a / b) : "-" }
function v(x) { return x == "" ? "-" : x }
END {
	printf "%-20s %10s %10s %6s | %10s %10s %6s | %9s %9s | %8s %8s | %s\n", "row", "kt msg/s", "pf msg/s",
	       "ratio", "kt e2e", "pf e2e", "ratio", "kt p99ms", "pf p99ms", "kt us/m", "pf us/m", "errors kt/pf"
	for (i = 1; i <= n; i++) {
		k = order[i]
		if (k ~ /^idle/) {
			printf "%-20s %s kB/session (%s sessions) vs %s kB/session (%s sessions), ratio %s\n", k,
			       v(kbi["ktrelay", k]), v(idle["ktrelay", k]), v(kbi["postfix", k]), v(idle["postfix", k]),
			       ratio(kbi["ktrelay", k], kbi["postfix", k])
			continue
		}
		printf "%-20s %10s %10s %6s | %10s %10s %6s | %9s %9s | %8s %8s | %s/%s\n", k,
		       v(acc["ktrelay", k]), v(acc["postfix", k]), ratio(acc["ktrelay", k], acc["postfix", k]),
		       v(e2e["ktrelay", k]), v(e2e["postfix", k]), ratio(e2e["ktrelay", k], e2e["postfix", k]),
		       v(p99["ktrelay", k]), v(p99["postfix", k]), v(cpu["ktrelay", k]), v(cpu["postfix", k]),
		       v(err["ktrelay", k]), v(err["postfix", k])
	}
}' "$CSV"
HS_LIMIT=${HS_LIMIT:-0}
# handshakes per second of server CPU (one core fully busy = 1 s per s) against the limit
awk -F, -v lim="$HS_LIMIT" 'NR > 1 && $2 ~ /^handshake/ && $5 > 0 {
	per = $18 / $5
	printf "%-20s %s: %.0f handshakes/s, %.0f per server CPU second%s\n", $2, $1, $23, per,
	       (lim > 0 ? sprintf(" = %.0f %% of the %d/s per-core limit", 100 * per / lim, lim) : "")
}' "$CSV"

# ---- chart ----
if command -v gnuplot >/dev/null && [ "$(awk -F, 'NR > 1 && $2 !~ /^idle/' "$CSV" | wc -l)" -gt 0 ]; then
	awk -F, 'NR > 1 && $2 !~ /^idle/ { if (!($2 in s)) { s[$2] = 1; o[++n] = $2 } v[$1, $2] = $2 ~ /^relay/ ? $4 : $23 }
		END { print "row ktrelay postfix"; for (i = 1; i <= n; i++)
			printf "%s %s %s\n", o[i], v["ktrelay", o[i]] == "" ? 0 : v["ktrelay", o[i]],
			       v["postfix", o[i]] == "" ? 0 : v["postfix", o[i]] }' "$CSV" >"$T/chart.dat"
	gnuplot <<EOF
set terminal pngcairo size 1400,600 noenhanced
set output "$PNG"
set title "ktrelay vs Postfix: accepted messages/s per row, relay rows end to end, handshake row handshakes/s ($STAMP, $HOST)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set yrange [1:*]
set ylabel "messages/s (log)"
set xtics rotate by -35
set key top right
set grid ytics
plot "$T/chart.dat" using 2:xtic(1) title columnheader(2), '' using 3 title columnheader(3)
EOF
	echo "chart: $PNG"
fi
echo "csv:   $CSV"
echo "log:   $TXT"
