"""Message buffers that describe their memory through an interface instead of the buffer
protocol: DLPack (`__dlpack__` with `__dlpack_device__`) and the CUDA array interface
(`__cuda_array_interface__`), read and validated as mpi4py 4.1 reads them (the same
exception types for the same bad descriptions), then used as host memory.

mpi4py hands such a buffer's pointer to MPI as it is; a CUDA-aware MPI may then read device
memory through it. Here this process's CPU copies the bytes, so the memory must be mapped
in this process: plain host memory described with a device type of CUDA (as mpi4py's own
tests do), pinned or managed memory. `host_view` checks [address, address + nbytes) first
(`check_mapped`) and raises BufferError naming the range for memory that is not readable
(for a receive: writable) here, such as device memory from cudaMalloc or a dangling
pointer, instead of letting the process crash on it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import operator
import os
import sys
import warnings
from typing import Any, NamedTuple

import numpy as np

CPU_ACCESSIBLE = frozenset({0, 1, 3, 11, 13})  # none (buffer protocol), CPU, CUDA/ROCm host,
#                                                CUDA managed: what mpi4py's MPI.buffer reads
_CUDA = 2  # DLPack's kDLCUDA: the device the CUDA array interface describes
_NATIVE = "<" if sys.byteorder == "little" else ">"


class Foreign(NamedTuple):
    """Memory an object describes through DLPack or the CUDA array interface."""

    address: int  # of its first byte
    nbytes: int
    dtype: np.dtype  # its elements (uint8 where the interface names a type numpy has not)
    swapped: bool  # byte order not the machine's (no datatype of its own, as mpi4py)
    readonly: bool
    device: int  # DLPack device type (CUDA for the CUDA array interface)
    owner: Any  # what keeps the memory alive (the object, or its DLPack capsule)


def describe(obj: Any) -> Foreign | None:
    """The memory `obj` describes through DLPack or the CUDA array interface (tried in that
    order, as mpi4py), or None when it has neither (DLPack needs both `__dlpack__` and
    `__dlpack_device__`). Nothing is read from the memory itself. Errors, as mpi4py's:
    TypeError/ValueError/KeyError for a malformed description (a field of the wrong type,
    a tuple of the wrong length, a missing key, a bad item size), BufferError for what it
    describes that cannot be a message buffer (a masked, negative-sized or non-contiguous
    array, an invalid or used DLPack capsule, a DLPack version below 1 in a versioned
    capsule, a negative dimension count, shape or stride). RuntimeWarning (a warning) for
    a CUDA array interface `descr` other than the typestr's own: it is ignored."""
    if hasattr(obj, "__dlpack__"):
        found = _dlpack(obj)
        if found is not None:
            return found
    if hasattr(obj, "__cuda_array_interface__"):
        return _cai(obj)
    return None


def host_view(found: Foreign, writable: bool) -> memoryview:
    """A flat unsigned-byte view of `found`'s memory (read-only when it says so), after
    `check_mapped`. BufferError for a read-only buffer asked `writable`, and for memory
    this process cannot read (or write, with `writable`)."""
    if writable and found.readonly:
        raise BufferError("message buffer is read-only")
    if not found.nbytes:
        return memoryview(bytearray(0))
    check_mapped(found.address, found.nbytes, writable)
    raw = (ctypes.c_char * found.nbytes).from_address(found.address)
    raw.owner = found.owner  # type: ignore[attr-defined]  # lives while a view of raw does
    view = memoryview(raw).cast("B")
    return view.toreadonly() if found.readonly else view


