"""The package's import arrows point one way (DEVELOPING.md, "Layers"): no cycle between packages,
no arrow from a lower layer to a higher one. Every import counts, function-local ones too (a
local import that dodges a cycle is still a cycle)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import aviary

PACKAGE = Path(aviary.__file__).parent

# Bottom to top; a module may import from its own layer or any layer below. Units that share
# a layer may import each other, but never both ways (that is a cycle). Keep in step with the
# drawing in DEVELOPING.md.
LAYERS: list[tuple[str, ...]] = [
    ("config", "lengths"),
    ("precision", "storage", "audio"),
    ("features",),
    ("data",),
    ("objectives",),
    ("models",),
    ("train",),
    ("interop",),
    ("hub",),
    ("aviary",),  # aviary/__init__.py: `aviary.load` (from hub) and __version__
    ("evaluate",),
    ("analysis",),
    ("cli", "__main__"),
]

# A template package copied into s3prl's tree by `aviary export s3prl-upstream`: it imports
# aviary as any user would and is never imported by aviary itself.
NOT_PART_OF_THE_GRAPH = ("interop/s3prl_expert/",)

# Names of aviary/__init__.py that any module may read without an arrow to the top.
ROOT_CONSTANTS = {"__version__"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """``aviary.models.mam`` -> ``models``; ``aviary.storage`` -> ``storage``; ``aviary`` -> ``aviary``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(path: Path, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """Every aviary module ``path`` imports, anywhere in the file, with the line number."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:  # `from aviary import storage`: the submodule is the target
                    out.append((sub, node.lineno))
                elif not (target == "aviary" and a.name in ROOT_CONSTANTS):
                    out.append((target, node.lineno))
    return [(m, line) for m, line in out if m == "aviary" or m.startswith("aviary.")]


def package_arrows(root: Path = PACKAGE) -> dict[tuple[str, str], list[str]]:
    """``(from unit, to unit) -> ["file:line", ...]`` for every import between two units."""
    files = [p for p in sorted(root.rglob("*.py"))
             if not any(str(p.relative_to(root)).startswith(skip) for skip in NOT_PART_OF_THE_GRAPH)]
    known = {module_name(p, root) for p in files}
    arrows: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p in files:
        mod = module_name(p, root)
        for target, line in imported_modules(p, mod, p.name == "__init__.py", known):
            a, b = unit_of(mod), unit_of(target)
            if a != b:
                arrows[(a, b)].append(f"{p.relative_to(root.parent)}:{line}")
    return arrows


def violations(arrows: dict[tuple[str, str], list[str]], layers: list[tuple[str, ...]]) -> list[str]:
    """Arrows against the layer order, units missing from it, and cycles between units."""
    rank = {u: i for i, band in enumerate(layers) for u in band}
    problems = []
    for (a, b), where in sorted(arrows.items()):
        for u in (a, b):
            if u not in rank:
                problems.append(f"{u!r} is in no layer of LAYERS / DEVELOPING.md (seen at {where[0]})")
        if a in rank and b in rank and rank[b] > rank[a]:
            problems.append(f"{a} -> {b} points up the layers ({', '.join(where[:3])})")
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in arrows:
        graph[a].add(b)

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == goal:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = set()
    for a, b in arrows:
        back = reaches(b, a)
        if back is not None:
            cycle = [a] + back
            cycles.add(" -> ".join(cycle) + f" (first arrow at {arrows[(a, b)][0]})")
    problems += sorted(f"cycle {c}" for c in cycles)
    return problems


def test_no_cycle_and_no_arrow_against_the_layers():
    arrows = package_arrows()
    assert arrows, "no imports found: the walk is broken"
    assert violations(arrows, LAYERS) == []


def test_every_unit_of_the_package_has_a_layer():
    units = {unit_of(module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")}
    placed = {u for band in LAYERS for u in band}
    assert units <= placed, f"place {sorted(units - placed)} in LAYERS and DEVELOPING.md"


def test_the_checker_finds_local_imports_cycles_and_upward_arrows(tmp_path):
    """The walk sees function-local and relative imports; violations() names both kinds of fault."""
    pkg = tmp_path / "aviary"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("from . import top\n")
    (pkg / "high" / "top.py").write_text("from aviary.low import base\n")
    # A function-local import from the low layer up: the kind of arrow that hides a cycle.
    (pkg / "low" / "base.py").write_text("def f():\n    from aviary.high.top import g\n    return g\n")
    arrows = package_arrows(pkg)
    assert set(arrows) == {("high", "low"), ("low", "high")}
    found = violations(arrows, [("low",), ("high",)])
    assert any(p.startswith("low -> high points up") and "low/base.py:2" in p for p in found), found
    assert any(p.startswith("cycle ") for p in found), found
    assert violations({("high", "low"): ["x:1"]}, [("low",), ("high",)]) == []
    assert "in no layer" in violations({("new", "low"): ["x:1"]}, [("low",)])[0]
