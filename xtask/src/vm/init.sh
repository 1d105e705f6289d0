#!/bin/busybox sh
# /init of the `cargo xtask vm-test` guest (xtask/src/vm/init.sh): mounts what the agent
# needs, loads the virtio drivers, then runs the host's commands from the control port,
# one line each, answering with the output and `@@rc N`. Nothing else runs: no udevd, so
# the kernel's memory and CPU uevents reach the agent and nobody onlines anything.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
mkdir -p /tmp /run
# Loopback only: the incident scenario's fake API server listens on 127.0.0.1.
ip link set lo up
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mem virtio_console; do
    insmod /lib/modules/$m.ko || echo "vm-init: insmod $m failed"
done
# The ports are announced by the host over virtio-serial's control queue, after the
# driver probed; give them a moment. udev would make these links; there is no udev.
mkdir -p /dev/virtio-ports
for i in $(seq 200); do
    [ "$(ls /sys/class/virtio-ports 2>/dev/null | wc -l)" -ge 2 ] && break
    sleep 0.05
done
for p in /sys/class/virtio-ports/*; do
    ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
done
ctl=/dev/virtio-ports/org.hotplug.control
if [ ! -e "$ctl" ]; then
    echo "vm-init: no control port"
    poweroff -f
fi
exec 3<>"$ctl"
echo "vm-init: ready"
echo "@@ready" >&3
while read -r line <&3; do
    sh -c "$line" </dev/null >/tmp/.vm-out 2>&1 3>&-
    rc=$?
    cat /tmp/.vm-out >&3
    # Output without a final newline would swallow the marker.
    [ -s /tmp/.vm-out ] && [ -n "$(tail -c 1 /tmp/.vm-out)" ] && echo >&3
    echo "@@rc $rc" >&3
done
echo "vm-init: control port closed"
poweroff -f