# ------------------------------------------------------------------ CUDA array interface
def _cai(obj: Any) -> Foreign:
    interface = obj.__cuda_array_interface__
    if not isinstance(interface, dict):
        raise TypeError(f"__cuda_array_interface__: expecting a dict, got {_name(interface)}")
    data = _field(interface["data"], tuple, "data")
    typestr = _field(interface["typestr"], str, "typestr")
    shape = _field(interface["shape"], tuple, "shape")
    strides = interface.get("strides")
    descr = interface.get("descr")
    mask = interface.get("mask")
    if strides is not None:
        _field(strides, tuple, "strides")
    if descr is not None:
        _field(descr, list, "descr")
    if len(data) != 2:
        raise ValueError(f"__cuda_array_interface__: data is (pointer, readonly), not {data!r}")
    pointer, readonly = data
    size = 1
    for extent in shape:
        size *= operator.index(extent)
    if pointer is None and size == 0:
        pointer = 0
    if not isinstance(pointer, int):
        raise TypeError(f"__cuda_array_interface__: pointer {pointer!r} is not an int")
    if len(typestr) < 2:
        raise TypeError(f"__cuda_array_interface__: typestr {typestr!r}")
    order, kind, itemsize = typestr[0], typestr[1], int(typestr[2:])  # (ValueError)
    if mask is not None:
        raise BufferError("__cuda_array_interface__: cannot handle masked arrays")
    if size < 0 or itemsize < 0:
        raise BufferError(f"__cuda_array_interface__: negative size (shape {shape}, {typestr})")
    if strides is not None and not _contiguous(shape, strides, itemsize):
        raise BufferError(
            f"__cuda_array_interface__: buffer is not contiguous (shape {shape}, strides "
            f"{strides}, itemsize {itemsize})"
        )
    if descr is not None and (len(descr) != 1 or descr[0] != ("", typestr)):
        warnings.warn("__cuda_array_interface__: ignoring 'descr' key", RuntimeWarning, 3)
    return Foreign(pointer, size * itemsize, _dtype(kind, itemsize),
                   order not in ("|", _NATIVE), bool(readonly), _CUDA, obj)  # fmt: skip


def _field(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind):
        raise TypeError(
            f"__cuda_array_interface__: {name} must be a {kind.__name__}, not {_name(value)}"
        )
    return value


def _name(value: Any) -> str:
    return type(value).__name__


def _dtype(kind: str, itemsize: int) -> np.dtype:
    """The numpy type of `itemsize`-byte elements of kind `kind` ("b" bool, "i", "u", "f",
    "c"), as mpi4py maps them to formats; uint8 (raw bytes) for anything else."""
    if kind == "b" and itemsize == 1:
        return np.dtype("?")
    if kind in ("i", "u", "f", "c") and itemsize > 0:
        try:
            return np.dtype(f"{kind}{itemsize}")
        except TypeError:  # a size numpy has no type of ("f3", "c4", "i16")
            pass
    return np.dtype(np.uint8)


def _contiguous(shape: Any, strides: Any, unit: int) -> bool:
    """Whether `strides` (in multiples of `unit`) lay `shape` out densely in C or Fortran
    order, axes of extent 1 aside."""
    if len(strides) != len(shape):
        return False
    shape = [operator.index(extent) for extent in shape]
    strides = [operator.index(stride) for stride in strides]
    return _dense(shape, strides, unit) or _dense(shape[::-1], strides[::-1], unit)


def _dense(shape: list[int], strides: list[int], unit: int) -> bool:
    expect = unit
    for extent, stride in zip(reversed(shape), reversed(strides), strict=True):
        if extent > 1 and stride != expect:
            return False
        expect *= extent
    return True


# ------------------------------------------------------------------ DLPack
class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("code", ctypes.c_uint8),
        ("bits", ctypes.c_uint8),
        ("lanes", ctypes.c_uint16),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("byte_offset", ctypes.c_uint64),
    ]


