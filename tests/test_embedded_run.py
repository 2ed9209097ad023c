"""End to end on the embedded default model: `dvc repro` of the real SmolLM2 (offline) with tiny params, on
the PubMedQA copy named by PUBMEDQA_DATA (the synthetic set when that is not set), run once for the module
(what `make run` does) and read by the tests of what is about that model: the README's commands, the
lm-eval agreement, the names in the model card and the report. The pipeline's mechanics are tested on a
tiny random model in test_pipeline.py.
Slow, all of it: eleven stages, each a Python process that loads torch and transformers, on a real model.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medqa.io import read_jsonl
from tests.conftest import pubmedqa_data, write_official_dir
from tests.pipeline_repo import (
    ALL_STAGES,
    ROOT,
    TINY,
    assert_evaluated_in_the_weights_dtype,
    check_release,
    commit,
    make_repo,
    run,
    stages_run,
    succeeded,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, dict, str]:
    """The project with tiny params on the embedded default model, reading the real PubMedQA copy when
    there is one, after `dvc repro` (what `make run` does); with that run's output."""
    work = tmp_path_factory.mktemp("embedded")
    real = pubmedqa_data()
    # 6 of PubMedQA's 500 non-test questions for validation (each costs the real model ~1 s a pass,
    # five passes here), 3 of the synthetic set's 50.
    repo, env = make_repo(work, real or write_official_dir(work / "pubmedqa", n=60, n_test=10),
                          val_size=0.012 if real else TINY["split"]["val_size"])
    first = run(["dvc", "repro"], repo, env)
    assert stages_run(first) == ALL_STAGES
    return repo, env, first


def test_the_embedded_run_names_its_model_and_judge(embedded):
    """`dvc repro` on the embedded default: evaluated in fp32 on a CPU; the judge, the card's base model
    and the report name SmolLM2, the report as a weak judge. Slow: the whole pipeline on the real model."""
    from huggingface_hub import ModelCard

    repo, env, first = embedded
    assert_evaluated_in_the_weights_dtype(first)
    assert json.loads((repo / "metrics/judge.json").read_text())["judge"] == "smollm2-135m-instruct"
    card = ModelCard.load(repo / "models/release/README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    check_release(repo, json.loads((repo / "metrics/finetuned.json").read_text()))
    assert "**A weak judge.** `smollm2-135m-instruct`" in (repo / "reports/report.md").read_text()


def test_lm_eval_reads_the_decisions_the_choice_protocol_reads(embedded, tmp_path):
    """`lm_eval` on the harness task, as docs/sharing.md says to run it: for the base model and the
    adapter, its accuracy is the eval stages' choice accuracy and it picks the same option per question.
    Slow: two lm_eval processes, each loading the harness and the model."""
    repo, env, _ = embedded
    models = {"baseline": "pretrained=models/base,dtype=float32",
              "finetuned": "pretrained=models/base,peft=models/release,dtype=float32"}
    commands = {label: ["lm_eval", "--model", "hf", "--model_args", model_args, "--device", "cpu", "--batch_size", "4",
                        "--include_path", "lm_eval_tasks", "--tasks", "pubmedqa_medqa",
                        "--output_path", str(tmp_path / label), "--log_samples"]
                for label, model_args in models.items()}
    running = {label: subprocess.Popen(  # both at once: most of each is start-up, which uses one core
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for label, cmd in commands.items()}
    for label, proc in running.items():
        output = proc.communicate(timeout=900)[0]
        succeeded(commands[label], proc.returncode, output)
        out = tmp_path / label
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["pubmedqa_medqa"]
        metrics = json.loads((repo / f"metrics/{label}.json").read_text())
        assert results["acc,none"] == pytest.approx(metrics["decision"]["choice"]["accuracy"]), label
        samples = read_jsonl(next(out.rglob("samples_pubmedqa_medqa_*.jsonl")))
        # (The harness logs each option's log-likelihood as a string.)
        picked = {s["doc"]["pmid"]: max(zip((float(r[0]) for r in s["filtered_resps"]), ("yes", "no", "maybe")))[1]
                  for s in samples}
        rows = read_jsonl(repo / f"data/predictions/{label}.jsonl")
        assert picked == {r["pmid"]: r["decision_choice"] for r in rows}, label


def _readme_block(marker: str) -> str:
    """The fenced code block that follows `marker` in the README."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r"\s*```[a-z]*\n(.*?)```", readme, re.S)
    assert match, f"README has no code block after {marker}"
    return match.group(1)


def test_the_readme_commands_after_make_run_work_in_a_new_shell(embedded):
    """The README's block of commands after `make run`, as written, in a shell with only the system PATH.
    Slow: its experiment re-trains and re-evaluates the real model."""
    repo, env, _ = embedded
    run(["dvc", "repro"], repo, env)  # what `make run` leaves (a no-op after the fixture's run)
    commit(repo, env, "make run")
    block = _readme_block("<!-- after make run -->")
    assert block.startswith(". .venv/bin/activate") and "dvc exp run" in block and "dvc metrics diff" in block
    shell = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    shell["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    base_scores = (repo / "metrics/baseline.json").read_bytes()
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)  # what `make run` made
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=repo, env=shell,
                              capture_output=True, text=True, timeout=900)
    finally:
        (repo / ".venv").unlink()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    # A new experiment, not a cached one, re-running what the README's comment lists (the judge only
    # if the fine-tuned answers changed).
    listed = re.search(r"dvc exp run -S train\.epochs=\d+ +# an experiment: re-runs (.+)", block)
    assert listed, block
    ran = stages_run(output)
    assert ran - {"judge"} == set(listed.group(1).split(", ")) - {"judge"}, (ran, listed.group(1))
    assert "finetune" in ran
    # Only the fine-tuned model is scored again: the base model's evaluation comes from DVC's cache.
    assert "baseline_eval" not in ran and (repo / "metrics/baseline.json").read_bytes() == base_scores
    assert (repo / "dvc_plots" / "index.html").exists()
