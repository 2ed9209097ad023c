"""dvc.yaml cannot drift from the code: every `medqa` module a stage's script reaches is one of its deps."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Plumbing every stage shares, left out of the deps on purpose so that a changed error message or
# file-writing helper does not re-run the pipeline (see the comment at the top of dvc.yaml).
EXEMPT = {"medqa/io.py", "medqa/errors.py", "medqa/params.py", "medqa/paths.py", "medqa/__init__.py"}


def _imported_modules(path: Path) -> set[Path]:
    """The medqa modules `path` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "medqa":
                found |= {ROOT / "medqa" / f"{alias.name}.py" for alias in node.names}
            elif node.module.startswith("medqa."):
                found.add(ROOT / (node.module.replace(".", "/") + ".py"))
        elif isinstance(node, ast.Import):
            found |= {ROOT / (a.name.replace(".", "/") + ".py") for a in node.names if a.name.startswith("medqa.")}
    return {p for p in found if p.exists()}


def reached_modules(script: Path, deps: set[str] = frozenset()) -> set[str]:
    """Every medqa module `script` reaches through imports, as paths relative to the project. An exempt
    module is not followed (what it imports serves it) unless the stage lists it, as check_params does."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for module in _imported_modules(todo.pop()) - seen:
            seen.add(module)
            name = str(module.relative_to(ROOT))
            if name not in EXEMPT or name in deps:
                todo.append(module)
    return {str(p.relative_to(ROOT)) for p in seen}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_import_walk_finds_what_a_stage_reaches():
    reached = reached_modules(ROOT / "stages/finetune.py")
    assert {"medqa/training.py", "medqa/models.py", "medqa/paths.py"} <= reached  # direct and transitive
    assert "medqa/models.py" in reached_modules(ROOT / "stages/check_params.py", {"medqa/params.py"})


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_reaches_is_a_dependency(name):
    stage = STAGES[name]
    script = re.fullmatch(r"python -m (stages\.\w+)", stage["cmd"]).group(1).replace(".", "/") + ".py"
    deps = set(stage["deps"])
    assert script in deps, f"{name}: its script {script} is not in its deps"
    missing = reached_modules(ROOT / script, deps) - EXEMPT - deps
    assert not missing, f"dvc.yaml: stage {name} imports {sorted(missing)} but does not list them in deps"