_VERSIONED_HEAD = 32  # DLManagedTensorVersioned: version, manager_ctx, deleter, flags
_READ_ONLY = 1  # DLPACK_FLAG_BITMASK_READ_ONLY
_DL_KINDS = {0: "i", 1: "u", 2: "f", 5: "c"}  # DLPack type codes -> numpy kinds (6: bool)
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype = ctypes.c_int
_capsule_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _dlpack(obj: Any) -> Foreign | None:
    """`obj`'s DLPack tensor (None without `__dlpack_device__`), asked for as mpi4py asks:
    a versioned capsule first (`max_version=(1, 0), copy=False`, and `stream=-1` off the
    CPU), the unversioned form when the producer takes no such arguments. The capsule is
    not consumed: its producer keeps the tensor while the capsule lives. The capsule's
    structs (the tensor, its shape and strides) are the producer's word, as any C
    extension's memory is; the data they point to is checked by `host_view`."""
    try:
        export, where = obj.__dlpack__, obj.__dlpack_device__
    except AttributeError:
        return None
    device_type, device_id = where()
    device_type, _ = operator.index(device_type), operator.index(device_id)
    name = b"dltensor_versioned"
    try:
        if device_type == 1:
            capsule = export(max_version=(1, 0), copy=False)
        else:
            capsule = export(stream=-1, max_version=(1, 0), copy=False)
    except TypeError:  # a producer of DLPack before 1.0
        name = b"dltensor"
        capsule = export() if device_type == 1 else export(stream=-1)
    if not _capsule_valid(capsule, name):
        raise BufferError(f"dlpack: invalid capsule object (expecting a live {name.decode()})")
    address = _capsule_pointer(capsule, name) or 0
    readonly = False
    if name == b"dltensor_versioned":
        if ctypes.c_uint32.from_address(address).value < 1:
            raise BufferError("dlpack: unexpected version")
        readonly = bool(ctypes.c_uint64.from_address(address + 24).value & _READ_ONLY)
        address += _VERSIONED_HEAD
    tensor = _DLTensor.from_address(address)
    ndim = tensor.ndim
    if ndim < 0:
        raise BufferError("dlpack: number of dimensions is negative")
    if ndim and not tensor.shape:
        raise BufferError("dlpack: shape is NULL")
    shape = _int64s(tensor.shape, ndim)
    if any(extent < 0 for extent in shape):
        raise BufferError(f"dlpack: shape {shape} has a negative item")
    strides = _int64s(tensor.strides, ndim) if tensor.strides else None
    if strides is not None and any(stride < 0 for stride in strides):
        raise BufferError(f"dlpack: strides {strides} have a negative item")
    if strides is not None and not _contiguous(shape, strides, 1):
        raise BufferError("dlpack: buffer is not contiguous")
    count = 1
    for extent in shape:
        count *= extent
    code, bits, lanes = tensor.code, tensor.bits, tensor.lanes
    if lanes == 1 and code == 6:
        dtype = np.dtype("?" if bits == 8 else np.uint8)
    elif lanes == 1:
        dtype = _dtype(_DL_KINDS.get(code, "?"), bits // 8 if bits % 8 == 0 else 0)
    elif code == 2 and lanes == 2:  # a complex number as two lanes of floats
        dtype = _dtype("c", bits // 4 if bits in (32, 64, 128) else 0)
    else:
        dtype = np.dtype(np.uint8)
    return Foreign((tensor.data or 0) + tensor.byte_offset, count * ((bits * lanes + 7) // 8),
                   dtype, False, readonly, device_type, capsule)  # fmt: skip


def _int64s(address: int | None, n: int) -> list[int]:
    """n int64s at `address`."""
    if not n or not address:
        return []
    return list((ctypes.c_int64 * n).from_address(address))


# ------------------------------------------------------------------ is it mapped here?
_PAGE = mmap.PAGESIZE
_IOV_MAX = 1024  # iovecs per process_vm_readv call (Linux's UIO_MAXIOV)
_libc = ctypes.CDLL(None, use_errno=True)
_vm_calls = []
for _call_name in ("process_vm_readv", "process_vm_writev"):
    _call = getattr(_libc, _call_name, None)
    if _call is not None:
        _call.restype = ctypes.c_ssize_t
        _call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                          ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]  # fmt: skip
        _vm_calls.append(_call)


def check_mapped(address: int, nbytes: int, writable: bool) -> None:
    """Return iff every byte of [address, address + nbytes) is mapped readable (with
    `writable`: also writable) in this process; else BufferError naming the range.

    Why this way: the kernel decides, at the moment of the call, with nothing cached that
    an munmap could make stale. process_vm_readv on this process reads one byte of every
    page of the range (process_vm_writev writes those same bytes back for `writable`: a
    receive buffer belongs to the MPI call while it runs, so nothing else writes it then);
    where a plain access would fault (unmapped, PROT_NONE such as CUDA's reservations for
    device memory, read-only, a file mapping past its end) the kernel answers EFAULT
    instead of a signal. The kernel refuses these calls on VM_IO/VM_PFNMAP mappings (a
    PCI BAR such as ivshmem's mapped from sysfs, [vvar]), which the CPU reads all the
    same: for a range that failed, /proc/self/smaps decides, letting through only the
    parts in such mappings with the permissions asked (the rest is probed again). Where
    the calls are not allowed at all (a seccomp filter), smaps' permissions alone decide.
    Cost: a few microseconds for a small buffer, about a microsecond a page for a large one
    (the kernel pins each page). The check is made when the spec is read: memory unmapped
    while a nonblocking call still uses it is the caller's error, as in C MPI.
    """
    if nbytes <= 0:
        return
    end = address + nbytes
    verdict = _probe(address, end, writable) if address > 0 and end < 1 << 64 else False
    if verdict or (address > 0 and _smaps_allows(address, end, writable, verdict is None)):
        return
    raise BufferError(
        f"message: the {nbytes} bytes at {address:#x} are not "
        f"{'writable' if writable else 'readable'} host memory of this process (device "
        "memory, or memory not mapped here): they cannot be copied"
    )


def _probe(address: int, end: int, writable: bool) -> bool | None:
    """True when the kernel reads (and with `writable` writes back) one byte of every page
    of [address, end) in this process, False when one faults, None when the calls are
    not available (no such syscall, or a seccomp filter refuses them)."""
    if len(_vm_calls) < 2:
        return None
    pid = os.getpid()
    first, last = address // _PAGE, (end - 1) // _PAGE
    for chunk in range(first, last + 1, _IOV_MAX):
        pages = min(_IOV_MAX, last + 1 - chunk)
        remote = (ctypes.c_size_t * (2 * pages))()  # struct iovec {base, len}: a byte a page
        remote[0], remote[1] = max(address, chunk * _PAGE), 1
        if pages > 1:
            remote[2::2] = list(range((chunk + 1) * _PAGE, (chunk + pages) * _PAGE, _PAGE))
            remote[3::2] = [1] * (pages - 1)
        scratch = (ctypes.c_char * pages)()
        local = (ctypes.c_size_t * 2)(ctypes.addressof(scratch), pages)
        for call in _vm_calls[: 1 + writable]:  # read, then write the bytes back
            done = call(pid, local, 1, remote, pages, 0)
            if done == pages:
                continue
            if done < 0 and ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
                return None
            return False
    return True


def _smaps_allows(address: int, end: int, writable: bool, alone: bool) -> bool:
    """Whether /proc/self/smaps shows [address, end) covered by mappings readable (and
    writable) here; unless `alone`, parts outside VM_IO/VM_PFNMAP mappings must also pass
    `_probe` (see check_mapped)."""
    need = "rw" if writable else "r"
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return False
    at = address
    low = high = 0
    perms = ""
    for line in lines:
        head = line.split(None, 2)
        if "-" in head[0] and len(head) > 1 and not head[0].endswith(":"):
            low, high = (int(part, 16) for part in head[0].split("-"))
            perms = head[1]
            continue
        if head[0] != "VmFlags:" or not low <= at < high:
            continue
        stop = min(end, high)
        flags = line.split()[1:]
        if not all(p in perms for p in need):
            return False
        special = "pf" in flags or "io" in flags
        if not alone and not special and not _probe(at, stop, writable):
            return False
        at = stop
        if at >= end:
            return True
    return False
