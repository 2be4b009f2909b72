"""Imports point down only (ARCHITECTURE.md): base <- runs <- engine (and models/) <- config <-
the job (pipeline/train.py) <- dispatch; the analysis and the benchmarks sit on top and nothing
below imports them. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a module's layer: its sub-package's, or for a module directly under pipeline/ its own
LAYERS = {
    "pipeline.errors": 0, "pipeline.thresholds": 0, "pipeline.faults": 0, "pipeline.ghost": 0,
    "pipeline.threads": 0, "pipeline.catalog": 0, "pipeline.user_code": 0, "pipeline": 0,
    "pipeline.runs": 1,
    "pipeline.engine": 2, "models": 2,
    "pipeline.config": 3,
    "pipeline.train": 4, "pipeline.attempt": 4, "pipeline.__main__": 4,
    "pipeline.dispatch": 5,
}
NAMES = {0: "base", 1: "runs", 2: "engine", 3: "config", 4: "job", 5: "dispatch"}


def module_name(path: Path) -> str:
    """pipeline/runs/rundir.py -> pipeline.runs.rundir; a package's __init__.py -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    """The layer of a project module (None: not in pipeline/ or models/)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def imports(path: Path) -> set[str]:
    """The absolute names of every module `path` imports (relative imports resolved)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from . import x`: the module x
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def project_modules():
    return sorted(p for d in ("pipeline", "models") for p in (ROOT / d).rglob("*.py"))


def test_every_pipeline_module_is_in_a_layer():
    missing = [module_name(p) for p in project_modules() if layer(module_name(p)) is None]
    assert not missing, f"put these in a layer (ARCHITECTURE.md, this test): {missing}"


def test_imports_point_down_only():
    upward = []
    for path in project_modules():
        me = module_name(path)
        for target in imports(path):
            if target.split(".")[0] in ("analysis", "bench", "tests"):
                upward.append(f"{me} imports {target}")
            elif layer(target) is not None and layer(target) > layer(me):
                upward.append(f"{me} ({NAMES[layer(me)]}) imports {target} ({NAMES[layer(target)]})")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    bad = ROOT / "pipeline" / "runs" / "_probe_upward.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "def f():\n    from ..dispatch.sweep import run\n"
                        if self == bad else Path.read_bytes(self).decode())
    found = imports(bad)
    assert "pipeline.dispatch.sweep" in found and layer("pipeline.dispatch.sweep") > layer(module_name(bad))
    assert module_name(ROOT / "pipeline" / "runs" / "__init__.py") == "pipeline.runs"
    assert layer("pipeline.train") == 4 and layer("pipeline.engine.loop") == 2 and layer("models.norm") == 2


def test_no_private_name_crosses_a_module():
    """A name with a leading underscore is its module's own: no project module imports one from
    another (nor reaches one through a module, `lease._alive`)."""
    found = []
    for path in [*project_modules(), *sorted((ROOT / "analysis").rglob("*.py"))]:
        tree = ast.parse(path.read_text())
        mods = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.level or (n.module or "").split(".")[0] in ("pipeline", "models", "analysis")) for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in
                                                     ("pipeline", "models", "analysis")):
                found += [f"{module_name(path)} imports {a.name}" for a in node.names if private(a.name)]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in mods \
                    and private(node.attr):
                found.append(f"{module_name(path)} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_function_is_longer_than_a_screen():
    """60 lines at most, from `def` to its last line (docstring included), in pipeline/ and analysis/."""
    long = []
    for path in [*sorted((ROOT / "pipeline").rglob("*.py")), *sorted((ROOT / "analysis").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not long, "\n".join(long)
