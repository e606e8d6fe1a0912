"""One-sided windows (guest_lib/mpi/win.py) on every communicator of the rank-side suite.

Runs in every rank of a job (see conftest.py), hybrid jobs included: results are checked
against what every rank computes alike. Passive-target tests hammer one target from every
rank at once (the target applies accumulates one at a time: counts must come out exact).
Epochs end with a Fence before the communicator's own collectives: a rank inside a blocking
collective that crosses regions (MPICH) answers no window request until it returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI
from guest_lib.mpi import win as win_module
from guest_lib.mpi.win import REQ
from ivshmem_comm import ring


def _shared_comm(comm: MPI.Intracomm) -> MPI.Intracomm:
    return comm.Split_type(MPI.COMM_TYPE_SHARED) if comm.Get_size() > 1 else comm.Dup()


@pytest.mark.parametrize("flavor", ["create", "allocate", "shared"])
def test_put_get_fence_ring(comm, flavor):
    rank, size = comm.Get_rank(), comm.Get_size()
    own = None
    if flavor == "shared":
        comm = _shared_comm(comm)
        rank, size = comm.Get_rank(), comm.Get_size()
        win = MPI.Win.Allocate_shared(16 * 8, 8, comm=comm)
    elif flavor == "allocate":
        win = MPI.Win.Allocate(16 * 8, 8, comm=comm)
    else:
        own = np.zeros(16, "d")
        win = MPI.Win.Create(own, 8, comm=comm)
    memory = np.frombuffer(win.tomemory(), "d")
    if own is not None:
        assert np.shares_memory(memory, own)
    assert win.Get_attr(MPI.WIN_SIZE) == 128 and win.Get_attr(MPI.WIN_DISP_UNIT) == 8
    right, left = (rank + 1) % size, (rank - 1) % size
    win.Fence()
    win.Put(np.arange(4, dtype="d") + 100 * rank, right, 2)  # elements 2..5 of the right
    win.Fence()
    assert memory[2:6].tolist() == [100 * left + i for i in range(4)]
    assert memory[:2].tolist() == [0, 0] and not memory[6:].any()
    got = np.full(5, -1.0)
    win.Get([got, 4, MPI.DOUBLE], left, (2, 4, MPI.DOUBLE))
    win.Fence()
    assert got.tolist() == [100 * ((left - 1) % size) + i for i in range(4)] + [-1]
    win.Free()
    assert win == MPI.WIN_NULL
    if flavor == "shared":
        comm.Free()


def test_accumulate_counts_exactly_under_contention(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    counter = np.zeros(3, "i8")
    win = MPI.Win.Create(counter, 8, comm=comm)
    win.Fence()
    for _ in range(40):
        win.Accumulate(np.array([1, rank, 2], "i8"), 0, op=MPI.SUM)
    win.Fence()
    if rank == 0:
        assert counter.tolist() == [40 * size, 40 * sum(range(size)), 80 * size]
    win.Fence()
    fetched = []
    win.Lock_all()
    for _ in range(25):
        old = np.zeros(1, "i8")
        win.Fetch_and_op(np.ones(1, "i8"), old, 0, 0, MPI.SUM)
        fetched.append(int(old[0]))
    win.Unlock_all()
    win.Fence()  # (a rank in a blocking collective between regions serves no window)
    every = comm.allgather(fetched)
    values = sorted(v for per in every for v in per)
    assert values == list(range(40 * size, 40 * size + 25 * size))  # each ticket once
    for per in every:
        assert per == sorted(per)
    win.Free()


def test_exclusive_lock_serialises_read_modify_write(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    cell = np.zeros(1, "i4")
    win = MPI.Win.Create(cell, 4, comm=comm)
    win.Fence()
    for _ in range(15):
        value = np.zeros(1, "i4")
        win.Lock(0, MPI.LOCK_EXCLUSIVE)
        win.Get(value, 0)
        win.Flush(0)
        win.Put(value + 1, 0)
        win.Unlock(0)
    win.Fence()
    if rank == 0:
        assert cell[0] == 15 * size
    win.Free()


def test_compare_and_swap_elects_one_winner(comm):
    rank = comm.Get_rank()
    slot = np.full(1, -1, "i8")
    win = MPI.Win.Create(slot, 8, comm=comm)
    win.Fence()
    old = np.zeros(1, "i8")
    win.Lock(0, MPI.LOCK_SHARED)
    win.Compare_and_swap(np.array([rank], "i8"), np.array([-1], "i8"), old, 0, 0)
    win.Unlock(0)
    win.Fence()
    winners = comm.allgather(int(old[0]) == -1)
    assert winners.count(True) == 1
    win.Fence()
    seen = np.zeros(1, "i8")
    win.Get(seen, 0)
    win.Fence()
    assert winners[int(seen[0])]
    win.Free()


@pytest.mark.parametrize("op", ["SUM", "PROD", "MAX", "MIN", "BAND", "REPLACE", "NO_OP"])
def test_get_accumulate_returns_the_old_data(comm, op):
    rank, size = comm.Get_rank(), comm.Get_size()
    data = np.full(4, 6, "i4")
    win = MPI.Win.Create(data, 4, comm=comm)
    target = (rank + 1) % size
    mpi_op = getattr(MPI, op)
    for turn in range(size):  # one origin at a time: the expected value is exact
        if turn == rank:
            old = np.zeros(4, "i4")
            win.Lock(target)
            win.Get_accumulate(np.arange(4, dtype="i4") + 1, old, target, op=mpi_op)
            win.Unlock(target)
            assert old.tolist() == [6] * 4
        win.Fence()
    expect = [mpi_op(6, i + 1) for i in range(4)]
    assert data.tolist() == expect
    win.Free()


def test_post_start_complete_wait_ring(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    memory = np.zeros(2, "i4")
    win = MPI.Win.Create(memory, 4, comm=comm)
    group = win.Get_group()
    left, right = (rank - 1) % size, (rank + 1) % size
    win.Post(group.Incl([left]))
    win.Start(group.Incl([right]))
    win.Put(np.array([rank, 7], "i4"), right)
    win.Complete()
    win.Wait()
    assert memory.tolist() == [left, 7]
    group.Free()
    win.Free()


def test_dynamic_window_takes_addresses(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    win = MPI.Win.Create_dynamic(comm=comm)
    memory = MPI.Alloc_mem(16)
    memory[:] = 0
    win.Attach(memory)
    addresses = comm.allgather(MPI.Get_address(memory))
    win.Fence()
    right = (rank + 1) % size
    win.Put(bytearray([rank + 1] * 4), right, addresses[right] + 8)
    win.Fence()
    assert bytes(memory[8:12]) == bytes([(rank - 1) % size + 1] * 4)
    with pytest.raises(MPI.Exception) as err:
        win.Detach(bytearray(4))
    assert err.value.Get_error_class() == MPI.ERR_RMA_ATTACH
    win.Detach(memory)
    win.Free()
    MPI.Free_mem(memory)


def test_range_errors_name_the_rank_and_keep_ranks_in_step(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    win = MPI.Win.Allocate(8, 1, comm=comm)
    win.Fence()
    with pytest.raises(MPI.Exception) as err:  # this rank's own window: at the call
        win.Put(bytearray(4), rank, 6)
    assert err.value.Get_error_class() == MPI.ERR_RMA_RANGE
    target = (rank + 1) % size
    if target != rank:
        win.Put(bytearray(4), target, 6)  # the target finds it out of range
        with pytest.raises(MPI.Exception, match=f"rank {rank}: 4 bytes") as err:
            win.Fence()
        assert err.value.Get_error_class() == MPI.ERR_RMA_RANGE
    win.Fence()  # still in step
    with pytest.raises(MPI.Exception) as err:
        win.Accumulate(np.ones(2, "i4"), target, op=MPI.MAXLOC)
    assert err.value.Get_error_class() == MPI.ERR_OP
    with pytest.raises(ValueError):
        win.Put(bytearray(4), target, (0, 2, MPI.BYTE))  # 4 bytes into a 2-byte target
    win.Free()


def test_shared_window_is_one_block_every_rank_maps(comm):
    node = _shared_comm(comm)
    rank, size = node.Get_rank(), node.Get_size()
    win = MPI.Win.Allocate_shared(8 * (rank + 1), 8, comm=node)
    assert win.Get_attr(MPI.WIN_CREATE_FLAVOR) == MPI.WIN_FLAVOR_SHARED
    mine = np.frombuffer(win.tomemory(), "d")
    assert mine.size == rank + 1 and not mine.any()  # zeroed
    mine[:] = rank + 0.5  # plain stores: no MPI call carries them
    node.Barrier()
    segments = [win.Shared_query(r) for r in range(size)]
    for r, (memory, unit) in enumerate(segments):
        assert unit == 8
        assert np.frombuffer(memory, "d").tolist() == [r + 0.5] * (r + 1)
    addresses = [MPI.Get_address(m) for m, _ in segments]
    for r in range(size - 1):  # contiguous, in rank order
        assert addresses[r + 1] == addresses[r] + 8 * (r + 1)
    assert MPI.Get_address(win.Shared_query(MPI.PROC_NULL)[0]) == addresses[0]
    node.Barrier()
    win.Free()
    node.Free()


def test_shared_windows_give_their_heap_back(comm):
    node = _shared_comm(comm)
    ep = MPI._internal_state()["endpoint"]
    heap = ep.region.geometry.heap_size if ep is not None else 0
    if node.Get_size() > 1 and heap:
        share = heap // 3 // node.Get_size()  # three at once would not fit: only if freed
        for _ in range(6):
            win = MPI.Win.Allocate_shared(share, 1, comm=node)
            win.Free()
        with pytest.raises(MPI.Exception) as err:  # on every rank, nothing left half-made
            MPI.Win.Allocate_shared(heap, 1, comm=node)
        assert err.value.Get_error_class() == MPI.ERR_NO_MEM
        node.Barrier()
    node.Free()


@pytest.mark.parametrize("told", [(8, -4), (-16, 8)], ids=["unit", "size"])
def test_forged_shared_size_or_unit_is_refused_naming_its_rank(comm, monkeypatch, told):
    """The (size, displacement unit) each member tells the others for Allocate_shared, as
    a hostile member forges it past its own argument checks: every member refuses it with
    an error naming that rank (before: a window with a negative unit, or segments cut at a
    negative size), and the next shared window works."""
    node = _shared_comm(comm)
    rank, size = node.Get_rank(), node.Get_size()
    if size > 1:
        hostile = size - 1
        if rank == hostile:
            real = win_module._share

            def forged(w: Any, nbytes: int) -> None:
                w.disp_unit = told[1]
                real(w, told[0])

            monkeypatch.setattr(win_module, "_share", forged)
        with pytest.raises(MPI.Exception, match=f"rank {hostile} announced") as err:
            MPI.Win.Allocate_shared(8, 8, comm=node)
        assert err.value.Get_error_class() == MPI.ERR_OTHER
        monkeypatch.undo()
        win = MPI.Win.Allocate_shared(8, 8, comm=node)
        assert win.Shared_query(hostile)[1] == 8
        win.Free()
    node.Free()


def test_shared_window_across_regions_is_refused(comm):
    engine = MPI._internal_state()["engine"]
    if not any(not engine.routes[w].local for w in comm._group):
        pytest.skip("every rank of this communicator shares the region")
    with pytest.raises(MPI.Exception, match="Split_type") as err:
        MPI.Win.Allocate_shared(8, 1, comm=comm)
    assert err.value.Get_error_class() == MPI.ERR_RMA_SHARED
    comm.Barrier()


def test_handles_names_attributes_and_null():
    assert MPI.Win() == MPI.WIN_NULL and MPI.Win() is not MPI.WIN_NULL
    assert MPI.WIN_NULL.Get_name() == "MPI_WIN_NULL" and not MPI.WIN_NULL
    with pytest.raises(TypeError):
        MPI.Win((1, 2))
    win = MPI.Win.Create(None, 1, comm=MPI.COMM_SELF)
    assert win.attrs == (0, 0, 1) and win.model == MPI.WIN_UNIFIED
    win.name = "w"
    assert win.Get_name() == "w"
    deleted = []
    key = MPI.Win.Create_keyval(delete_fn=lambda w, k, v: deleted.append(v))
    win.Set_attr(key, "a")
    win.Set_attr(key, "b")
    assert win.Get_attr(key) == "b" and deleted == ["a"]
    with pytest.raises(ValueError):
        __import__("pickle").dumps(win)
    win.Free()
    assert deleted == ["a", "b"]
    assert MPI.Win.Free_keyval(key) == MPI.KEYVAL_INVALID
    win = MPI.Win.Create(None, 1, comm=MPI.COMM_SELF)
    key = MPI.Win.Create_keyval(delete_fn=lambda w, k, v: 1 / 0)
    win.Set_attr(key, "c")
    with pytest.raises(MPI.Exception, match="ZeroDivisionError") as err:
        win.Delete_attr(key)
    assert err.value.Get_error_class() == MPI.ERR_OTHER and win.Get_attr(key) is None
    win.Free()
    MPI.Win.Free_keyval(key)
    with pytest.raises(MPI.Exception) as err:
        win.Fence()
    assert err.value.Get_error_class() == MPI.ERR_WIN


@pytest.mark.parametrize(
    ("payload", "what"),
    [(b"\x01\x02", "sent a malformed RMA request"),
     (REQ.pack(99, 0, 0, 0, 0, 0, b""), "sent RMA request 99"),
     (REQ.pack(2, 0, 0, 0, 0, 4, b""), "asked for a reply on tag 0")],
    ids=["short", "kind", "tag"],
)  # fmt: skip
def test_malformed_request_is_reported_naming_its_origin(comm, payload, what):
    """A request the target cannot apply is answered with an error at the origin's next
    Flush, naming the origin; the window goes on working."""
    rank, size = comm.Get_rank(), comm.Get_size()
    win = MPI.Win.Allocate(8, 1, comm=comm)
    w = win._w
    target = (rank + 1) % size
    w.comm._isend_op(memoryview(payload), target, 0, w.comm._ctx, False)  # as a hostile peer
    w.dirty.add(target)
    with pytest.raises(MPI.Exception, match=f"rank {rank} {what}") as err:
        win.Flush(target)
    assert err.value.Get_error_class() in (MPI.ERR_INTERN, MPI.ERR_OTHER)
    win.Fence()
    win.Put(bytearray(b"ok"), target, 0)
    win.Fence()
    assert bytes(win.tomemory()[:2]) == b"ok"
    win.Free()


@pytest.mark.parametrize("flavor", ["create", "allocate", "shared", "dynamic"])
def test_window_exports_its_memory_as_mpi4py(flavor):
    """memoryview(win) / numpy.asarray(win): this rank's window memory as unsigned bytes
    over (base, size), writable, as mpi4py's Win gives it; Free while a buffer is out raises
    BufferError and frees nothing, and works once the buffers are released."""
    if ring.IMPLEMENTATION != "c":
        with pytest.raises(TypeError):
            memoryview(MPI.Win.Allocate(8, 1, comm=MPI.COMM_SELF))
        pytest.skip("the pure-Python mode cannot export memory (Python 3.11): TypeError")
    comm = MPI.COMM_SELF
    own = np.zeros(6, "i4")
    win = {
        "create": lambda: MPI.Win.Create(own, 4, comm=comm),
        "allocate": lambda: MPI.Win.Allocate(24, 4, comm=comm),
        "shared": lambda: MPI.Win.Allocate_shared(24, 4, comm=comm),
        "dynamic": lambda: MPI.Win.Create_dynamic(comm=comm),
    }[flavor]()
    view = memoryview(win)
    base, size, _ = win.attrs
    assert (view.format, view.itemsize, view.ndim, view.readonly) == ("B", 1, 1, False)
    assert len(view) == size == (0 if flavor == "dynamic" else 24)
    if size:
        assert MPI.Get_address(view) == base
        ints = view.cast("i")
        win.Lock(0)
        win.Put(np.array([7], "i4"), 0, 2)
        win.Unlock(0)
        assert ints[2] == 7 and np.asarray(win).view("i4")[2] == 7
        ints[3] = 9  # stores through the buffer are window memory
        got = np.zeros(1, "i4")
        win.Lock(0)
        win.Get(got, 0, 3)
        win.Unlock(0)
        assert got[0] == 9
        if flavor == "create":
            assert own[3] == 9
        ints.release()
    array = np.asarray(win)
    with pytest.raises(BufferError, match="exported"):
        win.Free()
    assert win  # nothing freed: the window still works
    view.release()
    with pytest.raises(BufferError, match="exported"):
        win.Free()
    del array
    win.Free()
    assert win == MPI.WIN_NULL
    with pytest.raises(BufferError, match="null"):
        memoryview(win)


def test_polling_own_memory_with_flush_lets_requests_in(comm):
    """A rank that polls its own window memory with Flush(own rank) / Sync (what
    mpi4py.util.sync's spin loops do) applies the others' requests meanwhile: each rank
    waits for its left neighbour's Accumulate to land while it has its own Unlock to the
    right one in flight behind that (it hung: Flush of a rank with nothing pending made no
    progress)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    flag = np.zeros(1, "i4")
    win = MPI.Win.Create(flag, 4, comm=comm)
    win.Fence()
    right = (rank + 1) % size

    def tell_right() -> None:
        win.Lock(right, MPI.LOCK_SHARED)
        win.Accumulate(np.array([1], "i4"), right, 0, MPI.REPLACE)
        win.Unlock(right)

    for progress in (lambda: win.Flush(rank), win.Sync):
        if rank == 0:
            tell_right()
        while not flag[0]:
            progress()
        if rank:
            tell_right()
        win.Fence()
        flag[0] = 0
        win.Fence()
    win.Free()


def test_fence_completes_puts_for_third_ranks(comm):
    """After a Fence, a Get from any rank sees every Put of the epoch, a third rank's too:
    rank r puts many elements into r+1, and right after the Fence rank r-1 reads them
    there (it read stale data when a Fence only waited for every rank's marker: r+1 could
    answer r-1's Get before applying r's Puts)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    memory = np.zeros(64, "i8")
    win = MPI.Win.Create(memory, 8, comm=comm)
    for epoch in range(1, 4):
        win.Fence()
        for i in range(64):
            win.Put(np.array([epoch * 1000 + rank], "i8"), (rank + 1) % size, i)
        win.Fence()
        got = np.zeros(64, "i8")
        win.Get(got, (rank + 2) % size)
        assert got.tolist() == [epoch * 1000 + (rank + 1) % size] * 64, (epoch, got)
    win.Fence()
    win.Free()
