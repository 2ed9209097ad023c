"""The README and docs/ stay connected: every relative link resolves, to a file and, with `#anchor`,
to a heading in it (GitHub's anchors)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "research/README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    """The relative links on `page` whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    return broken


def test_the_link_check_finds_a_missing_page_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## The default recipe\n\n```\n# not a heading\n```\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#the-default-recipe) [top](a.md#top) [web](https://x.org) "
                    "[gone](c.md) [no heading](a.md#not-a-heading)\n")
    assert broken_links(page) == ["c.md (no such file)", "a.md#not-a-heading (no such heading)"]


def test_docs_exist_and_the_readme_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert docs, "docs/ has no pages"
    assert [d for d in docs if f"docs/{d}" not in readme] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


# A foreach stage (cv_fold) as its `do` block, its item written `<id>` as the docs write it.
STAGES = {name: __import__("yaml").safe_load(__import__("yaml").safe_dump(spec.get("do", spec)).replace("${item}", "<id>"))
          for name, spec in __import__("yaml").safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


def _stage_rows(page: Path) -> dict[str, list[str]]:
    """The rows of a page's stage table (| `stage` | reads | writes |), by stage."""
    rows = {}
    for line in page.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)`", cells[0]) if line.startswith("| `") else None
        if name and name.group(1) in STAGES and len(cells) == 3:
            rows[name.group(1)] = cells
    return rows


def test_the_stage_table_is_dvc_yaml_cell_by_cell():
    """docs/pipeline.md's table: a row per stage; its reads are exactly the params dvc.yaml declares
    (`section.*` for a whole section), and every output dvc.yaml declares is named in its writes."""
    rows = _stage_rows(ROOT / "docs/pipeline.md")
    assert sorted(rows) == sorted(STAGES)
    for stage, (_, reads, writes) in rows.items():
        declared = STAGES[stage]["params"]
        if reads == "every section":
            assert all("." not in p for p in declared) and len(declared) == len(
                __import__("yaml").safe_load((ROOT / "params.yaml").read_text())), stage
        elif reads.startswith("as `"):
            assert declared == STAGES[reads[4:-1]]["params"], stage
        else:
            named = [k.removesuffix(".*") for k in re.findall(r"`([^`]+)`", reads)]
            assert named == declared, f"docs/pipeline.md: {stage} reads {named}, dvc.yaml says {declared}"
        if not reads.startswith("as `"):
            # `reports/decisions_{baseline,finetuned}.csv` names both files
            writes = re.sub(r"(\S*)\{([^}]*)\}(\S*)", lambda m: " ".join(m[1] + part + m[3] for part in m[2].split(",")),
                            writes)
            for out in STAGES[stage]["outs"]:
                assert out in writes or f"{out}/" in writes, f"docs/pipeline.md: {stage} writes no {out}"


MODULE = re.compile(r"`((?:medqa|stages|bench|research)(?:/[\w.]+)+|python -m [\w.]+|(?:medqa|bench|research)\.[\w.]+)")


def _named_code(text: str) -> list[str]:
    return MODULE.findall(text)


def _shown(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_command_and_params_key_a_page_names_exists(page):
    """A path under medqa/ (or stages/, bench/, research/), a `python -m` command or a dotted module the
    docs name is a file of the project (a dotted name may end in a function or class of its module);
    a `section.key` of params.yaml's sections is a key of the schema."""
    from medqa.params import SCHEMA

    text = page.read_text(encoding="utf-8")
    missing = []
    for name in _named_code(text):
        dotted = name.removeprefix("python -m ")
        parts = dotted.split(".")
        if "/" in name:
            exists = (ROOT / name).exists()
        elif name.startswith("python -m "):
            module = ROOT / "/".join(parts)
            exists = module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()
        else:  # a module, a package, or a module's function or class (or a method of it)
            exists = (ROOT / "/".join(parts)).is_dir() or any(
                (ROOT / "/".join(parts[:n])).with_suffix(".py").is_file() for n in range(len(parts), max(len(parts) - 3, 1), -1))
        if not exists:
            missing.append(name)
    sections = {key.split(".")[0] for key in SCHEMA}
    for key in re.findall(r"`((?:" + "|".join(sections) + r")\.[a-z_]+)(?:=[^`]*)?`", text):
        if key not in SCHEMA and not key.endswith("_"):
            missing.append(key)
    assert not missing, f"{_shown(page)} names {sorted(set(missing))}, which do not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_ends_before_the_next_paragraph(page):
    """A Markdown table followed by a line of text with no blank line between renders that text as a row."""
    lines = FENCE.sub("", page.read_text(encoding="utf-8")).splitlines()
    bad = [n for n, (line, after) in enumerate(zip(lines, lines[1:]), 2)
           if line.startswith("|") and after.strip() and not after.startswith("|")]
    assert not bad, f"{_shown(page)}: text right after a table at line(s) {bad}"


def test_the_doc_checks_find_what_they_guard(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("| a | b |\n|---|---|\n| 1 | 2 |\nnot a row\n")
    with pytest.raises(AssertionError, match="text right after a table"):
        test_every_table_ends_before_the_next_paragraph(page)
    page.write_text("`medqa/answers.py`, `python -m medqa.no_such`, `eval.max_sample`, `eval.max_samples`\n")
    with pytest.raises(AssertionError) as error:
        test_every_module_command_and_params_key_a_page_names_exists(page)
    assert all(n in str(error.value) for n in ("medqa/answers.py", "python -m medqa.no_such", "eval.max_sample'")), \
        str(error.value)
    assert "'eval.max_samples'" not in str(error.value)
