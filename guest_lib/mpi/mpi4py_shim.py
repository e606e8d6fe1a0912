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

mpi4py.futures: `python -m mpi4py.futures prog.py` (its shared pool over COMM_WORLD:
rank 0 runs the program, the other ranks are the workers) runs as with mpi4py. An
`MPIPoolExecutor` used outside that mode would start its workers with `Spawn` (or connect
to a service), which this MPI does not offer: its manager thread would die and every
`result()` wait for ever. Once `mpi4py.futures._core` is imported, its spawn and service
managers are wrapped so that the executor is marked broken instead: `submit` and the
futures raise `BrokenExecutor` with the reason, which also goes to stderr at once (mpi4py's
demo/futures/run_cpi.py asks `executor.num_workers` first, which is then None, and fails
with a TypeError that says nothing of Spawn).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Any

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
    core = sys.modules.get(_FUTURES_CORE)
    if core is not None:
        _guard_managers(core)
    elif not any(isinstance(finder, _FuturesHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FuturesHook())
    return ours


_FUTURES_CORE = "mpi4py.futures._core"
_NO_POOL = (
    "MPIPoolExecutor needs Spawn (or an MPI service) to start its workers, which "
    "guest_lib.mpi does not offer: run the program as `ivshmem-run -n N python -m "
    "mpi4py.futures prog.py` (rank 0 runs it, the other ranks are the workers)"
)


def _guard_managers(core: types.ModuleType) -> None:
    """Wrap mpi4py.futures' spawn and service managers (see the module docstring)."""
    for name in ("_manager_spawn", "_manager_service"):
        manager = getattr(core, name, None)
        if manager is None or getattr(manager, "_guarded", False):
            continue

        def guarded(pool: Any, options: Any, _manager: Any = manager) -> None:
            try:
                _manager(pool, options)
            except Exception as exc:
                reason = f"{_NO_POOL} ({type(exc).__name__}: {exc})"
                print(f"mpi4py.futures: {reason}", file=sys.stderr, flush=True)
                pool.broken(reason)

        guarded._guarded = True  # type: ignore[attr-defined]
        setattr(core, name, guarded)


class _FuturesHook(importlib.abc.MetaPathFinder):
    """Wraps mpi4py.futures._core's managers right after it is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _FUTURES_CORE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            run(module)
            _guard_managers(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def installed() -> bool:
    """True iff `mpi4py.MPI` is this project's module in this process."""
    module = sys.modules.get("mpi4py.MPI")
    return module is not None and module.__name__ == "guest_lib.mpi.MPI"
