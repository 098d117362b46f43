"""The house drawn from the code's imports: layers point one way, Ray lives in runtime/ only, the
kernel does no I/O, and no module imports itself back through another.

Every `import` statement counts, also one inside a function (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ken_dist

ROOT = Path(ken_dist.__file__).parent

# layer -> the layers it may import (itself always allowed; "errors" is everyone's)
ALLOWED = {
    "errors": set(),
    "checkpoints": set(),
    "kernel": {"checkpoints.dtypes"},  # pure: only the dtype tables, no file access
    "store": {"checkpoints"},
    "job": {"checkpoints", "kernel", "store"},
    "runtime": {"checkpoints", "kernel", "store", "job"},
    "subnetwork": {"checkpoints", "store"},
    "viz": {"checkpoints", "store", "subnetwork"},
    "testing": {"checkpoints"},
    "cli": {"checkpoints", "kernel", "store", "job", "runtime", "subnetwork", "viz", "testing"},
}
# third-party and standard modules the kernel may import: compute only, nothing that reads files
KERNEL_IMPORTS = {"__future__", "numpy", "numba", "torch", "math", "functools", "dataclasses", "typing",
                  "numbers", "collections"}
NO_RAY = {"errors", "checkpoints", "kernel", "store", "job", "subnetwork", "viz", "testing"}


def _module_name(path: Path) -> str:
    parts = ["ken_dist", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in module `name`, relative imports resolved and
    `from pkg import submodule` taken as the submodule."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "ken_dist" or len(parts) == 1:
        return None
    return parts[1]


def _allowed(src_layer: str, target: str) -> bool:
    dst = target.split(".")[1:]
    if dst[0] in (src_layer, "errors"):
        return True
    return any(dst[: len(a.split("."))] == a.split(".") for a in ALLOWED[src_layer])


def test_every_module_belongs_to_a_known_layer():
    strays = [m for m in MODULES if m != "ken_dist" and _layer(m) not in ALLOWED]
    assert not strays, f"modules outside the layers {sorted(ALLOWED)}: {strays}"


def test_imports_point_one_way():
    bad = []
    for name in MODULES:
        layer = _layer(name)
        if layer is None:
            continue
        for target, line in _imports(name):
            if target == "ken_dist":
                continue  # the package root: __version__ and KenError only (checked below)
            if _layer(target) and not _allowed(layer, target):
                bad.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_package_root_is_only_imported_for_its_version_and_error():
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ken_dist" and not node.level:
                names = {a.name for a in node.names}
                if not names <= {"__version__", "KenError"}:
                    bad.append(f"{name}: from ken_dist import {sorted(names)}")
    assert not bad, bad


def test_ray_is_imported_only_by_the_runtime():
    bad = [f"{name}:{line}" for name in MODULES if _layer(name) in NO_RAY
           for target, line in _imports(name) if target.split(".")[0] == "ray"]
    assert not bad, f"`import ray` outside ken_dist/runtime/ and ken_dist/cli/: {bad}"


def test_the_kernel_does_no_io():
    bad = [f"{name}:{line} imports {target}" for name in MODULES if _layer(name) == "kernel"
           for target, line in _imports(name)
           if _layer(target) is None and target.split(".")[0] not in KERNEL_IMPORTS]
    assert not bad, "the kernel imports more than compute libraries:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {t for t, _ in _imports(name) if t in MODULES and t != name} for name in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("bad_import, layer", [("ken_dist.runtime.driver", "store"),
                                               ("ken_dist.store.protocol", "kernel"),
                                               ("ken_dist.cli.commands", "job")])
def test_the_layer_check_can_fail(bad_import, layer):
    assert not _allowed(layer, bad_import)
