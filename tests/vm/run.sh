#!/bin/bash
# Runs one command inside a qemu VM with Debian 12's kernel (which has kTLS), chrooted into this host's root
# (read-only), with the work folder writable at its host path and loopback networking only.
# Usage: run.sh [--workdir DIR] [--share DIR]... [--mem 2G] [--timeout SECONDS] -- COMMAND [ARGS...]
# Exit status: COMMAND's; 124 on timeout; 125 if the VM could not run the command at all.
# Prints the guest console on stdout.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
workdir=$PWD
mem=2G
timeout=600
shares=()

die() { echo "run.sh: ERROR: $*" >&2; exit 125; }
usage() { echo "usage: $0 [--workdir DIR] [--share DIR]... [--mem 2G] [--timeout SECONDS] -- COMMAND [ARGS...]" >&2; exit 125; }

while [ $# -gt 0 ]; do
	case "$1" in
	--workdir) [ $# -ge 2 ] || usage; workdir=$2; shift 2 ;;
	--share) [ $# -ge 2 ] || usage; shares+=("$2"); shift 2 ;;
	--mem) [ $# -ge 2 ] || usage; mem=$2; shift 2 ;;
	--timeout) [ $# -ge 2 ] || usage; timeout=$2; shift 2 ;;
	--) shift; break ;;
	-h | --help) usage ;;
	*) break ;;
	esac
done
[ $# -gt 0 ] || usage
[[ "$timeout" =~ ^[1-9][0-9]*$ ]] || die "--timeout needs a positive number of seconds"
[[ "$mem" =~ ^[1-9][0-9]*[MG]?$ ]] || die "--mem needs a size such as 2G or 512M"

mkdir -p "$workdir" || die "cannot create work folder $workdir"
workdir=$(cd "$workdir" && pwd -P) || die "cannot enter $workdir"
[ "$workdir" != / ] || die "the work folder cannot be / (use --workdir)"
# Paths travel on the kernel command line and in qemu's comma-separated options.
[[ "$workdir" =~ ^[A-Za-z0-9_./+@:=-]+$ ]] || die "work folder path '$workdir' has characters the VM cannot pass"

# Shared folders: read-only at their host path. Only needed for folders the VM's own /tmp or /run would
# hide (a build folder under /tmp); the rest of the host root is visible anyway.
share_list='' share_args=()
for i in "${!shares[@]}"; do
	d=$(cd "${shares[$i]}" 2>/dev/null && pwd -P) || die "cannot enter shared folder ${shares[$i]}"
	[[ "$d" =~ ^[A-Za-z0-9_./+@:=-]+$ ]] || die "shared folder path '$d' has characters the VM cannot pass"
	share_list=$share_list${share_list:+,}$d
	share_args+=(-virtfs "local,path=$d,mount_tag=share$i,security_model=none,readonly=on,multidevs=remap")
done

cache=$("$here/prepare.sh") || die "prepare.sh failed"
[[ "$cache" =~ ^[A-Za-z0-9_./+@:=-]+$ ]] || die "cache path '$cache' has characters the VM cannot pass"
kver=$(sed -n 1p "$cache/stamp")
kernel=$cache/kernel/boot/vmlinuz-$kver

ctl=$(mktemp -d "$workdir/.ktvm.XXXXXX") || die "cannot create a control folder in $workdir"
trap 'rm -rf "$ctl"' EXIT

# The command goes in a script, never on the kernel command line; printf %q quotes each word for bash.
{
	echo '#!/bin/bash'
	printf 'export PATH=%q HOME=/tmp\n' "$PATH"
	while IFS='=' read -r name _; do
		case "$name" in
		KT_* | ASAN_OPTIONS | UBSAN_OPTIONS | LSAN_OPTIONS) printf 'export %s=%q\n' "$name" "${!name}" ;;
		esac
	done < <(env)
	printf 'cd %q 2>/dev/null || cd %q || exit 125\n' "$PWD" "$workdir"
	printf 'exec'
	printf ' %q' "$@"
	echo
} >"$ctl/cmd.sh"

start=$(date +%s)
timeout -k 5 "$timeout" qemu-system-x86_64 \
	-accel "${KT_VM_ACCEL:-tcg}" -cpu max -smp 2 -m "$mem" \
	-nographic -no-reboot -nic none \
	-kernel "$kernel" -initrd "$cache/initramfs.cpio.gz" \
	-append "console=ttyS0 quiet loglevel=3 panic=-1 kt.work=$workdir kt.ctl=$ctl kt.mods=$cache/kernel/lib/modules${share_list:+ kt.share=$share_list}" \
	-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
	-virtfs "local,path=$workdir,mount_tag=work,security_model=none,multidevs=remap" \
	"${share_args[@]}" \
	</dev/null | sed -u 's/\r$//; s/\x1bc//g; s/\x1b\[[0-9;?]*[A-Za-z]//g'
qrc=${PIPESTATUS[0]}
elapsed=$(($(date +%s) - start))

if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
	echo "run.sh: ERROR: VM timed out after ${timeout}s; qemu killed" >&2
	exit 124
fi
[ "$qrc" = 0 ] || die "qemu exited with status $qrc"
[ -s "$ctl/status" ] || die "the VM stopped without running the command (see the console output above)"
rc=$(cat "$ctl/status")
echo "run.sh: command exited with status $rc after ${elapsed}s in the VM" >&2
exit "$rc"
