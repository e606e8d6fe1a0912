"""Zero-change mode: `import mpi4py.MPI` answers with this project's MPI in this process.

Programs written for mpi4py (`from mpi4py import MPI`, `from mpi4py.util import pkl5`,
`from mpi4py.futures import ...`) then run on `guest_lib.mpi` unmodified: `install()` makes
`sys.modules["mpi4py.MPI"]` and the `mpi4py` package's `MPI` attribute this project's
module, so mpi4py's pure-Python parts (`mpi4py.util`, `mpi4py.futures`, `mpi4py.run`) sit on
top of it too, as far as the names they use exist. The hybrid route (ranks outside this
process's region, under mpiexec) keeps reaching mpi4py's own extension module through
`guest_lib.mpi.native`, which bootstrap imported before the switch.

Entered by `python -m guest_lib.mpi prog.py` and by the ranks `ivshmem-run` starts;
IVSHMEM_MPI_ZERO_CHANGE=0 in the environment turns it off (then `mpi4py` is mpi4py).
"""

from __future__ import annotations

import os
import sys
import types

ENV_SWITCH = "IVSHMEM_MPI_ZERO_CHANGE"


def enabled() -> bool:
    """False when IVSHMEM_MPI_ZERO_CHANGE=0 (or "no", "off", "false") is set."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "no", "off", "false")


def install() -> types.ModuleType:
    """Bootstrap this project's MPI (if not yet done) and make it `mpi4py.MPI` in this
    process. Returns the module. Idempotent. Without mpi4py installed, a bare `mpi4py`
    package holding only `MPI` stands in (mpi4py.util and mpi4py.futures need mpi4py)."""
    from guest_lib.mpi import MPI as ours  # bootstraps; under mpiexec records mpi4py's own

    try:
        import mpi4py as package
    except ImportError:
        package = types.ModuleType("mpi4py", "mpi4py's names over guest_lib.mpi")
        package.__path__ = []
        sys.modules["mpi4py"] = package
    sys.modules["mpi4py.MPI"] = ours
    package.MPI = ours  # type: ignore[attr-defined]
    return ours


def installed() -> bool:
    """True iff `mpi4py.MPI` is this project's module in this process."""
    module = sys.modules.get("mpi4py.MPI")
    return module is not None and module.__name__ == "guest_lib.mpi.MPI"
