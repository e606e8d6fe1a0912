"""The import rules of docs/ARCHITECTURE.md, read from the source of every module.

core <- broker, core <- guest, {core, broker, guest} <- lab; no package imports another
package's private (`_`-prefixed) names. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What each package may import of the project's packages (besides itself).
ALLOWED = {
    "ivshmem_comm": set(),
    "host_broker": {"ivshmem_comm"},
    "guest_lib": {"ivshmem_comm"},
    "ivshmem_lab": {"ivshmem_comm", "host_broker", "guest_lib"},
}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) of every import statement in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_their_layer_may(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    wrong = []
    for path in files:
        for line, module, names in _imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}"
            if top in ALLOWED and top != package and top not in ALLOWED[package]:
                wrong.append(f"{where} imports {module}")
            if top in ALLOWED and top != package:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                private += [p for p in module.split(".")[1:] if p.startswith("_")]
                if private:
                    wrong.append(f"{where} takes private {private} from {module}")
    assert not wrong, "\n".join(wrong)
