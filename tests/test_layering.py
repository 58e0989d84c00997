"""The package layering of ``autossl`` (documentation/architecture.md, "Layers").

Every ``import`` / ``from ... import`` in every module of ``autossl/`` is read with ``ast``:
at module level, inside functions and classes, under ``if TYPE_CHECKING:`` and in ``try:``
blocks alike (a function-local import does not make an upward dependency go away, it only hides
it), plus ``importlib.import_module("autossl....")`` with a literal name. Two rules:

* a package imports only from its own package and from packages in layers below its own, never
  from a package above it nor from a sibling in its own layer;
* no two modules of ``autossl`` import each other, directly or through others.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import autossl

#: bottom to top. A package may import from the layers below its own only; packages of one layer
#: are independent of each other, except the packages of one tuple inside a layer, which form one
#: unit (planning's plans handler resolves preprocessing's resampling functions by name and the
#: preprocessor reads the plans through it: the two are the one plan-and-preprocess step).
LAYERS: tuple[tuple[str | tuple[str, ...], ...], ...] = (
    ("paths",),                                         # where the data lives
    ("utilities",),                                     # file I/O, labels, dataset names, registries
    ("imageio", "networks"),                            # image readers/writers; network builders
    ("raw",),                                           # a raw dataset and its checks
    (("planning", "preprocessing"),),                   # plans and the preprocessed cases
    ("fingerprint", "evaluation", "inference", "components"),  # components: what the stages share
    ("postprocessing", "ensembling"),
    ("ssl", "pretraining"),                             # semi-supervised plug-ins; pre-training stage
    ("training",),                                      # the trainer, which runs the plug-ins
    ("model_selection",),                               # the best configuration after training
    ("cli", "demo"),                                    # the commands
)

ROOT = Path(autossl.__file__).resolve().parent


def _units() -> dict[str, tuple[int, frozenset[str]]]:
    """package -> (layer index, the packages of its unit)."""
    out = {}
    for i, layer in enumerate(LAYERS):
        for unit in layer:
            members = frozenset((unit,) if isinstance(unit, str) else unit)
            for p in members:
                assert p not in out, f"{p} is declared twice in LAYERS"
                out[p] = (i, members)
    return out


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    base = ROOT.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, the statement) for every import of ``autossl`` in the file, at any depth."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import module`` depends on pkg.module, ``from module import name`` on module
            targets = [f"{mod}.{a.name}" if _is_module(f"{mod}.{a.name}") else mod for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            targets = [node.args[0].value]
        else:
            continue
        for t in targets:
            if t == "autossl" or t.startswith("autossl."):
                found.append((node.lineno, t, ast.get_source_segment(text, node) or ast.unparse(node)))
    return sorted(set(found))


def all_modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _package(module: str) -> str | None:
    """``autossl.training.trainer`` -> ``training``; ``autossl.paths`` -> ``paths``; the root -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layering_violations() -> list[str]:
    units = _units()
    bad = []
    for path in all_modules():
        src = _package(module_name(path))
        if src is None:
            continue
        layer, unit = units[src]
        for line, target, stmt in imports_of(path):
            dst = _package(target)
            if dst is None or dst in unit:
                continue
            if dst not in units:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {stmt!r}: {dst} is not declared in LAYERS")
                continue
            dst_layer = units[dst][0]
            if dst_layer > layer:
                why = f"{src} (layer {layer}) imports from {dst} above it (layer {dst_layer})"
            elif dst_layer == layer:
                why = f"{src} imports from {dst}, its sibling in layer {layer}"
            else:
                continue
            bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {stmt!r}: {why}")
    return bad


def import_cycles() -> list[list[str]]:
    """The strongly connected components (more than one module) of the module import graph."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in all_modules():
        me = module_name(path)
        for _, target, _ in imports_of(path):
            # ``import autossl.a.b`` runs autossl/a/__init__.py too, which matters only if it imports
            if target != me and _is_module(target):
                graph[me].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_package_is_declared_and_exists():
    declared = set(_units())
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    on_disk |= {p.stem for p in ROOT.glob("*.py") if p.name != "__init__.py"}
    assert on_disk - declared == set(), "packages missing from LAYERS (place them in a layer)"
    assert declared - on_disk == set(), "LAYERS names packages that no longer exist"


def test_packages_import_only_downwards():
    bad = layering_violations()
    assert not bad, "imports against the layering (documentation/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    cycles = import_cycles()
    assert not cycles, "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_local_and_type_checking_imports(tmp_path, monkeypatch):
    """A hidden upward import is still an import."""
    pkg = tmp_path / "autossl"
    (pkg / "ssl").mkdir(parents=True)
    (pkg / "training").mkdir()
    for p in (pkg, pkg / "ssl", pkg / "training"):
        (p / "__init__.py").write_text("")
    (pkg / "training" / "trainer.py").write_text("X = 1\n")
    (pkg / "ssl" / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from autossl.training.trainer import X\n"
        "def f():\n    from ..training import trainer\n    import importlib\n"
        "    importlib.import_module('autossl.training.trainer')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    found = imports_of(pkg / "ssl" / "m.py")
    assert [(line, t) for line, t, _ in found] == [(3, "autossl.training.trainer"), (5, "autossl.training.trainer"),
                                                   (7, "autossl.training.trainer")]
