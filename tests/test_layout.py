"""The package layout holds: lower layers never import higher ones, and no module imports itself back.

Each package's ``__init__`` docstring says what it may import; this test is that rule, checked on
every ``import`` statement under ``lorafit/`` (top-level and function-local ones alike: a lazy
import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lorafit"

# What each top-level part of lorafit may import besides itself. ``errors`` and ``__init__`` (the
# version and the lazy load_lora re-export) are the floor everybody stands on.
FLOOR = {"errors", "__init__"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "io": set(),
    "distributed": {"io"},
    "families": {"io"},
    "networks": {"io", "families"},
    "data": {"io", "families"},
    "captioning": {"io", "data"},
    "review": {"io", "data", "captioning"},
    "slurm": {"io"},
    "loggers": {"io"},
    "inference": {"io", "families", "networks", "data"},
    "toyworld": {"io", "families", "networks", "data", "inference"},
    "training": {"io", "distributed", "families", "networks", "data"},
    "callbacks": {"io", "distributed", "families", "networks", "data", "inference", "training"},
    "bench": {"io", "distributed", "families", "networks", "data", "training", "callbacks"},
    "cli": {
        "io",
        "distributed",
        "families",
        "networks",
        "data",
        "captioning",
        "review",
        "slurm",
        "loggers",
        "inference",
        "toyworld",
        "training",
        "callbacks",
        "bench",
    },
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every ``lorafit.*`` module ``path`` imports (``from lorafit import x`` counts as ``lorafit.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lorafit":  # a submodule, or a name of lorafit/__init__.py
                found |= {
                    f"lorafit.{a.name}" if (ROOT / a.name).exists() or (ROOT / f"{a.name}.py").exists() else "lorafit"
                    for a in node.names
                }
            elif node.module.startswith("lorafit."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lorafit.")}
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in sorted(ROOT.rglob("*.py"))}


def test_every_part_of_lorafit_has_a_rule():
    parts = {_part(module) for module in _graph()} - {"__init__"}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED with what they may import"


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for module, imports in _graph().items():
        part = _part(module)
        if part == "__init__":
            continue
        for target in imports:
            other = _part(target)
            if other != part and other not in FLOOR and other not in ALLOWED[part]:
                wrong.append(f"{module} imports {target} ({part} may import {sorted(ALLOWED[part]) or 'nothing'})")
    assert not wrong, "\n".join(sorted(wrong))


def _resolve(target: str, graph: dict[str, set[str]]) -> str | None:
    # ``from lorafit.x import name`` where name is a function: the module is lorafit.x.
    while target and target not in graph:
        target = target.rpartition(".")[0]
    return target or None


def test_no_import_circles():
    graph = _graph()
    edges = {m: {r for t in imports if (r := _resolve(t, graph)) and r != m} for m, imports in graph.items()}
    # Package __init__ files that re-export a submodule are not circles of their own.
    circles = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                loop = path[path.index(target) :] + [target]
                if not any(m.endswith(".__init__") or m == "lorafit" for m in loop):
                    circles.append(" -> ".join(loop))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("package", sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()))
def test_each_package_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and len(doc) > 40, (
        f"lorafit/{package}/__init__.py needs a docstring: what lives there, what it may import"
    )
