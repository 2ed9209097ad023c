"""dvc.yaml cannot drift from the code: every `medqa` module a stage's script reaches is one of its deps."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from medqa.imports import PLUMBING, reached_modules

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = PLUMBING


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_import_walk_finds_what_a_stage_reaches():
    reached = reached_modules(ROOT / "stages/finetune.py")
    assert {"medqa/training/recipe.py", "medqa/modeling/models.py", "medqa/paths.py"} <= reached  # direct and transitive
    assert "medqa/modeling/models.py" in reached_modules(ROOT / "stages/check_params.py", {"medqa/params.py"})


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_reaches_is_a_dependency(name):
    stage = STAGES[name]
    script = re.fullmatch(r"python -m (stages\.\w+)", stage["cmd"]).group(1).replace(".", "/") + ".py"
    deps = set(stage["deps"])
    assert script in deps, f"{name}: its script {script} is not in its deps"
    missing = reached_modules(ROOT / script, deps) - EXEMPT - deps
    assert not missing, f"dvc.yaml: stage {name} imports {sorted(missing)} but does not list them in deps"


def test_the_product_imports_no_research_or_benchmark_code():
    """research/ and bench/ read the product; nothing in medqa/ or stages/ reads them (a stage whose result
    hung on an analysis script would re-run when the analysis changed, and ship it)."""
    import ast

    for path in sorted((ROOT / "medqa").glob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.split(".")[0] in ("research", "bench") for n in names), \
                f"{path.relative_to(ROOT)} imports {names}"


def test_every_subpackage_says_what_it_owns_and_runs_no_code_on_import():
    """A subpackage's __init__.py is its one-paragraph docstring and nothing else: the import walk (and so
    each stage's deps) can leave it out, and importing one module of a package runs none of its siblings."""
    import ast

    packages = sorted(p.parent for p in (ROOT / "medqa").glob("*/__init__.py"))
    assert packages
    for package in packages:
        body = ast.parse((package / "__init__.py").read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and len(body[0].value.value) > 80, f"{package.relative_to(ROOT)}/__init__.py is not just a docstring"
