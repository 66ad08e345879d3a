"""labkit's packages import one way (docs/architecture.md): a lower layer never imports a higher one, no module
imports itself back through a circle, and no labkit import hides inside a function to dodge one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LABKIT = Path(__file__).resolve().parents[1] / "labkit"
LAYERS = (
    "core",
    "data",
    "models",
    "caches",
    "inference",
    "metrics",
    "training",
    "experiments",
    "report",
    "viz",
    "widgets",
    "course",
    "cli",
)
# Only the command line imports lazily: `labkit --help` and a user mistake answer in a second, not after the
# ten seconds that torch + transformers + diffusers take to import.
LAZY_ALLOWED = {"cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(LABKIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def labkit_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported labkit module, line, inside a function?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}:{child.lineno}: use absolute imports (from labkit.<layer>...)"
                if child.module and child.module.split(".")[0] == "labkit":
                    for alias in child.names:
                        target = f"{child.module}.{alias.name}"
                        # `from labkit.metrics import scores` imports a module; `from labkit.x.y import name` a name
                        exists = (LABKIT.parent / (target.replace(".", "/") + ".py")).is_file()
                        found.append((target if exists else child.module, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "labkit":
                        found.append((alias.name, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(path): labkit_imports(path) for path in sorted(LABKIT.rglob("*.py"))}


def upward_imports(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    problems = []
    for module, imports in graph.items():
        here = layer_of(module)
        for target, line, _ in imports:
            there = layer_of(target)
            if here in LAYERS and there in LAYERS and LAYERS.index(there) > LAYERS.index(here):
                problems.append(
                    f"{module}:{line} imports {target}: layer {here!r} may not import the higher layer {there!r}"
                )
    return problems


def circles(graph: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Every strongly connected set of modules larger than one (Tarjan's algorithm)."""
    edges = {m: sorted({t for t, _, _ in imports if t in graph and t != m}) for m, imports in graph.items()}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in edges:
        if node not in index:
            connect(node)
    return found


def test_every_module_sits_in_a_layer():
    strays = [m for m in import_graph() if m != "labkit" and layer_of(m) not in LAYERS]
    assert not strays, f"modules outside the layered packages {LAYERS}: {strays}"


def test_no_upward_import():
    problems = upward_imports(import_graph())
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(group) for group in found)


def test_no_labkit_import_hidden_in_a_function():
    hidden = [
        f"{module}:{line} imports {target} inside a function"
        for module, imports in import_graph().items()
        if layer_of(module) not in LAZY_ALLOWED
        for target, line, inside in imports
        if inside
    ]
    assert not hidden, "\n".join(hidden)


def test_the_checker_catches_an_upward_import_and_a_circle():
    graph = {"labkit.core.a": [("labkit.report.run", 3, False)], "labkit.report.run": [("labkit.core.a", 1, False)]}
    assert upward_imports(graph) == [
        "labkit.core.a:3 imports labkit.report.run: layer 'core' may not import the higher layer 'report'"
    ]
    assert circles(graph) == [["labkit.core.a", "labkit.report.run"]]


@pytest.mark.parametrize("layer", LAYERS)
def test_the_architecture_document_lists_every_layer(layer):
    text = (LABKIT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert f"`{layer}/`" in text
