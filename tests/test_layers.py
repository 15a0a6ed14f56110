"""cnnkit's modules import downward only, and no two of them import each other (../shared/STYLE.md, "Layers").

The import graph is read from the source with ``ast`` (nothing is imported, no third-party tool): every
``import cnnkit.x``, ``from cnnkit import x``, ``from cnnkit.x import y`` and relative ``from .x import y``,
at module level and inside functions. Two rules:

- **Layers**: a module imports only modules of its own layer or of a lower one (``LAYERS``, lowest first).
  Function-level imports count: deferring an upward import to call time hides the dependency from the reader
  but not from the code. So do imports under ``if TYPE_CHECKING:``: an annotation naming a higher layer's type
  is still knowledge of that layer. Every module must be placed in a layer; an unplaced one fails too.
- **No circles**: no chain of imports leads from a module back to itself. Function-level imports count here
  as well (a circle closed inside a function is a circle dodged, not removed); ``TYPE_CHECKING`` imports do
  not (they never run). The one allowed exception is the model registry loading the model files that register
  themselves into it (``ALLOWED_CALL_TIME``), the registration idiom of timm's registry.

A failure names each offending edge as ``file:line importer -> imported``.
"""

from __future__ import annotations

import ast
import functools
import os
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "cnnkit"

# Lowest first. A name covers the module itself and, for a package, everything under it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("cnnkit", "cnnkit.errors", "cnnkit.strict_json", "cnnkit.atomic", "cnnkit.progress",
                     "cnnkit.choices", "cnnkit.compiled", "cnnkit.lazy", "cnnkit.modes", "cnnkit.threads",
                     "cnnkit.metadata", "cnnkit.runtime", "cnnkit.runs", "cnnkit.stages",
                     "cnnkit.torch_files")),
    ("models", ("cnnkit.models",)),
    # Saving and rebuilding a model needs only the registry; data checks, transfer, training, evaluation,
    # prediction, export, inspection and reports all read checkpoints.
    ("checkpoint", ("cnnkit.checkpoint",)),
    ("data", ("cnnkit.data",)),
    ("transfer", ("cnnkit.transfer",)),  # weights loading, freezing and stages: what training starts from
    ("train", ("cnnkit.train",)),
    # What uses a trained model: measuring, predicting, embedding, exporting, auditing its freezing.
    ("use", ("cnnkit.tta", "cnnkit.evaluate", "cnnkit.predict", "cnnkit.embed", "cnnkit.export", "cnnkit.audit")),
    ("inspect", ("cnnkit.inspect",)),
    ("report", ("cnnkit.report",)),
    # The public train() and lr_find(): the loop with the steps that show a run (TTA, plots, report, TensorBoard).
    ("training", ("cnnkit.training",)),
    ("cli", ("cnnkit.cli", "cnnkit.__main__")),
]

# (importer, function) whose call-time imports may close a circle: the registry imports the model files on first
# use, and each of them imports the registry to register its factories into it.
ALLOWED_CALL_TIME = {("cnnkit.models.registry", "_ensure_loaded")}


@dataclass(frozen=True)
class Edge:
    importer: str  # module name, cnnkit.train.loop
    imported: str
    path: str  # the importer's file, relative to the package's parent folder
    line: int
    module_level: bool  # runs when the importer is imported (not inside a function)
    type_only: bool  # under `if TYPE_CHECKING:`: never runs
    function: str | None  # the enclosing function's name for a call-time import

    def __str__(self) -> str:
        where = "" if self.module_level else (" (type checking only)" if self.type_only else f" (in {self.function})")
        return f"{self.path}:{self.line} {self.importer} -> {self.imported}{where}"


