#!/bin/bash
# Build a small bootable Linux guest with the QEMU guest agent, from Debian
# packages only (DESIGN §4), for knib's boot tests:
#
#   bash scripts/build-test-guest.sh OUTDIR
#
# OUTDIR then holds:
#   disk.qcow2   the guest's disk: an ext4 root filesystem (no partition
#                table) with busybox, an /sbin/init script, the agent
#                (qemu-ga) and its shared libraries, the kernel's modules
#                for virtio and ext4, and /etc/knib-marker
#   vmlinuz      Debian's kernel (linux-image-<abi>-amd64)
#   initrd.img   an initramfs (busybox + virtio/ext4 modules) that mounts
#                /dev/vda and switches to the disk's /sbin/init
#   cmdline      the kernel command line to boot it with
#   marker       the content of /etc/knib-marker on the disk
#   stamp        written last: the hash of this script
#
# The guest boots by direct kernel boot (libvirt <os><kernel>/<initrd>/
# <cmdline>): everything after the initramfs comes from the disk, so a
# backup of the disk is what boots. Its init loads virtio_console, links
# /dev/virtio-ports/org.qemu.guest_agent.0, starts qemu-ga on it, and
# writes a banner on the VGA console (tty1) and the serial console.
#
# Packages are fetched with `apt-get download` (the package lists must be
# present: `apt-get update`) and unpacked with `dpkg-deb -x`; nothing is
# installed on the host and nothing is mounted. The agent's libraries are
# found with `ldd`; a library that resolves outside the unpacked packages
# is looked up with `dpkg -S` and its package downloaded too.
#
# Cache: when OUTDIR/stamp holds the hash of this script, nothing is done.
# Concurrent builds of one OUTDIR are serialised with flock.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
SELF_HASH=$(sha256sum "$0" | cut -d' ' -f1)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

