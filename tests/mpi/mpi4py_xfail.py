"""Expected failures of mpi4py's own test suite on guest_lib.mpi (tests/mpi/test_mpi4py_suite.py).

ENTRIES: (pattern, action, reason). `pattern` is an fnmatch pattern over unittest ids
("test_p2p_buf.TestP2PBufSelf.testSendrecv"; a file that cannot be imported is
"test_x.<import>"). `action` is "xfail" (run it; it is expected to fail) or "skip" (do not
run it: it hangs or leaves the ranks out of step), optionally "@N,M": only at those rank
counts. A reason "missing: <name> (issue #11 point 3)" marks MPI surface still to build:
those entries are the issue's to-do list, not accepted limits.
"""

from __future__ import annotations

_NO_SPAWN = (
    "real limit: Spawn/Spawn_multiple are not supported (a job's processes are the ones "
    "ivshmem-run or mpiexec start): they raise MPI.Exception(ERR_SPAWN)"
)
_NO_POOL = (
    "real limit: MPIPoolExecutor outside `python -m mpi4py.futures` needs Spawn (it raises "
    "BrokenExecutor saying so)"
)
_NO_C_HANDLES = (
    "design limit: MPI._sizeof/_addressof/_handleof give a handle's C memory, and "
    "test_ctypes/test_cffi write a handle value there and expect the handle object to change; "
    "handles here keep their state in the Python object (integer handles are numbers this "
    "process gives them, see guest_lib/mpi/handles.py), so a cell holding the number would be "
    "read-only in effect unless every call resolved its object from that cell"
)
ENTRIES: list[tuple[str, str, str]] = [
    ("test_spawn.TestSpawnSingle*", "xfail", _NO_SPAWN),
    (
        "test_spawn.TestSpawnMultiple*.test[!A]*",
        "xfail",
        _NO_SPAWN,
    ),
    (
        "test_spawn.TestSpawnMultiple*.testArgsOnlyAtRoot",
        "xfail",
        _NO_SPAWN,
    ),
    (
        "test_spawn.TestSpawnMultipleSelf*.testArgsBad",
        "xfail",
        _NO_SPAWN,
    ),
    (
        "test_spawn.TestSpawnMultipleWorld*.testArgsBad",
        "xfail@1",
        _NO_SPAWN,
    ),
    (
        "test_cffi.TestCFFI.testHandle*",
        "xfail",
        _NO_C_HANDLES + " (skipped where cffi is not installed)",
    ),
    (
        "test_ctypes.TestCTYPES.testHandle*",
        "xfail",
        _NO_C_HANDLES,
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testAttrEmpty",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testAttrNone",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testAttrType",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testDataMissing",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testDataNone",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testDataType",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testDataValue",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testDescrMissing",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testDescrNone",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testDescrType",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testDescrWarning",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testMask",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testNonContiguous",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testReadonly",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testShapeMissing",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testShapeNone",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testShapeType",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testStridesMissing",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testStridesNone",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testStridesType",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testTypestrEndian",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testTypestrItemsize",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testTypestrMissing",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testTypestrNone",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageCAIBuf.testTypestrType",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageRMA.testMessageCAIBuf",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleCAIBuf.testArray1",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleCAIBuf.testArray2",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleCAIBuf.testArray3",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleCAIBuf.testArray4",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleCAIBuf.testArray5",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleCAIBuf.testArray6",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleCAIBuf.testBuffer",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBuf.testArray1",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBuf.testArray2",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBuf.testArray3",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBuf.testArray4",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBuf.testArray5",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBuf.testArray6",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBuf.testBuffer",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBufV0.testArray1",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBufV0.testArray2",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBufV0.testArray3",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBufV0.testArray4",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBufV0.testArray5",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBufV0.testArray6",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageSimpleDLPackGPUBufV0.testBuffer",
        "xfail",
        "real limit: DLPack buffers in device memory",
    ),
    (
        "test_msgspec.TestMessageVectorCAIBuf.*",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_msgspec.TestMessageVectorW.testMessageCAIBuf",
        "xfail",
        "real limit: buffers behind __cuda_array_interface__ are device memory",
    ),
    (
        "test_objmodel.TestObjModel.test[AS]*Of",
        "xfail",
        _NO_C_HANDLES,
    ),
    (
        "test_package.TestMPIABI.testGetFromLibMPI",
        "xfail",
        "real limit: no libmpi to load (MPI.__file__ is Python)",
    ),
    (
        "test_package.TestMPIABI.testLibMPI",
        "xfail",
        "real limit: no libmpi to load (MPI.__file__ is Python)",
    ),
    (
        "test_util_dtlib.TestUtilDTLib.testStruct[12]",
        "skip",
        "slow: they pass, but their ~35,000 and ~72,000 numpy<->MPI struct round trips cost "
        "~8 s of CPU each per rank (half in mpi4py.util.dtlib itself, the rest in the "
        "datatype constructors, maps made lazily), past the 60 s per-test limit on a "
        "loaded 2-CPU machine at any rank count",
    ),
    ("test_util_pool.TestProcessPool.test_[!aeu]*", "xfail@1", _NO_POOL),
    ("test_util_pool.TestProcessPool.test_a[!r]*", "xfail@1", _NO_POOL),
    ("test_util_pool.TestProcessPool.test_empty_iterable", "xfail@1", _NO_POOL),
]