def module_files(root: str, package: str) -> dict[str, str]:
    """{module name: file path} for every .py file of ``package`` under ``root``."""
    files = {}
    for folder, dirs, names in os.walk(os.path.join(root, package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                files[".".join(parts)] = path
    return files


@functools.lru_cache(maxsize=None)
def parsed(root: str, package: str) -> dict[str, tuple[str, ast.Module]]:
    """{module name: (file path, syntax tree)}, read once per folder."""
    trees = {}
    for module, path in module_files(root, package).items():
        with open(path, encoding="utf-8") as f:
            trees[module] = (path, ast.parse(f.read(), path))
    return trees


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_edges(root: str, package: str) -> list[Edge]:
    """Every import of one of ``package``'s modules by another, read from the source."""
    files = module_files(root, package)
    edges: list[Edge] = []

    def target(name: str) -> str | None:
        """The module a dotted name refers to: itself, or the closest enclosing module (``cnnkit.x.func``)."""
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for module, (path, tree) in parsed(root, package).items():
        rel = os.path.relpath(path, root)
        is_package = os.path.basename(path) == "__init__.py"
        seen: set[tuple[str, int]] = set()  # `from x import a, b` is one edge

        def add(name: str, node: ast.stmt, function: str | None, type_only: bool) -> None:
            imported = target(name)
            key = (imported, node.lineno)
            if imported is not None and imported != module and key not in seen:
                seen.add(key)
                edges.append(Edge(module, imported, rel, node.lineno, function is None and not type_only,
                                  type_only, function))

        def visit(node: ast.AST, function: str | None, type_only: bool) -> None:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        add(alias.name, node, function, type_only)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the importer's package, one level up per extra dot
                    base = module if is_package else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if base == package or base.startswith(package + "."):
                    for alias in node.names:
                        # `from cnnkit.models import simple` imports a module; `from cnnkit.models import
                        # create_model` a name of the package itself.
                        sub = f"{base}.{alias.name}"
                        add(sub if sub in files else base, node, function, type_only)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, function, True)
                for child in node.orelse:
                    visit(child, function, type_only)
                return
            for child in ast.iter_child_nodes(node):
                inner = function
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    inner = function or getattr(node, "name", "<lambda>")
                visit(child, inner, type_only)

        visit(tree, None, False)
    return edges


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the most specific entry covering ``module``, or None when none does."""
    best, best_len = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name != PACKAGE and module.startswith(name + "."))
            if covers and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def upward_edges(edges: list[Edge]) -> list[str]:
    found = []
    for e in edges:
        low, high = layer_of(e.importer), layer_of(e.imported)
        if low is not None and high is not None and high > low:
            found.append(f"{e}: {LAYERS[low][0]} imports {LAYERS[high][0]}, a higher layer")
    return found


def circles(edges: list[Edge], allowed: set[tuple[str, str]] = frozenset()) -> list[list[Edge]]:
    """Each distinct elementary circle found by closing an edge a -> b with a shortest path b -> ... -> a.
    ``TYPE_CHECKING`` imports never run and do not count; call-time imports from ``allowed`` functions neither."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        if e.type_only or (e.importer, e.function) in allowed:
            continue
        first = graph.setdefault(e.importer, {}).get(e.imported)
        if first is None or (e.module_level and not first.module_level):  # show the module-level one if any
            graph[e.importer][e.imported] = e
    found, seen = [], set()
    for a in sorted(graph):
        for b, edge in sorted(graph[a].items()):
            # breadth-first from b back to a
            previous: dict[str, Edge | None] = {b: None}
            queue = [b]
            while queue and a not in previous:
                nxt = []
                for node in queue:
                    for succ, e in sorted(graph.get(node, {}).items()):
                        if succ not in previous:
                            previous[succ] = e
                            nxt.append(succ)
                queue = nxt
            if a not in previous:
                continue
            chain, node = [], a
            while previous[node] is not None:
                chain.append(previous[node])
                node = previous[node].importer
            cycle = [edge, *reversed(chain)]
            key = frozenset(e.importer for e in cycle)
            if key not in seen:
                seen.add(key)
                found.append(cycle)
    return found


def describe_circle(cycle: list[Edge]) -> str:
    kind = "at import time" if all(e.module_level for e in cycle) else "closed by a call-time import"
    return f"circle ({kind}):\n" + "\n".join(f"    {e}" for e in cycle)


# --- the rules, on cnnkit itself -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(ROOT, PACKAGE)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in module_files(ROOT, PACKAGE) if layer_of(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS in {__file__}; place each one: {', '.join(unplaced)}"


def test_imports_point_down(edges):
    found = upward_edges(edges)
    assert not found, f"{len(found)} upward import(s):\n" + "\n".join(found)


def test_no_import_circles(edges):
    found = circles(edges, ALLOWED_CALL_TIME)
    assert not found, f"{len(found)} import circle(s):\n" + "\n".join(describe_circle(c) for c in found)


# The calls that make a temporary file or move one over another: only cnnkit/atomic.py writes that way, so every
# file cnnkit writes atomically gets the same guarantees (same folder, ordinary permissions, fsync when durable).
RENAMING_CALLS = {("os", "replace"), ("os", "rename"), ("shutil", "move"), ("tempfile", "mkstemp"),
                  ("tempfile", "NamedTemporaryFile")}


def renaming_calls(root: str, package: str) -> list[str]:
    """``file:line module.function`` of each call in RENAMING_CALLS outside ``package``/atomic.py."""
    found = []
    for module, (path, tree) in parsed(root, package).items():
        if module == f"{package}.atomic":
            continue
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and (func.value.id, func.attr) in RENAMING_CALLS):
                found.append(f"{os.path.relpath(path, root)}:{node.lineno} {func.value.id}.{func.attr}")
    return found


