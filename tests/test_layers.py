"""Imports point down only (ARCHITECTURE.md): base <- run store <- engine <- dispatch; the
analysis and the benchmarks sit on top and nothing below imports them. Every import counts,
also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    0: {"errors", "thresholds", "faults"},                                      # base
    1: {"store", "lease", "integrity", "provenance", "state"},                  # run store
    2: {"train", "step", "optim", "dist", "preempt", "data", "theory_metrics", "validate", "compose",
        "loggers", "progress", "__main__", "__init__", "models"},              # engine (and models/)
    3: {"sweep", "plan", "orphans", "slurm"},                                   # dispatch
}
RANK = {m: r for r, mods in LAYERS.items() for m in mods}


def _imports(path: Path) -> set[str]:
    """The project modules `path` imports: pipeline.<m> as <m>, models.* as models, analysis, bench."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    mapped = set()
    for name in out:
        top, _, rest = name.partition(".")
        if top == "pipeline":
            mapped.add(rest.split(".")[0] or "__init__")
        elif top in ("models", "analysis", "bench") or top in RANK:
            mapped.add(top)
    return mapped


def test_every_pipeline_module_is_in_a_layer():
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py")}
    assert modules <= set(RANK), f"put these in a layer (ARCHITECTURE.md, this test): {sorted(modules - set(RANK))}"


def test_imports_point_down_only():
    upward = []
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        for target in _imports(path):
            if target in ("analysis", "bench"):
                upward.append(f"pipeline/{path.name} imports {target}")
            elif target in RANK and RANK[target] > RANK[path.stem]:
                upward.append(f"pipeline/{path.name} (layer {RANK[path.stem]}) imports {target} (layer {RANK[target]})")
    for path in sorted((ROOT / "models").glob("*.py")):
        for target in _imports(path):
            if target != "models":
                upward.append(f"models/{path.name} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "store.py"
    bad.write_text("def f():\n    from .sweep import run\n")
    assert "sweep" in _imports(bad) and RANK["sweep"] > RANK["store"]
