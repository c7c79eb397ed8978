"""Check peftlab's layering: no import cycles among its modules and no import from a layer above.

    python tools/check_layers.py          # prints each violation; exit status 1 if there is any

The layers, bottom to top (a module may import from its own package and from lower layers):

    core  <  interop  <  methods  <  compose, assets  <  training  <  apps

`peftlab/__init__.py` (the public API) sits above everything but `apps`; `peftlab/__main__.py`
(`python -m peftlab`) on top. Every import counts for
the layer rule, including imports inside functions and under `TYPE_CHECKING`; the cycle rule
counts the imports that run when a module is imported (module level, outside `TYPE_CHECKING`).
bench/ scripts may import the library and `peftlab.apps.recipes`, never the CLI.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "peftlab"
LAYERS = {"core": 0, "interop": 1, "methods": 2, "compose": 3, "assets": 3, "training": 4, "apps": 6,
          "__main__": 7}   # `python -m peftlab`: runs the CLI
API_RANK = 5     # peftlab/__init__.py
FORBIDDEN_IN_BENCH = ("peftlab.apps.cli",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> tuple[str, int]:
    """(layer name, rank) of a peftlab module."""
    parts = module.split(".")
    if len(parts) == 1:
        return "peftlab", API_RANK
    return parts[1], LAYERS[parts[1]]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported peftlab module, line, runs at import time) for every import in the file."""
    is_package = path.name == "__init__.py"
    package = module_name(path) if is_package else module_name(path).rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def resolve(base: str, names: list[str]) -> list[str]:
        # `from pkg import x` imports the module pkg.x when there is one, else a name of pkg
        return [f"{base}.{n}" if f"{base}.{n}" in known else base for n in names]

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, False)
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, eager) for a in child.names if a.name.startswith("peftlab"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[:len(base_parts) - child.level + 1]
                    base = ".".join(base_parts + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if base.startswith("peftlab"):
                    found.extend((m, child.lineno, eager) for m in resolve(base, [a.name for a in child.names]))
            else:
                visit(child, eager)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def violations() -> list[str]:
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    known = set(files)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        layer, rank = layer_of(mod)
        for target, line, eager in imports(path, known):
            if target not in known:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target}, which is not a module")
                continue
            if eager and target != mod and not mod.startswith(target + "."):  # a package's own __init__
                graph[mod].add(target)
            t_layer, t_rank = layer_of(target)
            if t_layer == layer or target == "peftlab":
                continue
            if t_rank >= rank:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {target} "
                                f"({t_layer}, not below {layer})")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    for path in sorted((ROOT / "bench").glob("*.py")):
        for target, line, _ in imports_outside(path):
            if target.startswith(FORBIDDEN_IN_BENCH):
                problems.append(f"{path.relative_to(ROOT)}:{line}: bench imports {target}; use "
                                "peftlab.apps.recipes (or the library) instead of the CLI")
    return problems


def imports_outside(path: Path) -> list[tuple[str, int, bool]]:
    """Absolute peftlab imports of a file outside the package."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, True) for a in node.names if a.name.startswith("peftlab")]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("peftlab"):
            out.append((node.module, node.lineno, True))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component) + [sorted(component)[0]])

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


if __name__ == "__main__":
    problems = violations()
    print("\n".join(problems) or "layers: no cycles, no upward imports")
    sys.exit(1 if problems else 0)
