#!/usr/bin/env bash
# Installs what knib needs on Debian 12 (run as root) and starts the libvirt
# daemons. Safe to run again.
set -euo pipefail

packages=(qemu-utils qemu-system-x86 libvirt-daemon-system libvirt-clients libvirt0
          pkg-config gcc valgrind openjdk-17-jdk-headless junit5 libgoogle-gson-java
          e2fsprogs mount dosfstools mtools ntfs-3g fdisk time virtnbdbackup libnbd0 bindfs)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-system-x86 7.2 needs the qemu-utils of the same release: a newer
# qemu-utils from backports is replaced by bookworm's.
if ! qemu-img --version 2>/dev/null | grep -q "version 7\."; then
    missing+=(qemu-utils)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --allow-downgrades \
        qemu-utils/bookworm qemu-system-x86 libvirt-daemon-system libvirt-clients libvirt0 \
        pkg-config gcc valgrind openjdk-17-jdk-headless junit5 libgoogle-gson-java \
        e2fsprogs mount dosfstools mtools ntfs-3g fdisk time virtnbdbackup libnbd0 bindfs >/dev/null
fi

# The file-restore fallback's libguestfs (its XFS support, and a kernel for
# its appliance), without the mail server and the rest it recommends.
guestfs=(libguestfs-tools libguestfs-xfs linux-image-amd64)
missing=()
for p in "${guestfs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Not fatal: without it only the fallback's test is skipped (it says
    # so), the rest of knib needs none of it.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || echo "setup: WARNING: ${missing[*]} could not be installed; the guestfish fallback's test will be skipped"
fi

# No systemd here: start the daemons by hand unless they already run.
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
done
virsh -c qemu:///system version >/dev/null
echo "setup: $(qemu-img --version | head -1); libvirt $(virsh -c qemu:///system version | awk '/Running hypervisor/{print $4}' ) ready"
