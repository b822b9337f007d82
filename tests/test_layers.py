"""Imports point one way: a lower layer never imports a higher one, not even inside a function.

The layers, lowest first (a module may import its own layer and the ones below):

0. kernels — ``hsae_runtime.kernels.*``: fused CPU / Triton kernels and their torch references.
1. core — the package root, ``errors``, ``config``, ``format``, ``sparse_encoder``, ``sae``,
   ``loss``, ``gguf``, ``lm``: the model, its file, its loss and the LM it reads.
2. training, exporters and features — ``hsae_runtime.training.*`` (``training/``),
   ``hsae_runtime.exporters.*`` (``exporters/``) and ``hsae_runtime.features.*``: build SAEs,
   move them between formats, and describe their latents.
3. serving — ``hsae_runtime.serving.*`` and ``onnx_backend`` (the ONNX Runtime backend the
   server runs, whose graphs ``exporters.onnx`` builds).
4. client — ``hsae_runtime.client`` and ``client_results``: talks to a server through the
   generated stubs.
5. apps — ``hsae_runtime.cli.*`` and ``hsae_runtime.demo`` (which drives train, serve and the
   client end to end).

Every ``import`` / ``from ... import`` anywhere in a module counts (top level, functions,
``TYPE_CHECKING`` blocks). Generated protobuf code (``serving/pb``) is skipped. The same imports
must form no cycle, within a layer too (:func:`test_no_import_cycle`).

Why a test and not an ``import-linter`` contract: import-linter reads only the imports Python
runs at import time of the installed package, while the layers here also bind imports inside
functions (the CLI's lazy imports and the package root's lazy names are exactly where an
upward import would hide), and this file needs no extra dependency or config to run in CI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> import name (setuptools maps training/ and exporters/ under hsae_runtime).
PACKAGES = {
    "hsae_runtime": "hsae_runtime",
    "training": "hsae_runtime.training",
    "exporters": "hsae_runtime.exporters",
}
LAYERS: dict[str, int] = {
    "hsae_runtime.kernels": 0,
    "hsae_runtime": 1,  # the package root and every core module not named below
    "hsae_runtime.training": 2,
    "hsae_runtime.exporters": 2,
    "hsae_runtime.features": 2,
    "hsae_runtime.serving": 3,
    "hsae_runtime.onnx_backend": 3,
    "hsae_runtime.client": 4,
    "hsae_runtime.client_results": 4,
    "hsae_runtime.cli": 5,
    "hsae_runtime.demo": 5,
}
# (importer, imported) pairs allowed against the layers, each with its reason. Keep it empty.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` named in :data:`LAYERS`."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path, module: str) -> set[str]:
    """Every ``hsae_runtime...`` module imported anywhere in the file (relative ones resolved)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == "hsae_runtime")
    return found


def all_modules() -> list[tuple[Path, str]]:
    files = []
    for folder in PACKAGES:
        for path in sorted((REPO / folder).rglob("*.py")):
            if "pb" in path.relative_to(REPO).parts:
                continue
            files.append((path, module_name(path)))
    return files


def test_every_module_has_a_layer():
    modules = all_modules()
    assert len(modules) > 30
    for _, module in modules:
        layer_of(module)


@pytest.mark.parametrize("path,module", all_modules(), ids=[m for _, m in all_modules()])
def test_no_upward_import(path: Path, module: str):
    mine = layer_of(module)
    upward = sorted(
        f"{module} (layer {mine}) imports {target} (layer {layer_of(target)})"
        for target in project_imports(path, module)
        if layer_of(target) > mine and (module, target) not in KNOWN_EXCEPTIONS
    )
    assert not upward, "\n".join(upward)


def test_the_check_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from hsae_runtime.cli import app\n    return app\n")
    assert project_imports(source, "hsae_runtime.sae") == {"hsae_runtime.cli"}
    assert layer_of("hsae_runtime.cli") > layer_of("hsae_runtime.sae")


def module_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere: ``from a.b import c`` counts as ``a.b.c``
    when that is a module, else as ``a.b``; names are cut back to the nearest known module."""
    found = set()
    for target in project_imports(path, module):
        found.add(target)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            for base in project_imports_of(node, path, module):
                found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    out = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def project_imports_of(node: ast.ImportFrom, path: Path, module: str) -> set[str]:
    """The base module of one ``from ... import`` (relative ones resolved), if in the project."""
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if path.name == "__init__.py" else 0)]
        base = ".".join([*anchor, base] if base else anchor)
    return {base} if base.split(".")[0] == "hsae_runtime" else set()


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    modules = all_modules()
    known = {module for _, module in modules}
    graph = {module: module_imports(path, module, known) for path, module in modules}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_a_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from hsae_runtime import sae\n")
    b.write_text("def f():\n    from hsae_runtime.format import read_model\n")
    known = {"hsae_runtime", "hsae_runtime.sae", "hsae_runtime.format"}
    graph = {
        "hsae_runtime.format": module_imports(a, "hsae_runtime.format", known),
        "hsae_runtime.sae": module_imports(b, "hsae_runtime.sae", known),
    }
    assert graph == {"hsae_runtime.format": {"hsae_runtime", "hsae_runtime.sae"},
                     "hsae_runtime.sae": {"hsae_runtime.format"}}  # fmt: skip
    assert find_cycle(graph) == ["hsae_runtime.format", "hsae_runtime.sae", "hsae_runtime.format"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
