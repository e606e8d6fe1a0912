#!/bin/busybox sh
# /init of the ivshmem_comm VM lab initramfs (busybox sh, PID 1).
# Loads the modules listed in /lib/lab-modules/order, mounts the host root read-only over 9p
# (tag hostroot) at /mnt and the per-guest control directory (tag labctl) at /ctl, chroots
# into /mnt and runs /run/ivshmem-lab/cmd.sh (written by the host), then reports the exit
# status on the console and in /ctl/rc and powers off. If the host wrote /ctl/net and
# /ctl/hosts, the NICs are named and addressed and /ctl/hosts is bound over /etc/hosts.
# Console protocol (NONCE comes from ivshmem_lab.nonce= on the kernel command line):
#   IVSHMEM-LAB-BEGIN NONCE        the command starts; what follows is its output
#   IVSHMEM-LAB-EXIT NONCE RC      the command exited with status RC
#   IVSHMEM-LAB-FAIL NONCE REASON  the guest could not set up (the command never ran)
/bin/busybox mkdir -p /bin /proc /sys /dev /mnt /ctl /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

nonce=none
index=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ivshmem_lab.nonce=*) nonce="${arg#ivshmem_lab.nonce=}" ;;
        ivshmem_lab.guest=*) index="${arg#ivshmem_lab.guest=}" ;;
    esac
done

fail() {
    echo "IVSHMEM-LAB-FAIL $nonce $*"
    poweroff -f
    sleep 5
    exit 1
}

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/lab-modules/$mod" 2>/dev/null || echo "ivshmem-lab: insmod $mod failed"
done < /lib/lab-modules/order
if [ -f /lib/lab-modules/extra/uio_ivshmem.ko ]; then
    insmod /lib/lab-modules/extra/uio_ivshmem.ko 2>/dev/null \
        || echo "ivshmem-lab: insmod uio_ivshmem.ko failed"
fi

hostname "vm$index"
ip link set lo up 2>/dev/null

mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 labctl /ctl \
    || fail "cannot mount the control directory (9p tag labctl)"
# Networking, only when the host wrote /ctl/net: one "MAC NAME ADDRESS/PREFIX" line per NIC.
# The NIC with that MAC is renamed NAME and gets ADDRESS; no default route is set.
if [ -f /ctl/net ]; then
    while read -r mac name addr; do
        [ -n "$mac" ] || continue
        dev=""
        for d in /sys/class/net/*; do
            [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && dev="${d##*/}"
        done
        [ -n "$dev" ] || fail "no network interface with MAC $mac"
        ip link set dev "$dev" name "$name" || fail "cannot rename $dev to $name"
        ip addr add "$addr" dev "$name" || fail "cannot give $name the address $addr"
        ip link set dev "$name" up || fail "cannot bring $name up"
    done < /ctl/net
fi
# shellcheck disable=SC2046
mount -t 9p -o $(cat /ctl/rootopts) hostroot /mnt \
    || fail "cannot mount the host root (9p tag hostroot)"
mount -t proc proc /mnt/proc || fail "cannot mount /proc in the host root"
mount -t sysfs sysfs /mnt/sys || fail "cannot mount /sys in the host root"
mount -t devtmpfs devtmpfs /mnt/dev || fail "cannot mount /dev in the host root"
if [ -f /ctl/hosts ]; then
    mount --bind /ctl/hosts /mnt/etc/hosts || fail "cannot bind /etc/hosts"
fi
mkdir -p /mnt/dev/shm /mnt/dev/pts
mount -t tmpfs -o mode=1777 shm /mnt/dev/shm
mount -t devpts devpts /mnt/dev/pts 2>/dev/null
# The guest's /tmp is a private tmpfs, but the command's working directory may live under the
# host's /tmp (a CI checkout, say): keep the host's view of its top folder there, read-only.
mkdir -p /hosttmp
mount --bind /mnt/tmp /hosttmp || fail "cannot bind the host's /tmp"
mount -t tmpfs -o mode=1777 tmp /mnt/tmp || fail "cannot mount /tmp in the host root"
cwd=$(cat /ctl/cwd 2>/dev/null)
case "$cwd" in
    /tmp/?*)
        top="${cwd#/tmp/}"
        top="${top%%/*}"
        if [ -d "/hosttmp/$top" ]; then
            mkdir -p "/mnt/tmp/$top"
            mount --bind "/hosttmp/$top" "/mnt/tmp/$top" \
                || fail "cannot bind the working directory's folder /tmp/$top"
        fi
        ;;
esac
mount -t tmpfs -o mode=755 run /mnt/run || fail "cannot mount /run in the host root"
mkdir -p /mnt/run/ivshmem-lab
mount --bind /ctl /mnt/run/ivshmem-lab || fail "cannot bind the control directory"

echo "IVSHMEM-LAB-BEGIN $nonce"
# Signals for the command (ivshmem_lab.guest Guest.signal): the host writes a signal number
# to /ctl/signal; this watcher sends it to the command (cmd.sh writes its pid to /ctl/pid
# just before it execs the command) and removes the file.
(
    while sleep 0.2; do
        if [ -f /ctl/signal ] && [ -f /ctl/pid ]; then
            kill -"$(cat /ctl/signal)" "$(cat /ctl/pid)"
            rm -f /ctl/signal
        fi
    done
) &
watcher=$!
chroot /mnt /bin/sh /run/ivshmem-lab/cmd.sh < /dev/null
rc=$?
kill "$watcher"
echo "$rc" > /ctl/rc
sync
echo "IVSHMEM-LAB-EXIT $nonce $rc"
poweroff -f
sleep 5
