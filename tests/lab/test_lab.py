"""Tests of the VM lab (ivshmem_lab) and the guest UIO driver (guest_lib/kmod).

The ``vm`` tests boot real QEMU guests (TCG when KVM does not work: ~5 s each here). They
skip only when qemu-system-x86_64, a kernel with modules or busybox-static is missing.
"""

from __future__ import annotations

import array
import glob
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

import ivshmem_lab as L
from ivshmem_lab.cli import main as lab_main
from ivshmem_lab.devices import qemu_device_args
from ivshmem_lab.guest import command_script
from ivshmem_lab.host import find_kernel
from ivshmem_lab.initramfs import (
    GUEST_MODULES,
    CpioWriter,
    build_initramfs,
    modname,
    module_load_order,
)
from tests.support import queue_free

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable  # the project's venv python: visible in the guest (host root over 9p)

_available, _why = L.lab_available()
needs_vm = pytest.mark.skipif(not _available, reason=f"VM lab unavailable: {_why}")


def _lab_tempdirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ivshmem-lab-*")))


@pytest.fixture(scope="module")
def lab() -> L.Lab:
    lab = L.Lab(accel="auto", memory="384M")
    lab.initramfs()
    lab.accel_in_use()
    return lab


@pytest.fixture
def shm_file():
    """A fresh 1 MiB /dev/shm file, mapped on the host; removed afterwards."""
    name = f"ivshmem-labtest-{uuid.uuid4().hex[:8]}"
    path = f"/dev/shm/{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        m = mmap.mmap(fd, 1 << 20)
        yield name, m
        m.close()
    finally:
        os.close(fd)
        os.unlink(path)


def _guest_py(src: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(src)]


# ------------------------------------------------------------------------------------------
# Host-only unit tests (no QEMU)


def test_parse_size_and_devices(tmp_path: Path) -> None:
    assert L.parse_device("r0:1GiB") == L.ShmDevice("r0", 1 << 30)
    with pytest.raises(ValueError):
        L.parse_device("r0:12 parsecs")
    assert L.parse_device("r0:1M") == L.ShmDevice("r0", 1 << 20)
    assert L.parse_device("shm:/dev/shm/x") == L.ShmDevice("/dev/shm/x", None)
    assert L.parse_device("sock:/run/b.sock:4") == L.DoorbellDevice("/run/b.sock", 4)
    sp = tmp_path / "s"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sp))
    try:
        assert L.parse_device(str(sp)) == L.DoorbellDevice(str(sp))
    finally:
        s.close()
    assert L.ShmDevice("r0").path == "/dev/shm/r0"
    assert L.ShmDevice("/r0").path == "/dev/shm/r0"
    with pytest.raises(L.LabError, match="power of two"):
        qemu_device_args([L.ShmDevice(f"nonexistent-{uuid.uuid4().hex}", 3 << 20)])
    with pytest.raises(L.LabError, match="no size"):
        L.ShmDevice(f"nonexistent-{uuid.uuid4().hex}").resolved_size()


def test_device_args() -> None:
    args = qemu_device_args(
        [L.ShmDevice("/dev/shm/nonexistent-a", "1M"), L.DoorbellDevice("/s", 3)]
    )
    assert args == [
        "-object",
        "memory-backend-file,id=ivm0,size=1048576,share=on,mem-path=/dev/shm/nonexistent-a",
        "-device",
        "ivshmem-plain,memdev=ivm0",
        "-chardev",
        "socket,path=/s,id=ivc1",
        "-device",
        "ivshmem-doorbell,chardev=ivc1,vectors=3,ioeventfd=on",
    ]


@queue_free
@pytest.mark.qemu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="no qemu-system-x86")
def test_device_args_start_qemu_even_with_a_comma_in_a_path(tmp_path: Path) -> None:
    """The lab's devices and `ivshmem-broker qemu-args` come from one function
    (host_broker.qemu.ivshmem_args); its options make a real QEMU join a real broker through
    a socket path with a comma in it (escaped as QEMU does: doubled), next to a plain device
    over a file whose path has one too."""
    from guest_lib.launch import BrokerProcess
    from host_broker.cli import qemu_args

    folder = tmp_path / "a,b"
    folder.mkdir(mode=0o700)
    name = f"labqemu-{uuid.uuid4().hex[:8]}"
    plain = folder / "plain"
    with BrokerProcess(name, "1M", vectors=2, socket=folder / "s.sock", log=tmp_path / "log") as b:
        assert qemu_args(name, b.socket, 2, None, False) == [
            "-chardev", f"socket,path={str(folder).replace(',', ',,')}/s.sock,"
            f"id=ivshmem_{name.replace('-', '_')}", "-device",
            f"ivshmem-doorbell,chardev=ivshmem_{name.replace('-', '_')},vectors=2",
        ]  # fmt: skip
        devices = [L.DoorbellDevice(b.socket, 2), L.ShmDevice(str(plain), 1 << 20)]
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-machine", "pc",
             *qemu_device_args(devices)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "qemu pid" not in b.log() and qemu.poll() is None:
                assert time.monotonic() < deadline, b.log()
                time.sleep(0.05)
            assert qemu.poll() is None, qemu.communicate()[0]
            assert f"qemu pid {qemu.pid}" in b.log()
            assert plain.stat().st_size == 1 << 20  # QEMU made the plain device's file
        finally:
            qemu.kill()
            qemu.wait()


