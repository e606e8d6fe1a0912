"""The real mpi4py, for the hybrid route, whatever `mpi4py.MPI` answers with in this process.

In the zero-change mode (`guest_lib.mpi.mpi4py_shim`) `import mpi4py.MPI` gives this
project's module; the code that hands traffic between regions to MPICH must still reach
mpi4py's own extension module. `MPI()` returns it: the module bootstrap imported (recorded
here by `remember`), else mpi4py's, imported past the shim.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_real: list[ModuleType] = []


def remember(module: ModuleType) -> None:
    """Record mpi4py's own MPI module (bootstrap calls this under mpiexec)."""
    if not _real:
        _real.append(module)


def MPI() -> ModuleType:
    """mpi4py's own MPI extension module (ImportError when mpi4py is not installed)."""
    if _real:
        return _real[0]
    shown = sys.modules.get("mpi4py.MPI")
    if shown is not None and not shown.__name__.startswith("guest_lib."):
        remember(shown)
        return shown
    package = sys.modules.get("mpi4py")
    sys.modules.pop("mpi4py.MPI", None)
    try:
        module = importlib.import_module("mpi4py.MPI")
    finally:
        if shown is not None:  # the shim stays what `import mpi4py.MPI` answers
            sys.modules["mpi4py.MPI"] = shown
            if package is not None:
                package.MPI = shown  # type: ignore[attr-defined]
    remember(module)
    return module