def test_one_atomic_write():
    found = renaming_calls(ROOT, PACKAGE)
    assert not found, ("write through cnnkit.atomic (atomic_path, atomic_write, atomic_torch_save) instead of "
                       "another temp-then-rename:\n" + "\n".join(found))


def test_the_graph_is_read_at_all(edges):
    # A parser that found no edges would pass every rule above.
    pairs = {(e.importer, e.imported) for e in edges}
    assert ("cnnkit.data.loader", "cnnkit.data.sources") in pairs
    assert ("cnnkit.cli", "cnnkit.errors") in pairs
    assert len(edges) > 200


# --- the reader and the rules, on a small package written here -------------------------------------------------

def write_package(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_every_form_of_import_is_read(tmp_path, monkeypatch):
    write_package(tmp_path, {
        "cnnkit/__init__.py": "",
        "cnnkit/errors.py": "",
        "cnnkit/models/__init__.py": "from .registry import create_model\n",
        "cnnkit/models/registry.py": "def create_model(): pass\n",
        "cnnkit/models/simple.py": "from . import registry\nfrom ..errors import UserError\n",
        "cnnkit/data/__init__.py": "",
        "cnnkit/data/loader.py": (
            "import os\nimport cnnkit.errors\nfrom cnnkit import models\nfrom cnnkit.models import simple\n"
            "from cnnkit.models.registry import create_model\n"
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cnnkit.train import loop\n"
            "def f():\n    import cnnkit.train.loop as l\n"
            "class C:\n    def g(self):\n        from cnnkit.train.loop import run\n"),
        "cnnkit/train/__init__.py": "",
        "cnnkit/train/loop.py": "from cnnkit.data.loader import f\ndef run(): pass\n",
    })
    edges = {(e.importer, e.imported, e.line, e.module_level, e.type_only, e.function)
             for e in import_edges(str(tmp_path), "cnnkit")}
    assert edges == {
        ("cnnkit.models", "cnnkit.models.registry", 1, True, False, None),
        ("cnnkit.models.simple", "cnnkit.models.registry", 1, True, False, None),
        ("cnnkit.models.simple", "cnnkit.errors", 2, True, False, None),
        ("cnnkit.data.loader", "cnnkit.errors", 2, True, False, None),
        ("cnnkit.data.loader", "cnnkit.models", 3, True, False, None),
        ("cnnkit.data.loader", "cnnkit.models.simple", 4, True, False, None),
        ("cnnkit.data.loader", "cnnkit.models.registry", 5, True, False, None),
        ("cnnkit.data.loader", "cnnkit.train.loop", 8, False, True, None),
        ("cnnkit.data.loader", "cnnkit.train.loop", 10, False, False, "f"),
        ("cnnkit.data.loader", "cnnkit.train.loop", 13, False, False, "g"),
        ("cnnkit.train.loop", "cnnkit.data.loader", 1, True, False, None),
    }
    found = import_edges(str(tmp_path), "cnnkit")
    loader = os.path.join("cnnkit", "data", "loader.py")
    assert upward_edges(found) == [
        f"{loader}:{where}: data imports train, a higher layer" for where in (
            "8 cnnkit.data.loader -> cnnkit.train.loop (type checking only)",
            "10 cnnkit.data.loader -> cnnkit.train.loop (in f)",
            "13 cnnkit.data.loader -> cnnkit.train.loop (in g)")]
    # data.loader -> train.loop at call time and train.loop -> data.loader at import time; the TYPE_CHECKING one
    # alone would not be a circle.
    (cycle,) = circles(found)
    assert {(e.importer, e.imported) for e in cycle} == {("cnnkit.data.loader", "cnnkit.train.loop"),
                                                        ("cnnkit.train.loop", "cnnkit.data.loader")}
    assert "closed by a call-time import" in describe_circle(cycle)
    assert not circles(found, {("cnnkit.data.loader", "f"), ("cnnkit.data.loader", "g")})


def test_an_unplaced_module_is_named(tmp_path, monkeypatch):
    write_package(tmp_path, {"cnnkit/__init__.py": "", "cnnkit/utils.py": "", "cnnkit/errors.py": ""})
    assert [m for m in module_files(str(tmp_path), "cnnkit") if layer_of(m) is None] == ["cnnkit.utils"]


@pytest.mark.parametrize("module,layer", [("cnnkit", "foundations"), ("cnnkit.models.torchvision", "models"),
                                          ("cnnkit.checkpoint", "checkpoint"), ("cnnkit.train.loop", "train"),
                                          ("cnnkit.report.html", "report"), ("cnnkit.cli", "cli")])
def test_layer_of(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
