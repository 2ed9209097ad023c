"""The linter: `ruff check` (pyproject.toml's rules, imports sorted) passes on the whole checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _positional_parameters(root: Path) -> dict[str, int]:
    """Every function under `root` with its number of positional parameters (self and cls not counted)."""
    import ast

    counts = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                counts[f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"] = len(names)
    return counts


def test_no_library_or_stage_function_takes_more_than_five_positional_parameters(tmp_path):
    """Beyond five, a call reads as a row of values whose order must be remembered: the rest are
    keyword-only (after `*`)."""
    too_many = {name: n for root in ("medqa", "stages") for name, n in _positional_parameters(ROOT / root).items()
                if n > 5}
    assert not too_many, too_many
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/m.py").write_text("def f(a, b, c, d, e, f): pass\nclass C:\n    def g(self, a, b, c, d, e, *, f): pass\n")
    assert _positional_parameters(tmp_path / "pkg") == {"pkg/m.py:1 f": 6, "pkg/m.py:3 g": 5}
