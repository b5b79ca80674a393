"""No import loop between a package and its own modules: a package whose `__init__` imports its modules is never
imported back by them (`from melange_sky.controller import rules` inside controller/ would be one)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "melange_sky"


def _imported(path: Path) -> set[str]:
    """The modules a file imports, by absolute name (`from a.b import c` counts as importing `a.b`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def loops(root: Path) -> list[str]:
    """Modules under `root` (a package directory) that import their own package while its `__init__` imports
    modules of it."""
    found = []
    for init in sorted(root.rglob("__init__.py")):
        folder = init.parent
        name = ".".join((root.name, *folder.relative_to(root).parts))
        own = {imported for imported in _imported(init) if imported.startswith(f"{name}.")}
        if not own:
            continue
        for module in sorted(folder.glob("*.py")):
            if module.name not in ("__init__.py", "__main__.py") and name in _imported(module):
                found.append(f"{module.relative_to(root.parent)} imports {name}, whose __init__ imports "
                             f"{', '.join(sorted(own))}")
    return found


def test_no_module_imports_a_package_whose_init_imports_its_modules():
    assert loops(PACKAGE) == []


def test_the_check_finds_a_module_importing_its_own_package_back(tmp_path):
    folder = tmp_path / "melange_sky" / "room"
    folder.mkdir(parents=True)
    (tmp_path / "melange_sky" / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("from melange_sky.room.watch import Controller\n")
    (folder / "watch.py").write_text("from melange_sky.room import rules\n")
    (folder / "rules.py").write_text("import math\n")
    assert loops(tmp_path / "melange_sky") == [
        "melange_sky/room/watch.py imports melange_sky.room, whose __init__ imports melange_sky.room.watch"]
