"""The MPI face's wire format over shared memory: core tags, message kinds, piece sizes and
control payloads. Everything the engine decodes from a peer is decoded (and validated) here.

One core tag per message, 31 bits:
    bit 29-30 kind: 0 DATA, 1 FIRST, 2 PIECE, 3 CONTROL   bits 18-28 context   bits 0-17 tag
- A message of n <= `whole_max` bytes (at most the core's 4 MiB cache window) is one DATA
  message carrying exactly its bytes: the core reserves it contiguously in the queue at once
  (so a send of it either goes whole or not at all: timeout 0 never leaves half a message)
  and publishes it in pieces (layout.pipe_span: a quarter of it, at most max_span) that the
  receiver's `recv_into` copies while the sender writes the next.
- A larger message is a FIRST message of `chunk` bytes followed by PIECE messages of at most
  `chunk` bytes, the last one with bit 0 of the tag field set (possibly empty). Pieces of one
  message are never interleaved with other data to the same peer (per-destination FIFO), so
  the receiver appends them in order. `chunk` is at most a quarter of a queue's data area:
  two ranks that send each other huge messages never block inside the core: the engine
  keeps receiving while it waits for space.
  `whole_max` and `chunk` are derived from the region geometry (the same on both sides).
- CONTROL messages (context 0; the tag field says which): ACK (payload: sequence number)
  completes a synchronous send; SYNC (same payload) announces that the next DATA message
  from that peer is synchronous; HELLO carries bootstrap data; ABANDON (payload: context,
  the context's generation, instance number, tag base, tag count, error class, then the
  reason in UTF-8) says that the sender left one instance of a collective with an error
  (the class is ERR_OTHER, or the fault-tolerance class the sender met: the others fail
  with it too); the generation tells which communicator holding that context it is about
  (matching.Matching.reuse_context): a late notice about a freed one is ignored by the
  next one that reuses the context; REVOKE (payload: a context and its generation, read
  alike) says that the sender revoked the communicator of that point-to-point context (see
  `ulfm`); NAME and NAMED carry a request to the job's name service and its answer (see
  `dynproc`; the payload is theirs, decoded and validated there).

Collective tags: blocking collective instance `seq` of a communicator uses the tags
`coll_base(seq)` .. + COLL_SPAN - 1 on its collective context; nonblocking ones use tags
from COLL_TAGS up.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from guest_lib.mpi import constants, exceptions
from ivshmem_comm import layout

KIND_DATA = 0
KIND_FIRST = 1
KIND_PIECE = 2
KIND_CONTROL = 3
CTRL_ACK = 0
CTRL_SYNC = 1
CTRL_HELLO = 2
CTRL_ABANDON = 3
CTRL_REVOKE = 4
CTRL_NAME = 5
CTRL_NAMED = 6
PIECE_LAST = 1  # tag field of the last PIECE of a message
SEQ = struct.Struct("<Q")  # ACK and SYNC payload: a sequence number
# collective context, its generation, instance number, first tag, tags, class, flags
ABANDON = struct.Struct("<IQQIHiB")
ABANDON_UNTAKEN = 1  # ABANDON flag: the sender left before taking the instance's area round
ABANDON_REASON_MAX = 512  # bytes of the reason an ABANDON carries at most
REVOKE = struct.Struct("<IQ")  # REVOKE payload: the point-to-point context revoked, its generation

TAG_MASK = constants.TAG_UB
CTX_SHIFT = constants.TAG_BITS
KIND_SHIFT = constants.TAG_BITS + constants.CTX_BITS

COLL_SPAN = 16  # tags of one blocking collective instance: base .. base + COLL_SPAN - 1
COLL_INSTANCES = 4096  # blocking collective instances before a tag base comes round again
COLL_TAGS = COLL_INSTANCES * COLL_SPAN  # tags of blocking instances; nonblocking ones: above
FT_TAGS_FROM = 3 << 16  # tags from here: the fault-tolerant exchanges (ulfm), spared by revoke


def coll_base(seq: int) -> int:
    """The first tag of blocking collective instance `seq` (instances are numbered per
    communicator, the same on every member)."""
    return seq % COLL_INSTANCES * COLL_SPAN


def core_tag(kind: int, ctx: int, tag: int) -> int:
    """The core tag of a message of `kind` on context `ctx` with tag field `tag`."""
    return (kind << KIND_SHIFT) | (ctx << CTX_SHIFT) | tag


def head_of(kind: int, ctx: int) -> int:
    """`coretag >> CTX_SHIFT` of every message of `kind` on context `ctx` (one compare tells
    both apart on the fast paths)."""
    return kind << constants.CTX_BITS | ctx


def chunk_size(data_size: int) -> int:
    """The piece size for a queue data area of `data_size` bytes: 3 * 2**k <= data_size / 4.

    A multiple of 48 (so every element size up to 48 divides it), at most 3 MiB.
    """
    target = min(data_size // 4, 3 << 20)
    size = 3 << 4
    while size * 2 <= target:
        size *= 2
    return size


def whole_max(geometry: layout.Geometry) -> int:
    """The largest message sent whole: one the core reserves contiguously in a queue, and at
    most the core's cache window (a larger one goes in pieces, which the sender's allocator
    keeps cycling through the window's few MiB, still in cache: 16 MiB ping-pong one way
    ~1250 us whole, ~860 us in pieces)."""
    limit = min(geometry.data_size, layout.CACHE_WINDOW) - layout.SPAN_HEADER_SIZE
    while limit > 0 and not layout.is_contiguous(limit, geometry):
        limit -= geometry.max_span
    return max(limit, 0)


class Abandon(NamedTuple):
    """A decoded ABANDON payload."""

    ctx: int  # the collective context
    gen: int  # the generation of the communicator holding it (Matching.reuse_context)
    seq: int  # the instance number
    base: int  # its first tag
    span: int  # its number of tags
    error: int  # the error class the others fail with (one of ABANDON_CLASSES)
    reason: str
    # the sender left before taking the instance's round in the collective area (its area
    # kept, in doubt: area.Doubt); False: it took the round, or has no area
    untaken: bool = False


# The error classes an ABANDON may carry: a member that left a collective because a process
# failed or the communicator was revoked passes that on (ULFM's rule: every member learns
# of the failure); any other error of one member is ERR_OTHER for the rest.
ABANDON_CLASSES = frozenset(
    {
        exceptions.ERR_OTHER,
        exceptions.ERR_PROC_FAILED,
        exceptions.ERR_PROC_FAILED_PENDING,
        exceptions.ERR_REVOKED,
    }
)


def abandon_class(exc: BaseException) -> int:
    """The error class of `exc` (an MPI.Exception's, else ERR_OTHER), for an abandonment
    (Matching.abandon passes on only ABANDON_CLASSES)."""
    if isinstance(exc, exceptions.Exception):
        return exc.Get_error_class()
    return exceptions.ERR_OTHER


def encode_abandon(
    ctx: int,
    gen: int,
    seq: int,
    base: int,
    span: int,
    error: int,
    reason: str,
    untaken: bool = False,
) -> bytes:
    """The ABANDON payload (the reason cut to ABANDON_REASON_MAX bytes); `error` is one of
    ABANDON_CLASSES; `untaken`: see Abandon."""
    head = ABANDON.pack(ctx, gen, seq, base, span, error, ABANDON_UNTAKEN if untaken else 0)
    return head + reason.encode()[:ABANDON_REASON_MAX]


def _bad(who: str, what: str) -> exceptions.Exception:
    return exceptions.Exception(exceptions.ERR_INTERN, f"{who} sent {what}")


def decode_seq(payload: bytes, kind_tag: int, who: str) -> int:
    """The sequence number an ACK or SYNC (`kind_tag`) carries. MPI.Exception(ERR_INTERN)
    naming `who` (the sender) if the payload is not exactly one."""
    if len(payload) != SEQ.size:
        name = "ACK" if kind_tag == CTRL_ACK else "SYNC"
        raise _bad(who, f"a {name} of {len(payload)} bytes, not {SEQ.size}")
    value: int = SEQ.unpack(payload)[0]
    return value


def decode_abandon(payload: bytes, who: str) -> Abandon:
    """The fields of an ABANDON payload. MPI.Exception(ERR_INTERN) naming `who` if it is
    shorter than its fixed part, its tags leave the tag space, or its error class is not one
    of ABANDON_CLASSES."""
    if len(payload) < ABANDON.size:
        raise _bad(who, f"an ABANDON of {len(payload)} bytes, under {ABANDON.size}")
    ctx, gen, seq, base, span, error, flags = ABANDON.unpack_from(payload)
    if ctx > constants.MAX_CONTEXT or base + span > constants.TAG_UB + 1:
        raise _bad(who, f"an ABANDON of context {ctx}, tags {base}+{span}")
    if error not in ABANDON_CLASSES:
        raise _bad(who, f"an ABANDON of error class {error}")
    why = payload[ABANDON.size :].decode(errors="replace")
    return Abandon(ctx, gen, seq, base, span, error, why, bool(flags & ABANDON_UNTAKEN))


def decode_revoke(payload: bytes, who: str) -> tuple[int, int]:
    """The context a REVOKE names (an even one: a communicator's point-to-point context) and
    its generation (matching.Matching.reuse_context). MPI.Exception(ERR_INTERN) naming `who`
    for a payload of another size or context."""
    if len(payload) != REVOKE.size:
        raise _bad(who, f"a REVOKE of {len(payload)} bytes, not {REVOKE.size}")
    ctx, gen = REVOKE.unpack(payload)
    if ctx > constants.MAX_CONTEXT or ctx & 1:
        raise _bad(who, f"a REVOKE of context {ctx}")
    return ctx, gen


def piece_outside(coretag: int, peer_name: str) -> exceptions.Exception:
    """The error for a message of another kind inside a message being received in pieces."""
    return _bad(peer_name, f"tag {coretag:#x} inside a message")
