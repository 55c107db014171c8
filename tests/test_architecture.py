"""The house rules of ARCHITECTURE.md, held against the code.

Every ``import`` in ``nvmgr/`` is read with :mod:`ast` -- those inside
functions too, since a lazy import is still a dependency -- and checked:

- imports point down the layers; packages on one floor do not import each
  other; no cycles between modules;
- each outside library has one seam (libvirt: ``virt``; cryptography:
  ``crypto.cipher``; pyasn1: ``format.asn1``; lxml: ``domain``);
- no ``importlib.import_module`` / ``__import__`` tricks;
- the hook's whole import closure holds no libvirt and no pyasn1, read
  statically and seen at run time in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nvmgr"

#: Floors, top to bottom.  A module may import its own package and the
#: floors below its own, never a floor above nor a neighbour on its floor.
FLOORS: list[set[str]] = [
    {"cli"},
    {"hook", "virt"},
    {"provision"},
    {"domain", "image"},
    {"crypto"},
    {"format", "storage"},
    {"units", "resources", "paths", "forkserver"},
    {"errors", "data"},
]

#: Outside libraries and the only packages/modules allowed to import them.
SEAMS = {
    "libvirt": ("nvmgr.virt",),
    "cryptography": ("nvmgr.crypto.cipher",),
    "pyasn1": ("nvmgr.format.asn1",),
    "lxml": ("nvmgr.domain",),
}

#: The package's front doors import from every floor on purpose.
FACADES = {"nvmgr", "nvmgr.__main__"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Everything module *name* imports, anywhere in its body (absolute names)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            for a in node.names:  # "from nvmgr.cli import images": a submodule
                if f"{mod}.{a.name}" in MODULES:
                    found.add(f"{mod}.{a.name}")
    return found


IMPORTS = {name: _imports(name) for name in MODULES}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _floor(package: str) -> int:
    for i, floor in enumerate(FLOORS):
        if package in floor:
            return i
    raise AssertionError(f"nvmgr.{package} is on no floor of FLOORS: add it")


def test_every_package_has_a_floor() -> None:
    for name in MODULES:
        if name not in FACADES:
            _floor(_package(name))


def _points_down(name: str, target: str) -> bool:
    """May module *name* import *target*?"""
    if not target.startswith("nvmgr.") or _package(target) == _package(name):
        return True
    return _floor(_package(target)) > _floor(_package(name))


def test_imports_point_down() -> None:
    wrong = [f"{name} -> {target}"
             for name, imported in IMPORTS.items() if name not in FACADES
             for target in imported if not _points_down(name, target)]
    assert wrong == [], "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    # A submodule's import of its own package ("from nvmgr.cli import images"
    # in nvmgr.cli.app) is the package being set up, not a cycle.
    graph = {n: {t for t in IMPORTS[n]
                 if t in MODULES and t != n and not n.startswith(t + ".")}
             for n in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if t == "nvmgr" or n in FACADES:
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("library", sorted(SEAMS))
def test_each_library_has_one_seam(library: str) -> None:
    allowed = SEAMS[library]
    users = sorted(
        name for name, imported in IMPORTS.items()
        if any(t == library or t.startswith(library + ".") for t in imported)
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    )
    assert users == [], f"{library} imported outside {allowed}: {users}"


def test_no_dynamic_imports() -> None:
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "import_module":
                offenders.append(name)
            if isinstance(node, ast.Name) and node.id == "__import__":
                offenders.append(name)
    assert offenders == []


def _closure(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in MODULES:
            todo.extend(IMPORTS[n])
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = n.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return seen


HOOK_ENTRIES = ("nvmgr.hook.entry", "nvmgr.hook.lifecycle")
FORBIDDEN_IN_HOOK = ("libvirt", "pyasn1")


@pytest.mark.parametrize("entry", HOOK_ENTRIES)
def test_hook_import_closure_has_no_libvirt_and_no_pyasn1(entry: str) -> None:
    closure = _closure(entry)
    bad = sorted(m for m in closure
                 if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_HOOK))
    assert bad == [], f"{entry} reaches {bad}"
    assert not any(m.startswith("nvmgr.virt") for m in closure)


def test_hook_imports_no_libvirt_and_no_pyasn1_at_run_time() -> None:
    code = (
        "import sys\n"
        f"for m in {HOOK_ENTRIES!r}: __import__(m)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert "nvmgr.hook.lifecycle" in out  # the check saw the hook itself
    bad = [m for m in out if m.split(".")[0] in FORBIDDEN_IN_HOOK]
    assert bad == []


def test_the_floor_rule_tells_down_from_up_and_sideways() -> None:
    assert _points_down("nvmgr.hook.lifecycle", "nvmgr.provision.prepare")
    assert _points_down("nvmgr.image.image", "nvmgr.storage.container")
    assert not _points_down("nvmgr.format.model", "nvmgr.cli.app")  # up
    assert not _points_down("nvmgr.hook.lifecycle", "nvmgr.virt.conn")  # sideways
    assert not _points_down("nvmgr.domain.plan", "nvmgr.image.image")  # sideways
