# lib.sh: shell shared by the benchmark scripts (run-matrix.sh, run-policy.sh), sourced, never run.
# It defines functions only and sets nothing; each script keeps its own options, servers and output.
# Functions return non-zero on failure and say why on stderr; none of them exits.

# bench_cert DIR: a self-signed P-256 certificate for bench.test in DIR/cert.pem (0644) with its key in
# DIR/key.pem (0600), the one certificate every server of a run presents.
bench_cert() {
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
		-subj /CN=bench.test -keyout "$1/key.pem" -out "$1/cert.pem" >/dev/null 2>&1 || {
		echo "bench: cannot make a certificate in $1" >&2
		return 1
	}
	chmod 644 "$1/cert.pem"
	chmod 600 "$1/key.pem"
}

# wait_port PORT: 0 once 127.0.0.1:PORT accepts a connection, 1 if it still does not after 10 s.
wait_port() {
	for _ in $(seq 100); do
		if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
		sleep 0.1
	done
	return 1
}

# set_aside DIR NAME...: moves each DIR/NAME that exists into a new DIR/spent.XXXXXX instead of deleting
# it, so that the next run starts empty. Deleting would cost the next run: ext4 makes inode allocation
# slow for minutes after mass deletions (the allocator skips recently deleted inodes), so a run after
# deleting 10,000 files would measure the previous run's clean-up. The caller removes DIR at exit. Runs
# may execute in subshells, so the name is made unique rather than counted.
set_aside() {
	local dir=$1 spent n
	shift
	spent=$(mktemp -d "$dir/spent.XXXXXX") || return 1
	for n in "$@"; do
		if [ -e "$dir/$n" ] && ! mv "$dir/$n" "$spent/$n"; then
			echo "bench: cannot set $dir/$n aside" >&2
			return 1
		fi
	done
}
