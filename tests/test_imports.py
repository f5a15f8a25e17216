"""The direction of imports inside ``hf_tokenprune``: no cycles, and the core never imports a leaf.

Every ``import`` statement counts, at module level, inside functions and under ``TYPE_CHECKING``: a lazy import
hides a cycle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_tokenprune"

# The core: what `prune_wrap` needs to prune (and its public API around it).
CORE = {"__init__", "adapters", "baselines", "calibrate", "compat", "compressor", "config", "continuation",
        "features", "guards", "hub", "inllm", "methods", "prefill", "pruning", "scorers", "stats", "wrap", "atomic"}
# Tools over the core (relevance labels, the masked reference): they may import the core only.
TOOLS = {"explain", "verify"}
# Leaves: offline-model builders, labels and training, benchmarks, the toy world, the real-LM testbed, pictures,
# the command line.
LEAVES = {"tiny", "training", "bench", "world", "testbed", "viz", "demo", "check", "cli"}


def modules() -> dict[str, Path]:
    """``hf_tokenprune.a.b`` -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from .x import y`` counts as ``x.y`` where that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.split(".")[0] == "hf_tokenprune")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_tokenprune":
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            out.update(submodules or {target})
    return out - {name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(module: str) -> str:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for name, members in (("core", CORE), ("tool", TOOLS), ("leaf", LEAVES)):
        if top in members:
            return name
    raise AssertionError(f"{module} is in no layer: add its top-level name to CORE, TOOLS or LEAVES in {__file__}")


def test_every_module_has_a_layer():
    for module in graph():
        layer(module)


@pytest.mark.parametrize(("kind", "allowed"), [("core", {"core"}), ("tool", {"core", "tool"})])
def test_lower_layers_import_no_higher_one(kind, allowed):
    wrong = sorted(f"{m} imports {t}" for m, targets in graph().items() if layer(m) == kind
                   for t in targets if layer(t) not in allowed)
    assert not wrong, "\n".join(wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_cycle_between_top_level_modules_and_subpackages():
    """``scorers`` and ``baselines`` (or any two subpackages) do not import each other, module by module or not."""
    top = {}
    for module, targets in graph().items():
        if module != "hf_tokenprune":
            top.setdefault(module.split(".")[1], set()).update(t.split(".")[1] for t in targets if t != "hf_tokenprune")
    assert cycles({k: v - {k} for k, v in top.items()}) == []


def test_the_checks_see_a_cycle_and_a_wrong_way_arrow():
    """The checks are not vacuous: a made-up cycle is found, and a real core module importing a leaf is flagged."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("hf_tokenprune.wrap") == "core" and layer("hf_tokenprune.training.store") == "leaf"
    edges = graph()
    assert "hf_tokenprune.prefill" in edges["hf_tokenprune.wrap"]  # imports are read
