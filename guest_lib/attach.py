"""attach(): find this process's region and join it, in a guest or on a host.

    import guest_lib
    ep = guest_lib.attach()                 # in a guest with one ivshmem device of ours
    ep = guest_lib.attach(region="job1")    # pick a device (guest) or a region (host)
    ep = guest_lib.attach(socket="/run/ivshmem-broker/job1.sock")   # host, via the broker

How the place is chosen, first match wins:

1. `socket=PATH`: a host process joins through the broker (guest_lib.host_client).
2. `device=SYSFS_PATH`, else `$IVSHMEM_COMM_DEVICE`: that PCI device.
3. `$IVSHMEM_COMM_SOCKET`: the broker at that socket.
4. ivshmem PCI devices (vendor 0x1af4, device 0x1110) under /sys/bus/pci/devices: those whose
   BAR2 holds a region of this project (superblock checked) and matches `region` / `uuid`.
   Exactly one must fit (several regions and no `region`/`uuid`: AttachError).
5. `region=NAME` with no ivshmem device in sight (a host): the broker serving NAME if its
   record names a live socket (`<state dir>/NAME.json`, see ivshmem_comm.records), else
   Region.open(NAME) with POSIX-semaphore doorbells.

Joining a PCI device:

- `ivshmem-doorbell` (has the MSI-X BAR1; only the broker can serve it): IVPosition (BAR0
  offset 8) is this VM's ivshmem id, which is not a peer-table slot: the VM's slot is the
  one whose `doorbell` field holds that id (the broker writes it there, state JOINING,
  before QEMU learns the id). The Endpoint's peer id is that slot, made with
  broker_assigned=True. If a previous process in this guest has left that slot (LEFT), the
  slot is claimed again under the same ivshmem id (a new incarnation; `doorbell`, pid and
  host id stay the broker's, see `_reclaim_vm_slot`). Kicks go through the Doorbell
  register, to the id in the target slot's `doorbell` field; waits block on the UIO device
  of vector 0 (guest_lib.doorbell), or poll with backoff where uio_ivshmem is not bound.
- `ivshmem-plain` (no broker, IVPosition 0, no interrupts): the process claims slot `peer`
  (or the first free one) itself and waits by polling with backoff.

Ownership of the mappings: the Endpoint's notifier owns BAR0 (closed by Endpoint.close());
the Region owns BAR2 (`ep.region.close()` unmaps it; otherwise process exit does).
The returned Endpoint carries `ep.attachment`, an `Attachment` saying what was chosen.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any

from guest_lib import pci
from guest_lib.doorbell import DoorbellNotifier, region_target
from ivshmem_comm import layout
from ivshmem_comm.endpoint import Endpoint
from ivshmem_comm.errors import IvshmemError, PeerSlotBusyError, RegionFormatError
from ivshmem_comm.notify import PollingNotifier
from ivshmem_comm.records import default_state_dir, read_record
from ivshmem_comm.region import Region, host_id
from ivshmem_comm.ring import full_fence

ENV_DEVICE = "IVSHMEM_COMM_DEVICE"
ENV_SOCKET = "IVSHMEM_COMM_SOCKET"
CLAIM_SETTLE_S = (0.002, 0.010)  # random pause before a plain-model claim is re-checked


class AttachError(IvshmemError):
    """No region could be attached.

    `looked_at` lists (what, why it did not fit) for every candidate examined: PCI devices
    by BDF, sockets, region names. The message spells them all out.
    """

    def __init__(self, summary: str, looked_at: list[tuple[str, str]] | None = None) -> None:
        self.summary = summary
        self.looked_at = list(looked_at or [])
        lines = [summary]
        lines += [f"  {what}: {why}" for what, why in self.looked_at]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Attachment:
    """How an Endpoint was attached.

    `kind`: "doorbell" (ivshmem-doorbell device in a guest), "plain" (ivshmem-plain device),
    "broker" (host process through a broker socket) or "posix" (host, Region.open).
    `where`: the sysfs device path, socket path or region name. `notifier`: the class name
    of the notifier in use ("DoorbellNotifier", "PollingNotifier", ...); `blocking`: False
    when waits poll instead of sleeping on an interrupt or eventfd.
    """

    kind: str
    where: str
    notifier: str
    blocking: bool
    device: pci.IvshmemDevice | None = None


def _want_fits(info: pci.RegionInfo, region: str | None, uuid: str | None) -> str | None:
    """Why `info` does not match the request, or None if it does."""
    if region is not None and info.name != region:
        return f"holds region {info.name!r}, not {region!r}"
    if uuid is not None and str(info.uuid) != str(uuid).lower():
        return f"holds region {info.name!r} with uuid {info.uuid}, not {uuid}"
    return None


def _find_device(
    region: str | None, uuid: str | None, pci_root: str
) -> tuple[pci.IvshmemDevice | None, list[tuple[str, str]]]:
    """The one PCI device whose region fits; (None, reasons) when none is in sight."""
    looked: list[tuple[str, str]] = []
    fits: list[tuple[pci.IvshmemDevice, pci.RegionInfo]] = []
    devices = pci.scan(pci_root)
    for dev in devices:
        try:
            info = pci.region_info(dev)
        except RegionFormatError as exc:
            looked.append((dev.describe(), f"BAR2 holds no region of this project ({exc})"))
            continue
        except OSError as exc:
            looked.append((dev.describe(), f"cannot map BAR2: {exc}"))
            continue
        why = _want_fits(info, region, uuid)
        if why is not None:
            looked.append((dev.describe(), why))
            continue
        fits.append((dev, info))
    if len(fits) > 1:
        names = ", ".join(f"{d.bdf}: {i.name!r} ({i.uuid})" for d, i in fits)
        raise AttachError(
            f"{len(fits)} ivshmem devices hold regions ({names}); pass region= or uuid=",
            looked,
        )
    if fits:
        return fits[0][0], looked
    if not devices:
        looked.append((pci_root, "no ivshmem PCI device (1af4:1110)"))
    return None, looked


def _claim_plain(region: Region, peer: int | None) -> int:
    """Claim slot `peer` (or the first free one) of a broker-less region; return its id.

    Ownership: a free slot (FREE/LEFT/DEAD, or a holder on this kernel that is gone) is
    written by its claimer: every field first, state JOINING last (Region.write_peer stores
    state last). With no compare-and-swap across VMs, two claimers may race for one slot;
    after a random pause the claimer re-reads the slot and gives way if the (pid, host id,
    join time) there is not its own. Raises PeerSlotBusyError if no slot could be had.
    """
    me_host = host_id()
    busy: list[str] = []
    slots = [peer] if peer is not None else list(range(region.max_peers))
    for p in slots:
        for _attempt in range(3):
            info = region.peer(p)
            live = info.state in (layout.PEER_JOINING, layout.PEER_READY)
            if live and info.holder_alive() is not False:
                busy.append(f"slot {p} is {info.state_name} (pid {info.pid})")
                break
            now = time.time_ns()
            incarnation = (info.incarnation + 1) & 0xFFFFFFFF or 1
            region.write_peer(
                p,
                incarnation=incarnation,
                pid=os.getpid(),
                host_id=me_host,
                doorbell=p,
                heartbeat_ns=now,
                joined_ns=now,
                state=layout.PEER_JOINING,
            )
            full_fence()  # our claim stores before the re-check loads (store->load order)
            time.sleep(random.uniform(*CLAIM_SETTLE_S))
            check = region.peer(p)
            if (check.pid, check.host_id, check.joined_ns, check.state) == (
                os.getpid(),
                me_host,
                now,
                layout.PEER_JOINING,
            ):
                return p
            # Someone else wrote the slot meanwhile: theirs now; look again.
        else:
            busy.append(f"slot {p}: lost the claim race three times")
    raise PeerSlotBusyError(
        f"no free peer slot in region {region.name!r}: " + "; ".join(busy or ["no slots"])
    )


def vm_slot(region: Region, ivshmem_id: int) -> int | None:
    """The slot of the VM whose IVPosition is `ivshmem_id`: the one whose `doorbell` holds
    it; should several (the broker avoids it), a live one (JOINING/READY) first, then a LEFT
    one, then the most recently joined; None if none."""
    if not 0 < ivshmem_id <= 0xFFFF:
        return None
    found = [i for i in region.peers() if i.doorbell == ivshmem_id and i.state != layout.PEER_FREE]
    if not found:
        return None
    live = (layout.PEER_JOINING, layout.PEER_READY)
    best = max(found, key=lambda i: (i.state in live, i.state == layout.PEER_LEFT, i.joined_ns))
    return best.peer


def _reclaim_vm_slot(region: Region, slot: int, ivshmem_id: int) -> None:
    """Make the VM's slot JOINING again for a new process in this guest (a new incarnation).

    Ownership: the slot is this VM's while its QEMU holds the broker connection (the broker
    hands out no slot of a connected peer, LEFT or not); its process writes it. Only the
    incarnation, the heartbeat and state JOINING (last) are written: `doorbell` (the id),
    pid and host id (QEMU's, host id 0) stay the broker's, so the broker still knows the
    slot as this VM's (and marks it DEAD when the VM's connection closes, whatever the
    incarnation). Raises PeerSlotBusyError for a slot held by a live process or given up.
    """
    info = region.peer(slot)
    if info.doorbell != ivshmem_id:
        raise PeerSlotBusyError(f"peer slot {slot} no longer carries ivshmem id {ivshmem_id}")
    if info.state in (layout.PEER_JOINING, layout.PEER_READY):
        raise PeerSlotBusyError(
            f"peer slot {slot} (ivshmem id {ivshmem_id}) is {info.state_name}: another process "
            "of this guest holds it"
        )
    if info.state != layout.PEER_LEFT:
        raise PeerSlotBusyError(
            f"peer slot {slot} (ivshmem id {ivshmem_id}) is {info.state_name}: the broker gave "
            "it up; restart the VM's device (or the VM) to rejoin"
        )
    region.write_peer(
        slot,
        incarnation=(info.incarnation + 1) & 0xFFFFFFFF or 1,
        heartbeat_ns=time.time_ns(),
        state=layout.PEER_JOINING,
    )


def attach_device(
    device: pci.IvshmemDevice,
    peer: int | None = None,
    *,
    region: str | None = None,
    uuid: str | None = None,
    **options: Any,
) -> Endpoint:
    """Join the region in `device`'s BAR2 and return the Endpoint (see the module doc).

    Raises AttachError if BAR2 holds no (matching) region, PeerSlotBusyError if the slot
    is held by a live process, OSError if the BARs cannot be mapped (e.g. not root).
    """
    try:
        info = pci.region_info(device)
    except (RegionFormatError, OSError) as exc:
        raise AttachError(
            "the device holds no usable region", [(device.describe(), str(exc))]
        ) from exc
    why = _want_fits(info, region, uuid)
    if why is not None:
        raise AttachError("the device holds another region", [(device.describe(), why)])
    registers = pci.map_registers(device)
    owns_registers = True  # until the notifier takes BAR0 over, or it is closed
    shm = pci.map_shared_memory(device)
    try:
        reg = Region(shm, owner=shm)
    except BaseException:
        shm.close()
        registers.close()
        raise
    notifier: Any
    try:
        if device.doorbell_model:
            ivshmem_id = pci.read_ivposition(registers)
            me = vm_slot(reg, ivshmem_id)
            if me is None:
                raise AttachError(
                    "no peer slot carries this VM's ivshmem id",
                    [(device.describe(), f"IVPosition is {ivshmem_id} (0: no broker)")],
                )
            if peer is not None and peer != me:
                raise AttachError(
                    "peer= does not match the broker's assignment",
                    [(
                        device.describe(),
                        f"IVPosition is {ivshmem_id} (slot {me}), peer={peer} was asked for",
                    )],
                )  # fmt: skip
            state, _ = reg.peer_state(me)
            if state != layout.PEER_JOINING:
                # A previous process of this guest held the slot: claim it anew, same id.
                _reclaim_vm_slot(reg, me, ivshmem_id)
            uio = pci.uio_devices(device).get(0)
            notifier = DoorbellNotifier(registers, uio, target_of=region_target(reg))
            owns_registers = False  # the notifier owns it now
            endpoint = reg.endpoint(me, notifier=notifier, broker_assigned=True, **options)
            kind = "doorbell"
        else:
            registers.close()
            owns_registers = False
            me = _claim_plain(reg, peer)
            notifier = PollingNotifier()
            endpoint = reg.endpoint(me, notifier=notifier, broker_assigned=True, **options)
            kind = "plain"
    except BaseException:
        if owns_registers:
            registers.close()
        reg.close()
        raise
    endpoint.attachment = Attachment(  # type: ignore[attr-defined]
        kind, device.path, type(notifier).__name__, bool(notifier.blocking), device
    )
    return endpoint


def _attach_socket(path: str, **options: Any) -> Endpoint:
    from guest_lib import host_client

    try:
        endpoint = host_client.attach(path, **options)
    except OSError as exc:
        raise AttachError("cannot join through the broker", [(path, str(exc))]) from exc
    endpoint.attachment = Attachment(  # type: ignore[attr-defined]
        "broker", path, type(endpoint.notifier).__name__, True
    )
    return endpoint


def _broker_socket_for(name: str) -> str | None:
    """The socket of a broker that serves region `name` on this host, if its record says so."""
    record = read_record(default_state_dir(), name)
    return record["socket"] if record and os.path.exists(record["socket"]) else None


def attach(
    region: str | None = None,
    uuid: str | None = None,
    socket: str | None = None,
    peer: int | None = None,
    *,
    device: str | None = None,
    pci_root: str = pci.PCI_ROOT,
    **options: Any,
) -> Endpoint:
    """Find this process's region and join it; return its Endpoint (see the module doc).

    `region` / `uuid` select the region (a name / a UUID string); `socket` a broker socket
    (host); `peer` the slot to claim where the process claims it itself (ivshmem-plain,
    Region.open; under a broker the broker decides and `peer` must agree or be None);
    `device` a sysfs PCI device path. `options` go to Endpoint (e.g. spin_us).

    The Endpoint has `ep.attachment` (an Attachment). Raises AttachError (with `looked_at`:
    every candidate and why it did not fit) when nothing fits, PeerSlotBusyError when the
    slot is held by a live peer, OSError when mapping a device fails (e.g. not root).
    """
    if socket is not None:
        return _attach_socket(socket, **options)
    dev_path = device or os.environ.get(ENV_DEVICE)
    if dev_path:
        try:
            dev = pci.device_at(dev_path)
        except (OSError, ValueError) as exc:
            origin = "device=" if device else f"${ENV_DEVICE}"
            raise AttachError(f"{origin} names no usable device", [(dev_path, str(exc))]) from exc
        return attach_device(dev, peer, region=region, uuid=uuid, **options)
    env_socket = os.environ.get(ENV_SOCKET)
    if env_socket:
        return _attach_socket(env_socket, **options)
    found, looked = _find_device(region, uuid, pci_root)
    if found is not None:
        return attach_device(found, peer, region=region, uuid=uuid, **options)
    if region is not None and not pci.scan(pci_root):
        sock = _broker_socket_for(region)
        if sock is not None:
            endpoint = _attach_socket(sock, **options)
            if peer is not None and endpoint.peer_id != peer:
                endpoint.close()
                raise AttachError(
                    "peer= does not match the broker's assignment",
                    [(sock, f"the broker gave slot {endpoint.peer_id}, peer={peer} was asked")],
                )
            return endpoint
        try:
            reg = Region.open(region)
        except (FileNotFoundError, RegionFormatError) as exc:
            looked.append((f"region {region!r}", str(exc)))
            raise AttachError(f"no region {region!r} found", looked) from exc
        if uuid is not None and str(reg.uuid) != str(uuid).lower():
            reg.close()
            looked.append((f"region {region!r}", f"uuid is {reg.uuid}, not {uuid}"))
            raise AttachError(f"region {region!r} has another uuid", looked)
        try:
            me = _claim_plain(reg, peer)
            endpoint = reg.endpoint(me, broker_assigned=True, **options)
        except BaseException:
            reg.close()
            raise
        endpoint.attachment = Attachment(  # type: ignore[attr-defined]
            "posix", region, type(endpoint.notifier).__name__, bool(endpoint.notifier.blocking)
        )
        return endpoint
    want = []
    if region is not None:
        want.append(f"region={region!r}")
    if uuid is not None:
        want.append(f"uuid={uuid}")
    what = " ".join(want) or "any region"
    hint = f" (on a host: pass socket= or region=, or set ${ENV_SOCKET})"
    if "IVSHMEM_LAB_GUEST" in os.environ:  # set by ivshmem-lab in its guests
        hint = " (this lab guest has none: give ivshmem-lab run --socket PATH or --shm NAME:SIZE)"
    raise AttachError(f"no ivshmem region found for {what}{hint}", looked)