def test_command_script_quoting(tmp_path: Path) -> None:

    script = command_script(
        ["printf", "%s|", "a b", "$HOME", "it's"],
        str(tmp_path),
        {"WEIRD": "x'y\"z $q", "1BAD": "skipped"},
        3,
        4,
    )
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "a b|$HOME|it's|"
    env_script = command_script(
        'echo "$WEIRD/$IVSHMEM_LAB_GUEST/$IVSHMEM_LAB_VMS/$(pwd)"',
        str(tmp_path),
        {"WEIRD": "w"},
        3,
        4,
    )
    out = subprocess.run(["/bin/sh", "-c", env_script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"w/3/4/{tmp_path}"
    missing = command_script("true", "/nonexistent/dir", {}, 0, 1)
    res = subprocess.run(["/bin/sh", "-c", missing], capture_output=True, text=True)
    assert res.returncode == 125
    assert "not visible" in res.stderr


def _parse_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        assert data[off : off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off : off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


def test_cpio_writer() -> None:
    c = CpioWriter()
    c.dir("d")
    c.file("d/f", b"hello", 0o755)
    c.symlink("d/l", "f")
    c.chardev("dev-console", 5, 1)
    data = c.finish()
    assert len(data) % 512 == 0
    e = _parse_cpio(data)
    assert e["d/f"] == (0o100755, b"hello")
    assert e["d/l"][1] == b"f"
    assert set(e) == {"d", "d/f", "d/l", "dev-console"}


@pytest.mark.skipif(not _available, reason=f"VM lab unavailable: {_why}")
def test_module_order_and_initramfs_contents() -> None:
    k = find_kernel()
    order = [modname(p.name) for p in module_load_order(k.moddir, GUEST_MODULES)]
    for m in ("virtio_pci", "9pnet", "9pnet_virtio", "9p", "uio", "inet_diag", "tcp_diag"):
        assert m in order
    assert order.index("9pnet") < order.index("9pnet_virtio") < order.index("9p")
    assert order.index("virtio_ring") < order.index("virtio_pci")
    assert len(order) == len(set(order))
    with pytest.raises(L.LabError):
        module_load_order(k.moddir, ["no_such_module_xyz"])
    ird = build_initramfs(k)
    entries = _parse_cpio(ird.path.read_bytes())
    assert "init" in entries and "bin/busybox" in entries and "dev/console" in entries
    listed = entries["lib/lab-modules/order"][1].decode().split()
    assert all(f"lib/lab-modules/{n}" in entries for n in listed)
    assert ("lib/lab-modules/extra/uio_ivshmem.ko" in entries) == ird.uio_module
    assert build_initramfs(k).path == ird.path  # cached


# ------------------------------------------------------------------------------------------
# Real guests


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm
@needs_vm
def test_two_guests_run_venv_python(lab: L.Lab) -> None:
    before = _lab_tempdirs()
    results = lab.run(
        _guest_py("""
            import os, sys
            print("guest", os.environ["IVSHMEM_LAB_GUEST"], "of", os.environ["IVSHMEM_LAB_VMS"])
            print("cwd", os.getcwd())
            print("prefix", sys.prefix)
            sys.exit(int(os.environ["IVSHMEM_LAB_GUEST"]) + 5)
        """),
        vms=2,
        cwd=REPO,
        timeout=180,
    )
    assert [r.index for r in results] == [0, 1]
    for r in results:
        assert r.error is None, r.console
        assert r.returncode == r.index + 5
        assert f"guest {r.index} of 2\n" in r.output
        assert f"cwd {REPO}\n" in r.output
        assert f"prefix {sys.prefix}\n" in r.output
        assert r.accel == lab.accel_in_use()
        assert r.boot_seconds is not None and 0 < r.boot_seconds < 120
        print(
            f"vm{r.index}: accel {r.accel}, boot {r.boot_seconds:.1f} s,"
            f" total {r.wall_seconds:.1f} s"
        )
    assert _lab_tempdirs() == before


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm
@needs_vm
def test_ivshmem_plain_via_sysfs_resource2(lab: L.Lab, shm_file) -> None:
    name, m = shm_file
    m[:16] = b"host-was-here!!!"
    results = lab.run(
        _guest_py("""
            import mmap, os
            devs = []
            for d in sorted(os.listdir("/sys/bus/pci/devices")):
                p = "/sys/bus/pci/devices/" + d
                ids = [open(p + "/" + f).read().strip() for f in ("vendor", "device")]
                if ids == ["0x1af4", "0x1110"]:
                    devs.append(p)
            assert len(devs) == 1, devs
            # With uio_ivshmem bound the device is enabled already and writing gives EBUSY.
            if open(devs[0] + "/enable").read().strip() == "0":
                with open(devs[0] + "/enable", "w") as f:
                    f.write("1")
            print("driver", os.path.basename(os.path.realpath(devs[0] + "/driver")))
            fd = os.open(devs[0] + "/resource2", os.O_RDWR | os.O_SYNC)
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
            print("size", size)
            print("read", bytes(mm[:16]).decode())
            mm[16:32] = b"guest-was-here!!"
            mm.close()
        """),
        devices=[L.ShmDevice(name)],
        cwd=REPO,
        timeout=180,
    )
    r = results[0]
    assert r.returncode == 0, r.output + r.console
    assert "size 1048576\n" in r.output
    assert "read host-was-here!!!\n" in r.output
    assert bytes(m[16:32]) == b"guest-was-here!!"


def _uio_or_skip(lab: L.Lab) -> None:
    ird = lab.initramfs()
    if not ird.uio_module:
        pytest.skip(f"uio_ivshmem did not build: {ird.uio_build_log.strip()[-500:]}")


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm
@needs_vm
def test_uio_driver_plain_maps(lab: L.Lab, shm_file) -> None:
    _uio_or_skip(lab)
    name, m = shm_file
    m[:8] = b"uio-map1"
    r = lab.run(
        _guest_py("""
            import mmap, os
            d = "/sys/class/uio/uio0"
            print("name", open(d + "/name").read().strip())
            print("version", open(d + "/version").read().strip())
            dev = os.path.basename(os.readlink(d + "/device"))
            print("vendor", open(f"/sys/bus/pci/devices/{dev}/vendor").read().strip())
            print("driver", os.path.basename(os.readlink(f"/sys/bus/pci/devices/{dev}/driver")))
            sizes = [int(open(f"{d}/maps/map{i}/size").read(), 16) for i in (0, 1)]
            print("sizes", *sizes)
            fd = os.open("/dev/uio0", os.O_RDWR)
            shm = mmap.mmap(fd, sizes[1], offset=mmap.PAGESIZE)
            regs = mmap.mmap(fd, sizes[0], offset=0)
            print("map1", bytes(shm[:8]).decode())
            shm[8:16] = b"from-uio"
            print("ivposition", int.from_bytes(regs[8:12], "little"))
            try:
                os.read(fd, 4)
            except OSError as e:
                print("read errno", e.errno)
        """),
        devices=[L.ShmDevice(name)],
        cwd=REPO,
        timeout=180,
    )[0]
    assert r.returncode == 0, r.output + r.console
    out = r.output
    assert "name uio_ivshmem\n" in out
    assert "mode=none" in out  # ivshmem-plain has no interrupt
    assert "vendor 0x1af4\n" in out and "driver uio_ivshmem\n" in out
    assert "sizes 256 1048576\n" in out
    assert "map1 uio-map1\n" in out
    assert "ivposition 0\n" in out
    assert "read errno 5\n" in out  # EIO: no interrupt on this device
    assert bytes(m[8:16]) == b"from-uio"


class _MiniIvshmemServer:
    """Just enough of the ivshmem-server protocol for one QEMU client: peer id 1, no peers."""

    def __init__(self, directory: str, vectors: int, size: int = 1 << 20) -> None:
        self.path = os.path.join(directory, "ivshmem.sock")
        self.vectors = vectors
        self.shm_fd = os.memfd_create("labtest-ivshmem")
        os.ftruncate(self.shm_fd, size)
        self.shm = mmap.mmap(self.shm_fd, size)
        self.eventfds = [os.eventfd(0) for _ in range(vectors)]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, c: socket.socket, value: int, fd: int | None = None) -> None:
        anc = []
        if fd is not None:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        c.sendmsg([struct.pack("<q", value)], anc)

    def _serve(self) -> None:
        try:
            c, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(c)
        self._send(c, 0)  # protocol version
        self._send(c, 1)  # the client's id
        self._send(c, -1, self.shm_fd)
        for e in self.eventfds:  # the client's own eventfds, vector 0..N-1
            self._send(c, 1, e)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(5)
        self.shm.close()
        for fd in (self.shm_fd, *self.eventfds):
            os.close(fd)
        os.unlink(self.path)


@pytest.mark.vm
@needs_vm
def test_uio_driver_msix_interrupts(lab: L.Lab) -> None:
    """ivshmem-doorbell with 2 MSI-X vectors: two /dev/uioN; a self-doorbell wakes vector 1,
    a host eventfd write wakes vector 0."""
    _uio_or_skip(lab)
    with tempfile.TemporaryDirectory(prefix="labtest-") as d:
        srv = _MiniIvshmemServer(d, vectors=2)
        try:
            srv.shm[:8] = b"doorbell"
            guest = lab.guest(
                0,
                _guest_py("""
                    import mmap, os, select, struct
                    for i in (0, 1):
                        print(f"uio{i}", open(f"/sys/class/uio/uio{i}/version").read().strip())
                    fd0 = os.open("/dev/uio0", os.O_RDWR)
                    fd1 = os.open("/dev/uio1", os.O_RDWR)
                    regs = mmap.mmap(fd0, 256, offset=0)
                    me = struct.unpack_from("<I", regs, 8)[0]
                    print("ivposition", me)
                    struct.pack_into("<I", regs, 12, (me << 16) | 1)  # ring own vector 1
                    ready, _, _ = select.select([fd1], [], [], 20)
                    print("vector1", struct.unpack("<I", os.read(fd1, 4))[0] if ready else "none")
                    shm = mmap.mmap(fd1, 1 << 20, offset=mmap.PAGESIZE)
                    print("shm", bytes(shm[:8]).decode())
                    print("waiting", flush=True)
                    print("vector0", struct.unpack("<I", os.read(fd0, 4))[0])
                """),
                devices=[L.DoorbellDevice(srv.path, vectors=2)],
                cwd=REPO,
            )
            with guest:
                guest.wait_for_line("^waiting$", timeout=180)
                time.sleep(0.2)
                os.eventfd_write(srv.eventfds[0], 1)
                r = guest.wait(60)
        finally:
            srv.close()
    assert r.returncode == 0, r.output + r.console
    assert "uio0 vector=0 nvectors=2 mode=msix\n" in r.output
    assert "uio1 vector=1 nvectors=2 mode=msix\n" in r.output
    assert "ivposition 1\n" in r.output
    assert "vector1 1\n" in r.output
    assert "shm doorbell\n" in r.output
    assert "vector0 1\n" in r.output


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm
@needs_vm
def test_kill_timeout_and_nothing_left_behind(lab: L.Lab) -> None:
    before = _lab_tempdirs()
    # A guest killed mid-run (simulated power-off).
    with lab.guest(0, "echo ready; sleep 600", cwd=REPO) as g:
        assert g.wait_for_line("^ready$", timeout=180) == "ready"
        assert g.running
        pid = g.pid
        ctl = g.control_dir
        assert ctl is not None and os.path.isdir(ctl)
        g.kill()
        r = g.wait(30)
    assert r.killed and not r.timed_out
    assert r.returncode is None and r.error == "killed"
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(ctl)
    # A guest that overruns its timeout.
    t0 = time.monotonic()
    (r2,) = lab.run("echo start; sleep 600", timeout=max(10.0, 3 * (r.boot_seconds or 5)), cwd=REPO)
    assert r2.timed_out and r2.returncode is None and r2.error == "timed out"
    assert "start\n" in r2.output
    assert time.monotonic() - t0 < 200
    # An exception inside the with-block still kills the guest.
    with pytest.raises(RuntimeError), lab.guest(0, "sleep 600", cwd=REPO) as g3:
        pid3 = g3.pid
        raise RuntimeError("boom")
    assert not os.path.exists(f"/proc/{pid3}")
    # No QEMU of ours, no temp dir of ours.
    assert _lab_tempdirs() == before
    mine = [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and _ppid(p) == os.getpid() and "qemu" in _comm(p)
    ]
    assert mine == []


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm
@needs_vm
def test_setup_failure_is_reported(lab: L.Lab) -> None:
    (r,) = lab.run("true", cwd="/nonexistent/dir", timeout=180)
    assert r.returncode == 125
    assert "not visible in the guest" in r.output


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm
@needs_vm
def test_cli_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    rc = lab_main(
        [
            "run",
            "--vms",
            "2",
            "--memory",
            "384M",
            "--",
            "sh",
            "-c",
            "echo hi $IVSHMEM_LAB_GUEST; exit $IVSHMEM_LAB_GUEST",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 1  # vm1 exits 1
    assert "[vm0] hi 0\n" in cap.out and "[vm1] hi 1\n" in cap.out
    assert "accel " in cap.err
    assert "vm0: exit 0" in cap.err and "vm1: exit 1" in cap.err
    assert lab_main(["run", "--", "true"]) == 0
    assert lab_main(["run"]) == 2
