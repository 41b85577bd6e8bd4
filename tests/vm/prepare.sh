#!/bin/bash
# Prepares the kTLS test VM: host tools, a Debian 12 kernel with its modules (depmod'ed) and a busybox
# initramfs, all under the cache folder (KT_VM_CACHE, default tests/vm/cache). Idempotent: with a complete
# cache it only checks the stamp and exits. Prints the cache path on success.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${KT_VM_CACHE:-$here/cache}
packages=(qemu-system-x86 busybox-static cpio kmod gzip)

die() { echo "prepare.sh: ERROR: $*" >&2; exit 1; }
say() { echo "prepare.sh: $*" >&2; }

missing_packages() {
	local p
	for p in "${packages[@]}"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
	done
}

# The stamp ties the cache to the kernel and to the initramfs inputs, so editing init.sh or this script
# rebuilds the initramfs but never downloads the kernel again.
stamp_of() { cat "$here/init.sh" "$here/prepare.sh" | sha256sum | cut -d' ' -f1; }

if [ -f "$cache/stamp" ] && [ "$(sed -n 2p "$cache/stamp")" = "$(stamp_of)" ] && [ -z "$(missing_packages)" ]; then
	echo "$cache"
	exit 0
fi

# Parallel test runs may all start here with a cold cache; one prepares, the others wait and reuse it.
mkdir -p "$cache" || die "cannot create $cache"
exec 9>"$cache/.lock"
flock 9 || die "cannot lock $cache/.lock"
if [ -f "$cache/stamp" ] && [ "$(sed -n 2p "$cache/stamp")" = "$(stamp_of)" ] && [ -z "$(missing_packages)" ]; then
	echo "$cache"
	exit 0
fi

mapfile -t need < <(missing_packages)
if [ ${#need[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing packages ${need[*]}; run as root or install them with apt-get"
	say "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y --no-install-recommends "${need[@]}" >&2; then
		apt-get update >&2 || die "apt-get update failed"
		apt-get install -y --no-install-recommends "${need[@]}" >&2 || die "cannot install ${need[*]}"
	fi
fi
command -v depmod >/dev/null || PATH=$PATH:/usr/sbin:/sbin
for t in qemu-system-x86_64 cpio depmod modprobe gzip dpkg-deb apt-get; do
	command -v "$t" >/dev/null || die "$t not found after installing ${packages[*]}"
done
[ -x /bin/busybox ] || die "/bin/busybox missing (package busybox-static)"

mkdir -p "$cache/debs" || die "cannot create $cache/debs"
kroot=$cache/kernel
kver=$(sed -n 1p "$cache/stamp" 2>/dev/null || true)
if [ -z "$kver" ] || [ ! -f "$kroot/boot/vmlinuz-$kver" ] || [ ! -f "$kroot/lib/modules/$kver/modules.dep" ]; then
	rm -f "$cache/stamp"
	# apt-get download writes to the current folder; the _apt sandbox warning is expected as root.
	cd "$cache/debs"
	rm -f ./*.deb
	apt-get download linux-image-amd64 >&2 || die "apt-get download linux-image-amd64 failed (try apt-get update)"
	meta=$(ls linux-image-amd64_*.deb)
	dep=$(dpkg-deb -f "$meta" Depends | grep -o 'linux-image-[0-9][^ ,]*-amd64' | head -1)
	[ -n "$dep" ] || die "cannot find the kernel package that $meta depends on"
	apt-get download "$dep" >&2 || die "apt-get download $dep failed"
	kver=${dep#linux-image-}
	say "extracting $dep"
	rm -rf "$kroot"
	dpkg-deb -x "$dep"_*.deb "$kroot" || die "dpkg-deb -x $dep failed"
	rm -f ./*.deb
	cd - >/dev/null
	[ -f "$kroot/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $dep"
	depmod -b "$kroot" "$kver" || die "depmod failed"
fi

say "building initramfs for $kver"
stage=$(mktemp -d "$cache/initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,initrd-modules}
cp /bin/busybox "$stage/bin/busybox"
cp "$here/init.sh" "$stage/init"
chmod 755 "$stage/init"
# The kernel opens /dev/console for init before anything is mounted.
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true
# --show-depends lists insmod lines in load order; built-in modules appear as "builtin" and are skipped.
modprobe -d "$kroot" -S "$kver" --show-depends -a virtio_pci 9pnet_virtio 9p overlay >"$stage/deps" ||
	die "cannot resolve the virtio/9p modules in $kroot"
awk '$1 == "insmod" && !seen[$2]++ { print $2 }' "$stage/deps" | while read -r ko; do
	cp "$ko" "$stage/initrd-modules/" || exit 1
	basename "$ko" >>"$stage/initrd-modules/modules.load"
done || die "cannot copy modules"
rm "$stage/deps"
[ -s "$stage/initrd-modules/modules.load" ] || die "no modules to put in the initramfs"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$cache/initramfs.cpio.gz.tmp" ||
	die "cannot build the initramfs"
mv "$cache/initramfs.cpio.gz.tmp" "$cache/initramfs.cpio.gz"
printf '%s\n%s\n' "$kver" "$(stamp_of)" >"$cache/stamp"
say "ready: kernel $kver in $cache"
echo "$cache"
