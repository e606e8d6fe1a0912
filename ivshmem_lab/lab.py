"""VM lab: boot throw-away QEMU guests that run a command in the host's own file system.

Each guest boots the host's Debian kernel (``/boot/vmlinuz-<ver>``, started through its
uncompressed ELF when it has a PVH entry: :mod:`ivshmem_lab.kernel_image`) with a tiny
initramfs built here on the fly (:mod:`ivshmem_lab.initramfs`: busybox-static, the kernel's
virtio-pci / 9p / uio modules and the project's ``uio_ivshmem`` driver). Its ``/init`` mounts
the host root read-only over 9p, chroots into it and runs the command in the caller's
working directory with the caller's environment plus ``IVSHMEM_LAB_GUEST=<index>`` and
``IVSHMEM_LAB_VMS=<count>``, then powers off. No disk image, and no network unless a guest
is given a :class:`~ivshmem_lab.net.GuestNetwork` (``network=``): then it has ``host0``
(slirp, the host's loopback as 10.0.2.2) and ``lan0`` (a LAN between the lab's guests
only), its ``/etc/hosts`` names the guests ``vm0``.. and the host ``lab-host`` (see
:mod:`ivshmem_lab.net`). Inside the guest ``/tmp``, ``/run``, ``/dev/shm`` are fresh
tmpfs; of the host's ``/tmp`` only the top folder of the working directory is visible.

Guests get ivshmem devices (:mod:`ivshmem_lab.devices`): ``ShmDevice`` (``ivshmem-plain``
over a ``/dev/shm`` file) or ``DoorbellDevice`` (``ivshmem-doorbell`` connected to a
broker's UNIX socket).

Typical use::

    lab = Lab()                                   # accel="auto": KVM if it works, else TCG
    results = lab.run(["python3", "-c", "print(1)"], vms=2, devices=[ShmDevice("r0", 1 << 20)])
    with lab.guest(0, "sleep 100") as g:          # started; killed and cleaned up at exit
        g.wait_for_line("ready", timeout=60)
        g.kill()                                  # hard power-off

Nothing is left behind: every QEMU runs in its own process group and is killed (SIGKILL) on
timeout, on ``Guest.close()`` and at interpreter exit; per-guest temporary directories are
removed (:mod:`ivshmem_lab.guest`). Built artefacts are cached in
``$XDG_CACHE_HOME/ivshmem_comm/lab`` (default ``~/.cache/ivshmem_comm/lab``; override with
``IVSHMEM_LAB_CACHE``; see :mod:`ivshmem_lab.host`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypedDict, Unpack

from guest_lib.launch import GRACE_S
from ivshmem_lab.devices import DeviceSpec
from ivshmem_lab.errors import LabUnavailable
from ivshmem_lab.guest import Command, Guest, GuestOptions, GuestResult
from ivshmem_lab.host import (
    KvmProbe,
    cache_dir,
    find_kernel,
    find_qemu,
    kvm_probe_key,
    load_kvm_probe,
    save_kvm_probe,
)
from ivshmem_lab.initramfs import Initramfs, build_initramfs
from ivshmem_lab.kernel_image import boot_image

__all__ = ["Accel", "Lab", "RunOptions"]

Accel = Literal["auto", "kvm", "tcg"]


class RunOptions(TypedDict, total=False):
    """The options of :meth:`Lab.run_many` (and :meth:`Lab.run`) beyond the commands."""

    devices: Sequence[DeviceSpec]
    guest_devices: Sequence[Sequence[DeviceSpec]] | None
    timeout: float | None
    cwd: str | os.PathLike[str] | None
    env: Mapping[str, str] | None
    inherit_env: bool
    on_output: Callable[[int, str], None] | None


class Lab:
    """Boots guests. Cheap to create; builds the initramfs and probes KVM lazily.

    ``accel``: "auto" (KVM if a probe boot under KVM succeeds within ``kvm_probe_timeout``
    seconds, verdict cached per host kernel / QEMU / guest kernel; else TCG), "kvm" or "tcg".
    ``$IVSHMEM_LAB_ACCEL`` overrides "auto". ``memory``: guest RAM (QEMU syntax, "512M").
    ``root_cache``: 9p cache mode of the host root ("loose" is fast; "none" sees host changes
    at once). Raises :class:`LabUnavailable` at once if QEMU or the kernel is missing.
    """

    def __init__(
        self,
        accel: Accel = "auto",
        memory: str = "512M",
        *,
        kernel: str | None = None,
        machine: str = "q35",
        smp: int = 1,
        root_cache: str = "loose",
        kvm_probe_timeout: float = 20.0,
        with_uio: bool = True,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
        qemu = find_qemu()
        if qemu is None:
            raise LabUnavailable("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
        self.qemu = qemu
        self.kernel = find_kernel(kernel)
        self.accel = accel
        self.memory = memory
        self.machine = machine
        self.smp = smp
        self.root_cache = root_cache
        self.kvm_probe_timeout = kvm_probe_timeout
        self.with_uio = with_uio
        self.cache = Path(cache) if cache else cache_dir()
        self._initramfs: Initramfs | None = None
        self._boot_image: Path | None = None
        self._accel_resolved: str | None = None
        self._probe: KvmProbe | None = None
        self._lock = threading.RLock()
        self._guests: weakref.WeakSet[Guest] = weakref.WeakSet()  # made by guest()
        self._kill_timer: threading.Timer | None = None  # armed by signal_guests()

    @property
    def kvm_probe(self) -> KvmProbe | None:
        """The KVM verdict this lab has made or read (None before :meth:`probe_kvm`)."""
        return self._probe

    @property
    def root_mount_options(self) -> str:
        """Mount options of the host root in the guest."""
        opts = "trans=virtio,version=9p2000.L,ro,msize=262144"
        return opts + (f",cache={self.root_cache}" if self.root_cache != "none" else "")

    def initramfs(self, rebuild: bool = False) -> Initramfs:
        """The guest initramfs (built on first use; see :func:`build_initramfs`)."""
        with self._lock:
            if self._initramfs is None or rebuild:
                self._initramfs = build_initramfs(
                    self.kernel, with_uio=self.with_uio, rebuild=rebuild, cache=self.cache
                )
            return self._initramfs

    def boot_image(self) -> Path:
        """What QEMU's ``-kernel`` gets: the kernel's uncompressed PVH-bootable ELF when it has
        one (extracted into the cache on first use; see :mod:`ivshmem_lab.kernel_image`),
        else the kernel image itself."""
        with self._lock:
            if self._boot_image is None:
                self._boot_image = boot_image(self.kernel, self.cache)
            return self._boot_image

    def probe_kvm(self, force: bool = False) -> KvmProbe:
        """Boot a guest under KVM running ``true``; ok if it exits 0 within the timeout.

        The verdict is cached on disk (unless ``force``). Never raises for a KVM failure.
        """
        if self._probe is not None and not force:
            return self._probe
        key = kvm_probe_key(self.qemu, self.kernel)
        cached = None if force else load_kvm_probe(self.cache, key)
        if cached is not None:
            self._probe = cached
            return cached
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            probe = KvmProbe(False, "/dev/kvm missing or not accessible", 0.0)
        else:
            g = Guest(self, 0, "true", accel="kvm", cwd="/", inherit_env=False)
            t0 = time.monotonic()
            try:
                g.start()
                res = g.wait(self.kvm_probe_timeout)
            finally:
                g.close()
            secs = time.monotonic() - t0
            if res.returncode == 0:
                probe = KvmProbe(True, f"KVM guest booted in {res.boot_seconds:.1f} s", secs)
            elif res.timed_out:
                probe = KvmProbe(
                    False, f"KVM guest did not finish within {self.kvm_probe_timeout} s", secs
                )
            else:
                why = (res.error or "").strip().splitlines()
                probe = KvmProbe(False, f"KVM guest failed: {why[-1] if why else '?'}", secs)
        self._probe = probe
        save_kvm_probe(self.cache, key, probe)
        return probe

    def accel_in_use(self) -> str:
        """The accelerator guests get: "kvm" or "tcg" (probes KVM once under "auto")."""
        with self._lock:
            return self._resolve_accel()

    def _resolve_accel(self) -> str:
        if self._accel_resolved is None:
            want: str = self.accel
            if want == "auto":
                env = os.environ.get("IVSHMEM_LAB_ACCEL", "auto")
                want = env if env in ("kvm", "tcg") else "auto"
            if want == "auto":
                want = "kvm" if self.probe_kvm().ok else "tcg"
            self._accel_resolved = want
        return self._accel_resolved

    def guest(self, index: int, command: Command, **options: Unpack[GuestOptions]) -> Guest:
        """A not yet started :class:`Guest` (``with lab.guest(...) as g:`` starts it).

        ``command``: a shell command line (str, run by ``/bin/sh -c``) or an argv list.
        Options (:class:`~ivshmem_lab.guest.GuestOptions`): ``devices`` (see
        :mod:`ivshmem_lab.devices`); ``cwd`` (default the caller's); the environment is the
        caller's (unless ``inherit_env=False``) updated with ``env``, plus
        ``IVSHMEM_LAB_GUEST=index`` and ``IVSHMEM_LAB_VMS=vms``; ``on_output(index, line)``
        is called from a reader thread for each output line; ``extra_qemu_args`` go last on
        QEMU's command line; ``network``: the guest's NICs (see :mod:`ivshmem_lab.net`).
        """
        guest = Guest(self, index, command, **options)
        self._guests.add(guest)
        return guest

    def signal_guests(self, sig: int, grace: float = GRACE_S) -> None:
        """Send `sig` to the command of every running guest of this lab
        (:meth:`Guest.signal`) and kill (:meth:`Guest.kill`) every guest still running
        `grace` seconds after the first call (a timer thread), as hydra does with ranks.
        Meant for a launcher's signal handler; returns at once."""
        for guest in list(self._guests):
            guest.signal(sig)
        with self._lock:
            if self._kill_timer is None:
                self._kill_timer = threading.Timer(grace, self._kill_guests)
                self._kill_timer.daemon = True
                self._kill_timer.start()

    def _kill_guests(self) -> None:
        for guest in list(self._guests):
            guest.kill()

    def run_many(
        self,
        commands: Sequence[Command],
        *,
        devices: Sequence[DeviceSpec] = (),
        guest_devices: Sequence[Sequence[DeviceSpec]] | None = None,
        timeout: float | None = 300.0,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        on_output: Callable[[int, str], None] | None = None,
    ) -> list[GuestResult]:
        """Run ``commands[i]`` in guest i, all guests in parallel; results in index order.

        ``devices`` go to every guest; ``guest_devices[i]`` (if given) replaces them for
        guest i. ``timeout`` bounds each guest's whole life (boot included): a guest still
        running then is killed (``timed_out=True``). A guest that fails never raises: look
        at ``returncode`` / ``error``. Raises LabError/LabUnavailable only if the lab itself
        cannot start guests; every started guest is killed and cleaned up before returning
        or raising.
        """
        n = len(commands)
        if guest_devices is not None and len(guest_devices) != n:
            raise ValueError(f"guest_devices has {len(guest_devices)} entries for {n} guests")
        self.initramfs()
        self.accel_in_use()
        guests = [
            self.guest(
                i,
                cmd,
                devices=guest_devices[i] if guest_devices is not None else devices,
                cwd=cwd,
                env=env,
                inherit_env=inherit_env,
                vms=n,
                on_output=on_output,
            )
            for i, cmd in enumerate(commands)
        ]
        try:
            for g in guests:
                g.start()
            deadline = None if timeout is None else time.monotonic() + timeout
            results = []
            for g in guests:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                results.append(g.wait(left))
            return results
        finally:
            for g in guests:
                g.close()

    def run(
        self, command: Command, *, vms: int = 1, **options: Unpack[RunOptions]
    ) -> list[GuestResult]:
        """Run the same ``command`` in ``vms`` guests in parallel (see :meth:`run_many`)."""
        if vms < 1:
            raise ValueError("vms must be >= 1")
        return self.run_many([command] * vms, **options)
