"""The daemon's packages call one way (docs/architecture.md, "Packages"): each module may import
only from its own package or a lower layer, and no module imports itself back through others.

Checked on the source with ``ast``, so a new upward import fails here before it can form a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DAEMON = Path(__file__).resolve().parents[2] / "daemon" / "weightcache_daemon"
CLIENT = Path(__file__).resolve().parents[2] / "client" / "weightcache"

# Lowest first. A module's layer is that of its package (or, at the top level, its own name).
LAYERS: dict[str, int] = {
    "uris": 0,
    "safetensors_format": 0,
    "records": 1,
    "config": 1,
    "observe": 2,
    "storage": 2,
    "sources": 2,
    "ingest": 3,
    "cache": 4,
    "edges": 5,
    "cli": 5,
    "server": 6,
    "main": 7,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(DAEMON.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every weightcache_daemon module this file imports (``from X import y`` counts X.y when
    that is a module, else X)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "weightcache_daemon":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the daemon uses absolute imports only")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "weightcache_daemon")
    return out


MODULES = {module_name(p): p for p in DAEMON.rglob("*.py")}


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself (version re-export)
        return "weightcache_daemon", 0
    unit = parts[1]
    if unit not in LAYERS:
        raise AssertionError(f"{module}: package or module {unit!r} has no layer in LAYERS; add it to the table")
    return unit, LAYERS[unit]


def test_every_module_has_a_layer() -> None:
    for m in MODULES:
        layer_of(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_sideways_within_the_package(module: str) -> None:
    unit, level = layer_of(module)
    for target in sorted(imports_of(MODULES[module])):
        t_unit, t_level = layer_of(target)
        assert t_unit == unit or t_level < level, (
            f"{module} (layer {level}, {unit}) imports {target} (layer {t_level}, {t_unit}): "
            "a package may import only its own modules and lower layers"
        )


def test_no_import_circles() -> None:
    graph = {m: {t for t in imports_of(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = [*path[path.index(t) :], t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_client_never_imports_the_daemon() -> None:
    for p in CLIENT.rglob("*.py"):
        if "v1" in p.relative_to(CLIENT).parts:
            continue
        tree = ast.parse(p.read_text(), str(p))
        for node in ast.walk(tree):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for n in names:
                assert not n.startswith("weightcache_daemon"), f"{p}: the client imports {n}"
