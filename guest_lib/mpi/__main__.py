"""`python -m guest_lib.mpi [--native-mpi4py] (prog.py | -m module | -c command) [args...]`.

Runs a program written for mpi4py on this project's MPI, as `python -m mpi4py` runs one on
mpi4py's: `from mpi4py import MPI` in it gets `guest_lib.mpi.MPI` (see `mpi4py_shim`),
unless --native-mpi4py is given or IVSHMEM_MPI_ZERO_CHANGE=0 is set. The program sees
`sys.argv` = [prog.py or module or "-c", args...] and runs as `__main__`; its exit status is
the process's. An uncaught exception ends this rank at once (peers then fail instead of
waiting on it, and `ivshmem-run` or mpiexec ends the others).
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m guest_lib.mpi [--native-mpi4py] (prog.py | -m module | -c cmd) [args]"


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default sys.argv[1:]) and run the program; SystemExit(2) on bad use."""
    from guest_lib.mpi import mpi4py_shim

    args = list(sys.argv[1:] if argv is None else argv)
    shim = mpi4py_shim.enabled()
    if args[:1] == ["--native-mpi4py"]:
        shim = False
        args = args[1:]
    if not args or (args[0] in ("-m", "-c") and len(args) < 2):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if shim:
        mpi4py_shim.install()
    if args[0] == "-m":
        sys.argv[:] = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv[:] = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv[:] = args
        sys.path[0] = os.path.dirname(os.path.realpath(args[0]))
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
