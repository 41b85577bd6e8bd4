#!/bin/busybox sh
# PID 1 of the test VM (copied into the initramfs by prepare.sh).
# Mounts the host root read-only (9p under an overlay that only adds mount points), the writable work folder
# at its host path and the kernel's modules; loads kTLS, runs the command script written by run.sh inside a chroot of the host root, stores its exit
# status in the control folder and reboots (qemu runs with -no-reboot, so that ends the VM). Any failure
# before the command runs reboots without a status file, which run.sh reports as a harness failure.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

fail() {
	echo "ktvm-init: FATAL: $*"
	reboot -f
	sleep 60
}

work='' ctl='' mods='' shares=''
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	kt.work=*) work=${arg#kt.work=} ;;
	kt.ctl=*) ctl=${arg#kt.ctl=} ;;
	kt.mods=*) mods=${arg#kt.mods=} ;;
	kt.share=*) shares=${arg#kt.share=} ;;
	esac
done
[ -n "$work" ] && [ -n "$ctl" ] && [ -n "$mods" ] || fail "kernel command line lacks kt.work/kt.ctl/kt.mods"

# Modules needed to reach the host over virtio-9p and overlay it, in dependency order (modules.load is made by prepare.sh).
while read -r ko; do
	insmod "/initrd-modules/$ko" || fail "insmod $ko"
done </initrd-modules/modules.load

opts=trans=virtio,version=9p2000.L,msize=262144
r=/newroot
mkdir -p /hostroot /overlay $r
mount -t 9p -o "$opts,ro" hostroot /hostroot || fail "cannot mount host root over 9p"
# A tmpfs overlay lets mount points be created where the host has none (its /lib/modules may not exist);
# the root is remounted read-only once they exist.
mount -t tmpfs -o mode=755 tmpfs /overlay && mkdir /overlay/upper /overlay/work &&
	mount -t overlay -o lowerdir=/hostroot,upperdir=/overlay/upper,workdir=/overlay/work overlay $r ||
	fail "cannot mount an overlay over the host root"
# The kernel's module helper runs in this rootfs, not in the chroot, so it needs the modules here as well.
mkdir -p /lib/modules $r/lib/modules
mount --bind "$r$mods" /lib/modules || fail "cannot bind modules from $mods"
echo /bin/modprobe >/proc/sys/kernel/modprobe
mount --bind /lib/modules $r/lib/modules || fail "cannot bind modules over the chroot's /lib/modules"
mkdir -p "$r$work" || fail "cannot create mount point $work"
mount -o remount,ro $r || fail "cannot make the root read-only"

mount -t proc proc $r/proc &&
	mount -t sysfs sysfs $r/sys &&
	mount -t devtmpfs devtmpfs $r/dev &&
	mkdir -p $r/dev/pts $r/dev/shm &&
	mount -t devpts -o mode=620,ptmxmode=666 devpts $r/dev/pts &&
	mount -t tmpfs -o mode=1777 tmpfs $r/dev/shm &&
	mount -t tmpfs -o mode=1777 tmpfs $r/tmp &&
	mount -t tmpfs -o mode=755 tmpfs $r/run || fail "cannot mount the chroot's pseudo file systems"
# After the tmpfs mounts, so folders under /tmp or /run stay visible. Shared folders first, so a work folder
# inside one is mounted over it; a shared folder the host root already shows needs no mount.
i=0
for d in $(echo "$shares" | tr , ' '); do
	if [ ! -d "$r$d" ]; then
		mkdir -p "$r$d" || fail "cannot create mount point $d"
		mount -t 9p -o "$opts,ro" "share$i" "$r$d" || fail "cannot mount shared folder $d"
	fi
	i=$((i + 1))
done
mkdir -p "$r$work" 2>/dev/null
mount -t 9p -o "$opts,cache=none" work "$r$work" || fail "cannot mount work folder at $work"

ip link set lo up || fail "cannot bring up loopback"
modprobe tls || fail "cannot load the tls module"
for m in gcm ccm chacha20poly1305 aesni_intel ghash_clmulni_intel chacha_x86_64 poly1305_x86_64; do
	modprobe "$m" 2>/dev/null
done

[ -f "$r$ctl/cmd.sh" ] || fail "missing $ctl/cmd.sh"
chroot $r /bin/bash "$ctl/cmd.sh"
echo $? >"$r$ctl/status"
sync
reboot -f
sleep 60
