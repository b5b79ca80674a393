"""The house rules of the package layout, checked on the source itself (README, Development).

`lint-imports` checks the rooms' layers; these check what it does not: no cycle between any two modules (imports
inside functions count, `if TYPE_CHECKING:` blocks do not), one module imports SkyPilot, and `--help` pays for
neither SkyPilot nor the solver.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "melange_sky"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_two_modules_import_each_other_even_through_function_level_imports():
    graph = grimp.build_graph("melange_sky", exclude_type_checking_imports=True)
    # A package's __init__ importing its own submodules (to register or re-export them) is not a cycle of concerns.
    for package in ("melange_sky", "melange_sky.cli"):
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=package, imported=child):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def test_sky_is_imported_by_one_module_only():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "sky" or n.startswith("sky.") for n in names):
                importers.add(path.relative_to(PACKAGE).as_posix())
    assert importers == {"fleet/skypilot.py"}


def test_help_imports_neither_skypilot_nor_the_solver():
    code = ("import sys; from melange_sky.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('sky', 'pulp', 'highspy', 'jinja2', 'aiohttp', 'matplotlib')\n"
            "             if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_command_loads_only_its_own_module_of_the_cli():
    """`melange-sky solve` is the command scripts run most: it must not pay for the simulator, the router's server or
    the other commands' imports."""
    code = ("import sys; from melange_sky.cli import main\n"
            "try:\n    main(['solve', 'examples/example.json', '-o', '/dev/null'])\nexcept SystemExit:\n    pass\n"
            "names = [m for m in sys.modules if m.startswith('melange_sky.')]\n"
            "print(sorted({m.split('.')[2] for m in names if m.startswith('melange_sky.cli.')}))\n"
            "print(sorted({m.split('.')[1] for m in names if m.count('.') > 1}), 'aiohttp' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PACKAGE.parent)
    cli_modules, rooms = done.stdout.strip().splitlines()[-2:]
    assert cli_modules == "['main', 'options', 'plan', 'text']"
    assert "'sim'" not in rooms and rooms.endswith("False"), rooms


def test_public_names_are_not_shadowed_by_the_rooms_whatever_was_imported_first():
    code = ("import melange_sky.solver.result, melange_sky.deploy.plan, melange_sky.fleet.fleet\n"
            "import melange_sky\n"
            "print(sorted(n for n in melange_sky.__all__ if type(getattr(melange_sky, n)).__name__ == 'module'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
