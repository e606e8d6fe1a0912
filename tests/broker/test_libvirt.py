"""libvirt as a client of the broker: a real libvirtd (started here unless one runs), a TCG
domain with the <shmem> element `ivshmem-broker libvirt-xml` prints, the stock qemu.conf
(QEMU runs as libvirt's own user), and the broker's --socket-group for that user's group."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import queue_free
from tests.support.broker import BrokerProcess, cli, unique_name, wait_for

pytestmark = [queue_free, pytest.mark.qemu, pytest.mark.timeout(300)]

URI = "qemu:///system"
QEMU_GROUP = "libvirt-qemu"  # Debian's libvirt: QEMU runs as libvirt-qemu:libvirt-qemu


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        ["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr}"
    return r


def _libvirtd_answers() -> bool:
    return virsh("version", check=False).returncode == 0


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """A libvirtd answering on qemu:///system: the host's if it runs one, else one started
    here (with virtlogd, which stock qemu.conf sends QEMU's output to) and stopped after."""
    missing = [b for b in ("libvirtd", "virtlogd", "virsh") if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        reason = f"needs root and libvirt (missing: {', '.join(missing) or 'root'}; "
        reason += "apt-get install libvirt-daemon-system libvirt-clients, or make system-deps)"
        if os.environ.get("IVSHMEM_REQUIRE_LIBVIRT") == "1":
            pytest.fail(f"IVSHMEM_REQUIRE_LIBVIRT=1 but this test {reason}")
        pytest.skip(reason)
    started: list[subprocess.Popen[bytes]] = []
    if not _libvirtd_answers():
        for daemon in ("virtlogd", "libvirtd"):
            started.append(
                subprocess.Popen(
                    [daemon], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/"
                )
            )
        wait_for(_libvirtd_answers, timeout=60, step=0.2)
    yield
    for proc in reversed(started):
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory libvirt's QEMU user may traverse (pytest's tmp_path is 0700 all the way)."""
    path = Path(tempfile.mkdtemp(prefix="ivb-libvirt-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def broker(base: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(base, None, "--socket-group", QEMU_GROUP).start()
    yield b
    b.cleanup()


class Domain:
    """A transient-named, persistent TCG domain (no disk, no OS: it stays paused)."""

    def __init__(self, devices: str, tmp: Path) -> None:
        self.name = f"ivb-{unique_name()}"
        self.xml = tmp / f"{self.name}.xml"
        self.xml.write_text(
            f"""<domain type='qemu'>
  <name>{self.name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>
{devices}
  </devices>
</domain>
"""
        )
        virsh("define", str(self.xml))

    def pid(self) -> int:
        return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text())

    def remove(self) -> None:
        virsh("destroy", self.name, check=False)
        virsh("undefine", self.name, check=False)
        Path(f"/var/log/libvirt/qemu/{self.name}.log").unlink(missing_ok=True)


@pytest.fixture
def domains() -> Iterator[list[Domain]]:
    made: list[Domain] = []
    yield made
    for d in made:
        d.remove()


def peers(broker: BrokerProcess) -> list[dict]:
    r = cli("status", broker.name, "--json", "--state-dir", str(broker.state_dir))
    assert r.returncode == 0, r.stderr
    (info,) = json.loads(r.stdout)["regions"]
    return [p for p in info["peers"] if p["incarnation"]]


def printed_shmem(broker: BrokerProcess) -> str:
    r = cli("libvirt-xml", broker.name, "--state-dir", str(broker.state_dir))
    assert r.returncode == 0, r.stderr
    assert "<size" not in r.stdout  # libvirt refuses <size> with <server>
    return r.stdout


def uid_gid(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def assert_joins_then_leaves(broker: BrokerProcess, domain: Domain) -> None:
    pid = domain.pid()
    wait_for(lambda: any(p["pid"] == pid for p in peers(broker)), timeout=30, step=0.2)
    (peer,) = [p for p in peers(broker) if p["pid"] == pid]
    assert peer["state_name"] == "joining" and peer["holder_alive"] is True
    assert f"qemu pid {pid}" in broker.log()
    # QEMU runs as libvirt's user, not root: the socket group is what lets it in
    assert uid_gid(pid)[0] == pwd.getpwnam("libvirt-qemu").pw_uid
    t0 = time.monotonic()
    virsh("destroy", domain.name)
    t1 = time.monotonic()
    wait_for(lambda: all(p["state_name"] == "dead" for p in peers(broker)), timeout=30)
    print(
        f"virsh destroy took {t1 - t0:.2f} s; the slot was DEAD "
        f"{time.monotonic() - t1:.2f} s after it returned"
    )


def test_domain_with_the_printed_shmem_joins_and_leaves(
    libvirtd: None, broker: BrokerProcess, domains: list[Domain], base: Path
) -> None:
    domain = Domain(printed_shmem(broker), base)
    domains.append(domain)
    t0 = time.monotonic()
    virsh("start", domain.name, "--paused")
    print(f"virsh start --paused: {time.monotonic() - t0:.2f} s")
    assert_joins_then_leaves(broker, domain)


def test_hotplugged_shmem_joins(
    libvirtd: None, broker: BrokerProcess, domains: list[Domain], base: Path
) -> None:
    domain = Domain("", base)
    domains.append(domain)
    virsh("start", domain.name, "--paused")
    device = base / "shmem.xml"
    device.write_text(printed_shmem(broker))
    virsh("attach-device", domain.name, str(device), "--live")
    assert_joins_then_leaves(broker, domain)


def test_without_the_socket_group_libvirt_qemu_cannot_connect(
    libvirtd: None, base: Path, domains: list[Domain]
) -> None:
    """The issue's failure: a private broker socket and stock qemu.conf."""
    b = BrokerProcess(base).start()
    try:
        domain = Domain(printed_shmem(b), base)
        domains.append(domain)
        r = virsh("start", domain.name, "--paused", check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
        assert not peers(b)
    finally:
        b.cleanup()
