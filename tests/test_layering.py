"""The package's imports point one way: corpora at the bottom, CLI and server on top, and the
measurement lab (benchmarks/, beside src/) outside it: nothing in the package imports it.

Imports are read with `ast` (those inside functions too, which is where cycles used to hide).
Run on another tree with `python tests/test_layering.py path/to/src/temporal_lora`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "temporal_lora"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Lower layers never import higher ones; a layer may import within itself (without cycles).
LAYERS = [
    ["errors", "config", "meta", "text", "cache", "rewards", "sampling"],
    ["corpora", "data", "conversations", "grounding"],
    ["backbone", "adapters", "mixing", "gguf_files", "llamacpp"],
    ["routing"],
    ["bundle", "storage", "model", "versions"],
    ["train", "evolve", "questions", "synthesis"],
    ["evaluate", "scoring", "answers"],
    ["cli", "server", "demo", "export", "segments", PACKAGE],
]
# The measurement lab: a package beside src/ that imports this one, never the other way round.
LAB = "benchmarks"


def module_name(path: Path, root: Path) -> str:
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Each module's imported package modules, and every `_private` name imported across modules."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
                edges[name].update(t for t in targets if t in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        edges[name].add(sub)
                        continue
                    edges[name].add(base)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} imports {alias.name} from {base}")
        edges[name].discard(name)
    return edges, private


def lab_imports(root: Path) -> list[str]:
    """Every import of the measurement lab (LAB) by a module of the package."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{module_name(path, root)} imports {n}" for n in names if n.split(".")[0] == LAB]
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def top_level(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def layer_of(module: str) -> int | None:
    top = top_level(module)
    return next((i for i, layer in enumerate(LAYERS) if top in layer), None)


def violations(root: Path) -> dict[str, list[str]]:
    edges, private = imports(root)
    upward, unplaced = [], []
    for src, targets in sorted(edges.items()):
        if layer_of(src) is None:
            unplaced.append(src)
        for dst in sorted(targets):
            a, b = layer_of(src), layer_of(dst)
            if a is not None and b is not None and b > a:
                upward.append(f"{src} (layer {a}) imports {dst} (layer {b})")
    return {"cycles": [" -> ".join(c) for c in cycles(edges)], "upward imports": upward,
            "the measurement lab imported by the package": lab_imports(root),
            "private names imported across modules": private, "modules in no layer": unplaced}


def test_imports_point_downward_without_cycles():
    found = {kind: items for kind, items in violations(ROOT).items() if items}
    assert not found, "\n".join(f"{kind}:\n  " + "\n  ".join(items) for kind, items in found.items())


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "routing").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "routing" / "__init__.py").write_text("")
    (pkg / "model.py").write_text("from temporal_lora.routing.gate import net\n")
    (pkg / "routing" / "gate.py").write_text("def f():\n    from temporal_lora.model import _helper\n")
    (pkg / "data.py").write_text("def f():\n    from benchmarks.compare import run_bench\n")
    (pkg / "cli.py").write_text("import benchmarks.registry\n")
    found = violations(pkg)
    assert found["cycles"] == ["temporal_lora.model -> temporal_lora.routing.gate"]
    assert found["private names imported across modules"] == [
        "temporal_lora.routing.gate imports _helper from temporal_lora.model"]
    assert "temporal_lora.routing.gate (layer 3) imports temporal_lora.model (layer 4)" in found["upward imports"]
    assert found["the measurement lab imported by the package"] == [
        "temporal_lora.cli imports benchmarks.registry", "temporal_lora.data imports benchmarks.compare"]


if __name__ == "__main__":
    report = violations(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    for kind, items in report.items():
        print(f"{kind}: {len(items)}")
        for item in items:
            print(f"  {item}")
    sys.exit(1 if any(report.values()) else 0)
