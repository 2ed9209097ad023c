"""dvc.yaml cannot drift from the code: every `medqa` module a stage's script reaches is one of its deps."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from medqa.code_deps import PLUMBING, reached_modules

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = PLUMBING


# A foreach stage (cv_fold) as its `do` block: the same command, deps and params for every item.
STAGES = {name: spec.get("do", spec) for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


def test_the_import_walk_finds_what_a_stage_reaches():
    reached = reached_modules(ROOT / "stages/finetune.py")
    assert {"medqa/training/recipe.py", "medqa/modeling/loading.py", "medqa/paths.py"} <= reached  # direct and transitive
    assert "medqa/modeling/profiles.py" in reached_modules(ROOT / "stages/check_params.py", {"medqa/params.py"})


def _package_modules(folder: str) -> set[str]:
    """The modules of a medqa subpackage (its __init__.py holds only a docstring)."""
    return {str(p.relative_to(ROOT)) for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_reaches_is_a_dependency(name):
    """Exact both ways: every medqa module the stage's script reaches is a dep (itself, or its subpackage's
    folder), and every medqa dep is reached (a folder only where the stage reaches all of its modules), so a
    change re-runs the stages it can change and no other."""
    stage = STAGES[name]
    script = re.fullmatch(r"python -m (stages\.\w+)( \$\{item\})?", stage["cmd"]).group(1).replace(".", "/") + ".py"
    deps = set(stage["deps"])
    assert script in deps, f"{name}: its script {script} is not in its deps"
    folders = {d for d in deps if d.startswith("medqa/") and (ROOT / d).is_dir()}
    covered = deps.union(*(_package_modules(f) for f in folders))
    reached = reached_modules(ROOT / script, deps)
    missing = reached - EXEMPT - covered
    assert not missing, f"dvc.yaml: stage {name} imports {sorted(missing)} but does not list them in deps"
    unreached = sorted(d for d in deps if d.startswith("medqa/") and d not in reached and d not in folders)
    unreached += sorted(f for f in folders if not _package_modules(f) <= reached)
    assert not unreached, f"dvc.yaml: stage {name} lists {unreached} but does not reach (all of) them"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_config_file_a_stage_opens_is_a_dependency(name):
    """A file of configs/ named in the code a stage runs (its script and the modules it reaches) is one of
    its deps: editing it re-runs the stage."""
    import ast

    stage = STAGES[name]
    script = re.fullmatch(r"python -m (stages\.\w+)( \$\{item\})?", stage["cmd"]).group(1).replace(".", "/") + ".py"
    named = set()
    for path in [script, *reached_modules(ROOT / script, set(stage["deps"]))]:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("configs/"):
                named.add(node.value)
    assert all((ROOT / f).is_file() for f in named), named
    missing = sorted(named - set(stage["deps"]))
    assert not missing, f"dvc.yaml: stage {name} reads {missing} but does not list them in deps"
    if name == "finetune":
        assert named == {"configs/accelerate/ddp.yaml", "configs/accelerate/fsdp.yaml"}


def test_the_product_imports_no_research_or_benchmark_code():
    """research/ and bench/ read the product; nothing in medqa/ or stages/ reads them (a stage whose result
    hung on an analysis script would re-run when the analysis changed, and ship it)."""
    import ast

    for path in sorted((ROOT / "medqa").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
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


def test_python_bytecode_is_no_change_of_a_folder_dependency():
    """A stage that depends on a medqa/ folder would re-run whenever Python wrote a .pyc into it (the folder's
    hash would change): .dvcignore keeps __pycache__ out."""
    import subprocess
    import sys

    dvc = Path(sys.executable).parent / "dvc"
    ignored = subprocess.run([str(dvc), "check-ignore", "medqa/data/__pycache__/sources.cpython-311.pyc"],
                             cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 0, ignored.stdout + ignored.stderr


def _library_parts(root: Path) -> dict[str, set[str]]:
    """Which part of the library (a subpackage, or a top-level module as `name.py`) imports which other
    part, anywhere in its files: `from medqa.x... import`, `from medqa import x` and `import medqa.x`."""
    import ast

    def part(dotted: str) -> str | None:
        names = dotted.split(".")
        if names[0] != "medqa" or len(names) < 2:
            return None
        return names[1] if (root / names[1]).is_dir() else f"{names[1]}.py"

    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        here = path.relative_to(root).parts[0]
        imported: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "medqa":
                imported |= {part(f"medqa.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(part(node.module))
            elif isinstance(node, ast.Import):
                imported |= {part(alias.name) for alias in node.names}
        graph.setdefault(here, set()).update(p for p in imported if p and p != here)
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the import graph (its parts in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # part -> "open" while on the path being walked, "done" after

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := walk(nxt, path + [node])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start, [])):
            return found
    return None


def test_the_parts_of_the_library_form_layers():
    """The subpackages and top-level modules of medqa form layers: no chain of imports (at the top or inside a
    function, of any length) leads from a part back to itself."""
    graph = _library_parts(ROOT / "medqa")
    assert sum(map(len, graph.values())) > 20
    assert _a_cycle(graph) is None, " -> ".join(_a_cycle(graph))


def test_the_layer_check_finds_a_long_cycle_and_every_import_form(tmp_path):
    root = tmp_path / "medqa"
    for name, text in {"a/m.py": "from medqa.b.n import x\n", "b/n.py": "from medqa import c\n",
                       "c.py": "def f():\n    import medqa.a.m\n", "d.py": "from medqa.c import f\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = _library_parts(root)
    assert graph == {"a": {"b"}, "b": {"c.py"}, "c.py": {"a"}, "d.py": {"c.py"}}
    assert _a_cycle(graph) == ["a", "b", "c.py", "a"]
    (root / "c.py").write_text("")
    assert _a_cycle(_library_parts(root)) is None


def test_only_the_answer_format_reads_the_answer_prefix():
    """How an answer states its decision is one object (`AnswerFormat`): no other module of the library or
    the stages reads `prompt.answer_prefix`, so a change of how the decision is stated is one place."""
    import ast

    readers = set()
    for path in sorted((ROOT / "medqa").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "answer_prefix":
                readers.add(str(path.relative_to(ROOT)))
    assert readers == {"medqa/decisions/answer_format.py"}, sorted(readers)
