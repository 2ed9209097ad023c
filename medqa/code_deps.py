"""Which of the project's modules a script reaches through its imports: what dvc.yaml must list as a
stage's deps (tests/test_dvc_deps.py), and the code a resumable checkpoint is tied to."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Plumbing every stage shares, left out of the deps on purpose so that a changed error message or
# file-writing helper does not re-run the pipeline (see the comment at the top of dvc.yaml).
PLUMBING = frozenset({"medqa/io.py", "medqa/errors.py", "medqa/params.py", "medqa/paths.py", "medqa/__init__.py"})


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for type hints only, which
    run no code of theirs)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _module_files(module: str, names: list[str]) -> set[Path]:
    """The files `from <module> import <names>` runs: the module's file, or for a package the modules
    among `names` (a package's __init__.py holds only its docstring: tests/test_dvc_deps.py checks)."""
    base = ROOT / module.replace(".", "/")
    if base.with_suffix(".py").is_file():
        return {base.with_suffix(".py")}
    return {base / f"{name}.py" for name in names if (base / f"{name}.py").is_file()}


def _imported_modules(path: Path) -> set[Path]:
    """The medqa modules `path` imports anywhere in it (top level or inside functions), but for type
    hints only."""
    found: set[Path] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                (node.module == "medqa" or node.module.startswith("medqa.")):
            found |= _module_files(node.module, [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("medqa."):
                    found |= _module_files(alias.name, [])
    return found


def reached_modules(script: Path, deps: set[str] = frozenset()) -> set[str]:
    """Every medqa module `script` reaches through imports, as paths relative to the project. A
    plumbing module is not followed (what it imports serves it) unless `deps` lists it, as
    check_params's deps do."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for module in _imported_modules(todo.pop()) - seen:
            seen.add(module)
            name = str(module.relative_to(ROOT))
            if name not in PLUMBING or name in deps:
                todo.append(module)
    return {str(p.relative_to(ROOT)) for p in seen}


def stage_code(script: str) -> list[Path]:
    """The files whose change makes DVC re-run the stage `script` (e.g. "stages/finetune.py"): the
    script and the modules it reaches, but the plumbing."""
    return [ROOT / name for name in sorted({script} | (reached_modules(ROOT / script) - PLUMBING))]