complete() {
    [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$SELF_HASH" ] &&
        for f in disk.qcow2 vmlinuz initrd.img cmdline marker; do [ -s "$OUT/$f" ] || return 1; done
}

exec 9>"$OUT/.lock"
flock 9
if complete; then
    echo "test guest in $OUT is up to date"
    exit 0
fi

rm -f "$OUT/stamp"
WORK="$OUT/.build"
rm -rf "$WORK"
mkdir -p "$WORK/debs" "$WORK/pkgs"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

log() { echo "build-test-guest: $*" >&2; }

# Download one package (unless already there) and unpack it into pkgs/.
fetch() {
    local pkg=$1
    if [ -e "debs/$pkg.done" ]; then return 0; fi
    log "downloading $pkg"
    (cd debs && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
    local deb
    deb=$(ls debs/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ] && [ -z "${UPDATED:-}" ]; then
        # The package lists may be missing or stale: refresh them once.
        log "refreshing the package lists"
        apt-get update -qq >&2 || true
        UPDATED=1
        (cd debs && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
        deb=$(ls debs/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    fi
    if [ -z "$deb" ]; then
        echo "build-test-guest: apt-get download $pkg failed (is the package list there? apt-get update)" >&2
        exit 1
    fi
    dpkg-deb -x "$deb" pkgs
    touch "debs/$pkg.done"
}

# The kernel: the ABI package linux-image-amd64 depends on.
KPKG=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)
if [ -z "$KPKG" ]; then
    echo "build-test-guest: cannot tell which kernel linux-image-amd64 depends on" >&2
    exit 1
fi
KVER=${KPKG#linux-image-}
for p in "$KPKG" busybox-static qemu-guest-agent libc6 libglib2.0-0 libnuma1 libudev1 liburing2; do
    fetch "$p"
done
BB=$WORK/pkgs/bin/busybox
MODDIR=pkgs/lib/modules/$KVER
[ -x "$BB" ] && [ -f "pkgs/boot/vmlinuz-$KVER" ] && [ -d "$MODDIR" ] && [ -x pkgs/usr/sbin/qemu-ga ]

# The agent's libraries: resolve them in the unpacked packages, fetching the
# package of any library that resolves elsewhere.
LIBPATH=$WORK/pkgs/lib/x86_64-linux-gnu:$WORK/pkgs/usr/lib/x86_64-linux-gnu
for round in 1 2 3 4 5 6; do
    missing=0
    while read -r lib path; do
        case $path in
        "$WORK"/pkgs/*) ;;
        "not found")
            echo "build-test-guest: qemu-ga needs $lib, found nowhere" >&2
            exit 1
            ;;
        *)
            pkg=
            for q in "$path" "/usr$path" "$(readlink -f "$path")"; do
                pkg=$(dpkg -S "$q" 2>/dev/null | head -n1 | cut -d: -f1 || true)
                [ -n "$pkg" ] && break
            done
            if [ -z "$pkg" ]; then
                echo "build-test-guest: no package provides $path (needed by qemu-ga)" >&2
                exit 1
            fi
            fetch "$pkg"
            missing=1
            ;;
        esac
    done < <(LD_LIBRARY_PATH=$LIBPATH ldd pkgs/usr/sbin/qemu-ga | sed -n 's/^\t\([^ ]*\) => \(.*\) (0x[0-9a-f]*)$/\1 \2/p; s/^\t\([^ ]*\) => not found$/\1 not found/p')
    [ $missing = 0 ] && break
    if [ "$round" = 6 ]; then
        echo "build-test-guest: the libraries of qemu-ga do not resolve" >&2
        exit 1
    fi
done

# Modules, in load order (dependencies first), read from each module's
# .modinfo (the package ships no modules.dep).
modfile() {
    local f
    f=$(find "$MODDIR/kernel" -name "$1.ko" -o -name "$1.ko.xz" | head -n1)
    [ -n "$f" ] || { echo "build-test-guest: module $1 is not in $KPKG" >&2; exit 1; }
    echo "$f"
}
ORDER=()
add_module() {
    local m=$1 d f
    for d in "${ORDER[@]:-}"; do [ "$d" = "$m" ] && return 0; done
    f=$(modfile "$m")
    for d in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_module "$d"
    done
    ORDER+=("$m")
}
for m in virtio_pci virtio_blk crc32c_generic ext4 virtio_console; do
    add_module "$m"
done

# Lay out a busybox tree: the binary and one symlink per applet.
busybox_tree() {
    local root=$1 a
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc,lib/modules/"$KVER"}
    cp "$BB" "$root/bin/busybox"
    for a in $("$BB" --list-full); do
        [ -e "$root/$a" ] || ln -s /bin/busybox "$root/$a"
    done
    for m in "${ORDER[@]}"; do
        cp "$(modfile "$m")" "$root/lib/modules/$KVER/"
    done
    printf '%s\n' "${ORDER[@]}" >"$root/lib/modules/$KVER/load-order"
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
}

# The initramfs: load the disk and filesystem modules, mount /dev/vda, and
# switch to the disk's /sbin/init. Without a root filesystem it says so and
# waits (no panic, no reboot).
INITRD=$WORK/initrd
busybox_tree "$INITRD"
cat >"$INITRD/init" <<EOF
#!/bin/sh
KVER=$KVER
EOF
cat >>"$INITRD/init" <<'EOF'
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/$KVER/load-order); do
    insmod /lib/modules/$KVER/$m.ko 2>/dev/null
done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case $arg in root=*) root=${arg#root=} ;; esac
done
mkdir -p /newroot
i=0
while ! mount -t ext4 "$root" /newroot 2>/dev/null; do
    i=$((i + 1))
    if [ $i -ge 10 ]; then
        echo "knib test guest: cannot mount $root: the disk holds no root filesystem" | tee /dev/tty1
        while :; do sleep 3600; done
    fi
    sleep 0.5
done
if [ ! -x /newroot/sbin/init ]; then
    echo "knib test guest: $root has no /sbin/init" | tee /dev/tty1
    while :; do sleep 3600; done
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$INITRD/init"
(cd "$INITRD" && find . | "$BB" cpio -o -H newc 2>/dev/null) | gzip -9 >"$WORK/initrd.img"

# The root filesystem of the disk.
ROOT=$WORK/root
busybox_tree "$ROOT"
mkdir -p "$ROOT/usr/sbin" "$ROOT/var/run" "$ROOT/root"
rm -f "$ROOT/usr/sbin/qemu-ga"
cp pkgs/usr/sbin/qemu-ga "$ROOT/usr/sbin/qemu-ga"
while read -r path; do
    rel=${path#"$WORK"/pkgs}
    mkdir -p "$ROOT$(dirname "$rel")"
    cp -L "$path" "$ROOT$rel"
done < <(LD_LIBRARY_PATH=$LIBPATH ldd pkgs/usr/sbin/qemu-ga | sed -n 's/^\t[^ ]* => \([^ ]*\) (0x[0-9a-f]*)$/\1/p')
# The dynamic loader, where the binary asks for it.
interp=/lib64/ld-linux-x86-64.so.2
mkdir -p "$ROOT/lib64"
cp -L "pkgs$interp" "$ROOT$interp"
MARKER="knib test guest $KVER ${SELF_HASH:0:12}"
echo "$MARKER" >"$ROOT/etc/knib-marker"
echo "knib-test-guest" >"$ROOT/etc/hostname"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"
cat >"$ROOT/sbin/init.knib" <<EOF
#!/bin/sh
KVER=$KVER
EOF
cat >>"$ROOT/sbin/init.knib" <<'EOF'
# PID 1 of the knib test guest.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
hostname -F /etc/hostname
for m in $(cat /lib/modules/$KVER/load-order); do
    insmod /lib/modules/$KVER/$m.ko 2>/dev/null
done
# What udev would do: name the agent's virtio-serial port.
mkdir -p /dev/virtio-ports
i=0
while [ ! -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && [ $i -lt 50 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        name=$(cat "$p/name")
        [ -n "$name" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$name"
    done
    i=$((i + 1))
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] || sleep 0.2
done
banner() {
    echo
    echo "=============================================="
    echo "  knib test guest is up ($(uname -r))"
    echo "  $(cat /etc/knib-marker)"
    echo "  guest agent: $1"
    echo "=============================================="
}
if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
    /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
        -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log &
    state="started"
else
    state="no virtio port org.qemu.guest_agent.0"
fi
banner "$state" >/dev/console
banner "$state" >/dev/tty1
while :; do
    sleep 3600
done
EOF
chmod 755 "$ROOT/sbin/init.knib"
rm -f "$ROOT/sbin/init"
ln -s init.knib "$ROOT/sbin/init"

mke2fs -q -t ext4 -L knib-guest -d "$ROOT" "$WORK/disk.raw" 64M
qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"

cp "pkgs/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
echo "root=/dev/vda console=tty0 console=ttyS0" >"$WORK/cmdline"
echo "$MARKER" >"$WORK/marker"
for f in disk.qcow2 vmlinuz initrd.img cmdline marker; do
    mv -f "$WORK/$f" "$OUT/$f"
done
sync
echo "$SELF_HASH" >"$OUT/stamp"
log "built the test guest in $OUT (kernel $KVER, modules: ${ORDER[*]})"
