"""The import structure of `kvbm_shm`, read with `ast` from every module (new packages included,
found by walking the tree): no import cycle between modules, and none of the imports the design
forbids. Imports inside functions and under `if TYPE_CHECKING:` count: a lazy import is still a
dependency.

Layers (README "Code layout"):
- the core (`CORE`) imports nothing outside the core;
- `kernels` (copy engines) know no policy: they import only the core;
- `control` (the coordinator), `workers` and `client` never import each other;
- `cluster` (the G4 machinery) never imports `control`, `workers` or `client`: the cluster tier
  in `control` drives it;
- `control` never imports `integrations` or `cli`, and of `device` only what describes or names
  engine memory without touching it (`DEVICE_FOR_CONTROL`): the export side and the handle
  importers (`device.client`, `device.ipc`, `device.cuda_ipc`, `device.fd_passing`) are
  engine-side or worker-side;
- nothing but `cli` (and `__main__`, its entry point) imports `cli`, and nothing outside
  `integrations` and `cli` imports `integrations`.
The root package is the lazy public facade (its re-exports import on first attribute access):
importing it (for `__version__`) is allowed, and it may import no module eagerly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvbm_shm

ROOT = Path(kvbm_shm.__file__).parent
PKG = "kvbm_shm"
CORE = {"config", "errors", "hashing", "layout", "protocol", "shm", "ownership", "runtime", "eviction", "names", "_hashing",
        "hash_index"}
DEVICE_FOR_CONTROL = {"kvbm_shm.device", "kvbm_shm.device.view", "kvbm_shm.device.standin"}


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_names()


def _resolve(name: str) -> str | None:
    """The kvbm_shm module `name` refers to (a module, else its package), or None if outside."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path) -> set[str]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" for a in node.names]  # a submodule, or a name in `prefix`
        else:
            continue
        for target in targets:
            if target == PKG or target.startswith(PKG + "."):
                resolved = _resolve(target)
                if resolved is not None and resolved != module:
                    out.add(resolved)
    return out


GRAPH = {module: imports_of(module, path) for module, path in MODULES.items()}


def part(module: str) -> str:
    """The layer a module belongs to: "core", "root", or its first component (control, disk, ...)."""
    rest = module.split(".")[1:]
    if not rest:
        return "root"
    return "core" if rest[0] in CORE else rest[0]


def test_the_tree_is_read():
    assert {"kvbm_shm.control.coordinator", "kvbm_shm.eviction", "kvbm_shm.disk.index"} <= set(MODULES)
    assert "kvbm_shm.control.tier" in GRAPH["kvbm_shm.control.devices"]
    assert "kvbm_shm.protocol" in GRAPH["kvbm_shm.control.coordinator"]  # `from .. import protocol as p`


def test_no_import_cycles():
    """Tarjan's strongly connected components: any component of more than one module is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def forbidden(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported`, or None."""
    a, b = part(importer), part(imported)
    if a == b:
        return None
    if b == "root":
        return "the root package imports no module eagerly" if a == "root" else None
    if a in ("root", "__main__"):  # the facade (lazy) and `python -m kvbm_shm` (the cli's entry point)
        return None
    if a == "core":
        return "the core imports nothing above it"
    if a == "kernels" and b != "core":
        return "kernels know no policy: they import only the core"
    if {a, b} <= {"control", "workers", "client"}:
        return "control, workers and client meet only through the core"
    if a == "cluster" and b in ("control", "workers", "client"):
        return "the G4 machinery is driven by control's cluster tier, never the other way"
    if a == "control" and b == "device" and imported not in DEVICE_FOR_CONTROL:
        return "control never imports engine- or worker-side device code"
    if b == "cli":
        return "nothing but cli imports cli"
    if b == "integrations" and a != "cli":
        return "only cli imports integrations"
    return None


def test_no_forbidden_imports():
    bad = [f"{importer} -> {imported}: {why}" for importer, targets in sorted(GRAPH.items())
           for imported in sorted(targets) if (why := forbidden(importer, imported))]
    assert not bad, "\n".join(bad)


def test_the_rules_catch_what_they_name():
    assert forbidden("kvbm_shm.control.devices", "kvbm_shm.device.client")
    assert forbidden("kvbm_shm.control.devices", "kvbm_shm.device.ipc")
    assert not forbidden("kvbm_shm.control.devices", "kvbm_shm.device.view")
    assert forbidden("kvbm_shm.workers.transfer", "kvbm_shm.control.pool")
    assert forbidden("kvbm_shm.client", "kvbm_shm.workers.base")
    assert forbidden("kvbm_shm.eviction", "kvbm_shm.disk.index")
    assert forbidden("kvbm_shm.kernels.cpu_copy", "kvbm_shm.disk.format")
    assert forbidden("kvbm_shm.cluster.peers", "kvbm_shm.integrations.sglang.connector")
    assert not forbidden("kvbm_shm.control.cluster_tier", "kvbm_shm.cluster.peers")
    assert forbidden("kvbm_shm.cluster.node", "kvbm_shm.control.pool")
    assert not forbidden("kvbm_shm.control.metrics", "kvbm_shm")
