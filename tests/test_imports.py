"""The import graph of kvstore/, daemon/ and engines/, read from the source (no imports run):
no cycles between modules, and no layer imports one it must not.

Every ``import`` and ``from ... import`` counts, wherever it is: at the top, in a function
(a lazy import that only dodges a cycle is still the cycle), under ``try``, and under
``if TYPE_CHECKING:`` too (a type-only cycle is still two modules that each need the
other to be read). What does not count: a package's own ``__init__`` running before its
submodules (importing ``kvstore.tiers.dram`` runs ``kvstore/__init__.py``, which imports
the store: that is Python's package machinery, not a dependency of the DRAM tier).

``from a.b import c`` is an import of module ``a.b.c`` when there is one, else of ``a.b``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kvstore", "daemon", "engines")

# Who must not import whom: (importer, imported, why). A name covers the module and
# everything below it (``kvstore.tiers`` is kvstore/tiers/ and all its modules). Extend it
# as the layers land.
LAYERS: list[tuple[str, str, str]] = [
    ("kvstore", "daemon", "the library never imports the daemon"),
    ("kvstore", "engines", "the library never imports the engines (engines -> kvstore)"),
    ("kvstore.tiers", "kvstore.placement", "tiers are media; placement decides"),
    ("kvstore.tiers", "kvstore.store", "tiers are below the store"),
    ("kvstore.tiers", "kvstore.config", "a tier gets its own config, not StoreConfig"),
    ("kvstore.tiers", "kvstore.client", "tiers are below the client"),
    ("kvstore.tiers", "kvstore.wire", "tiers know no wire format"),
    ("kvstore.tiers", "kvstore.sim", "tiers know no simulator"),
    ("kvstore.shm", "kvstore.tiers", "shared memory is below the DRAM tier that uses it"),
    ("kvstore.shm", "kvstore.placement", "shared memory knows no placement"),
    ("kvstore.shm", "kvstore.store", "shared memory is below the store"),
    ("kvstore.shm", "kvstore.config", "shared memory is below the store"),
    ("kvstore.shm", "kvstore.client", "shared memory is below the client"),
    ("kvstore.shm", "kvstore.wire", "shared memory knows no wire format"),
    ("kvstore.placement", "kvstore.tiers", "placement decides; it moves no bytes"),
    ("kvstore.placement", "kvstore.shm", "placement decides; it moves no bytes"),
    ("kvstore.placement", "kvstore.store", "the store calls placement, not the reverse"),
    ("kvstore.placement", "kvstore.sim", "the simulator calls placement, not the reverse"),
    ("kvstore.placement", "kvstore.client", "placement knows no client"),
    ("kvstore.placement", "kvstore.wire", "placement knows no wire format"),
    ("kvstore.placement", "kvstore.config", "placement takes its rules, not StoreConfig"),
    ("kvstore.sim", "kvstore.store", "the simulator replays placement with no bytes"),
    ("kvstore.sim", "kvstore.tiers", "the simulator replays placement with no bytes"),
    ("kvstore.sim", "kvstore.client", "the simulator replays placement with no bytes"),
    ("kvstore.sim", "kvstore.cli", "the CLI calls the simulator, not the reverse"),
    ("kvstore.store", "kvstore.client", "the store is below the client and the daemon"),
    ("kvstore.store", "kvstore.wire", "the store knows no wire format"),
    ("kvstore.store", "kvstore.sim", "the store knows no simulator"),
    ("kvstore.store", "kvstore.cli", "the store is below the CLI"),
    ("kvstore.wire", "kvstore.store", "the wire format is shared by client and daemon"),
    ("kvstore.wire", "kvstore.client", "the wire format is shared by client and daemon"),
    ("kvstore.wire", "kvstore.placement", "the wire format knows no placement"),
    ("kvstore.client", "kvstore.store", "the client talks to a daemon, not to a Store"),
    ("kvstore.client", "kvstore.placement", "the client talks to a daemon"),
    ("kvstore.client", "kvstore.sim", "the client knows no simulator"),
    ("kvstore.cluster", "kvstore.store", "the pool's index is read and written over Redis"),
    ("kvstore.cluster", "kvstore.placement", "the pool's index is read and written over Redis"),
]

# Import edges (importer, imported) that close a known cycle, each to be deleted with the
# change that removes it. Nothing else may close a cycle.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}

# Imports that break a rule of LAYERS, known and on their way out; the same deal.
KNOWN_LAYER_BREAKS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name."""
    return {module_name(path): path for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(tree: ast.Module, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names ``tree`` imports: ``a.b`` for ``import a.b``, ``a.b.c`` for ``from
    a.b import c`` (the caller keeps its longest prefix that is a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the module is in
                package = module.split(".")
                if not is_package:
                    package = package[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                yield f"{base}.{alias.name}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports."""
    modules = source_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for imported in imported_names(tree, name, path.name == "__init__.py"):
            # The longest prefix that is one of ours: ``a.b.c`` (a module) or ``a.b`` (the
            # package, when ``c`` is a name in its __init__).
            parts = imported.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    if candidate != name:
                        targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def covers(layer: str, module: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (its first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_package_is_read(graph):
    for package in PACKAGES:
        assert package in graph, f"{package}/__init__.py was not found under {ROOT}"
    assert len(graph) > 50


def test_no_import_cycle(graph):
    pruned = {module: {target for target in targets
                       if (module, target) not in KNOWN_CYCLE_EDGES}
              for module, targets in graph.items()}
    cycle = find_cycle(pruned)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_known_edges_still_exist(graph):
    """An allowed edge that is gone must leave its allow-list with it."""
    for allowed in (KNOWN_CYCLE_EDGES, KNOWN_LAYER_BREAKS):
        gone = [edge for edge in allowed if edge[1] not in graph.get(edge[0], ())]
        assert not gone, f"no longer imported, delete from the allow-list: {gone}"


def test_layers(graph):
    broken = [f"{module} imports {target}: {why}"
              for module, targets in sorted(graph.items()) for target in sorted(targets)
              if (module, target) not in KNOWN_LAYER_BREAKS
              for importer, imported, why in LAYERS
              if covers(importer, module) and covers(imported, target)]
    assert not broken, "\n".join(broken)


def test_find_cycle_finds_a_cycle_and_names_it():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
