"""A throw-away git + DVC copy of the project with tiny params, and the helpers that run commands in it
and read what they did: shared by the end-to-end tests (test_pipeline, test_embedded_run, test_qlora)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import save_tiny_base

ROOT = Path(__file__).resolve().parents[1]
# (With cv.folds: [], the default, there is no cv_fold stage: cv_folds and cv_rule write that it is off.)
ALL_STAGES = {"check_params", "download", "format", "split", "baseline_eval", "finetune", "finetuned_eval", "judge",
              "report", "harness_task", "release", "cv_folds", "cv_rule"}
FAKE_TOKEN = "hf_" + uuid.uuid4().hex  # made at run time, so no file holds it beforehand
TINY = {
    # 3 of the synthetic set's 50 non-test questions: the eval stages score the whole validation split
    # for their decision offsets, in every run of these tests (the embedded run holds out fewer of PubMedQA's).
    "split": {"val_size": 0.06},
    # 2 steps an epoch, so that an experiment with more epochs trains another adapter.
    "train": {"max_samples": 4, "max_val_samples": 2, "max_steps": -1, "batch_size": 2, "grad_accum": 1,
              "eval_steps": 2, "save_steps": 2, "max_length": 384},
    "generation": {"max_new_tokens": 8},
    # Decisions on 4 test questions, long answers on 3 of them: one question is read after its prompt only.
    "eval": {"max_samples": 4, "long_answer_samples": 3, "batch_size": 4, "bootstrap": 50},
    "judge": {"max_samples": 2, "max_context_tokens": 64},
}


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    """Run `cmd` in `cwd`; its output, once it has succeeded."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return succeeded(cmd, proc.returncode, proc.stdout + proc.stderr)


def succeeded(cmd: list[str], returncode: int, output: str) -> str:
    """A command's output, once it is known to have succeeded without printing the token."""
    assert returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    assert FAKE_TOKEN not in output
    return output


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_repo(work: Path, data: Path, model: Path | None = None, val_size: float = TINY["split"]["val_size"]
              ) -> tuple[Path, dict]:
    """A git + DVC copy of the project's tracked files in `work`/repo, reading `data`, with tiny params;
    `model`, a local model directory, is then the base model and the judge."""
    repo = work / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = str(data)
    for section, values in TINY.items():
        params[section].update(values)
    params["split"]["val_size"] = val_size
    if model is not None:
        params["model"]["name"] = params["judge"]["model"] = str(model)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_TOKEN=FAKE_TOKEN, PYTHONUNBUFFERED="1")
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "project"], repo, env)
    return repo, env


def save_tiny_model(path: Path, tokenizer) -> Path:
    """A small random Llama with the default model's tokenizer: real stages, seconds a stage."""
    save_tiny_base(path, tokenizer, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   max_position_embeddings=2048)
    return path


def assert_evaluated_in_the_weights_dtype(output: str) -> None:
    """Both evaluations in the weights' dtype: fp32 on a CPU, even where training computed in bf16
    autocast (docs/benchmarks.md, "bf16 on the CPU")."""
    from medqa.modeling.hardware import resolve_hardware

    hardware = resolve_hardware("auto", "auto")
    for label in ("baseline", "finetuned"):
        assert (f"{label}: decisions on 4 test questions, long answers on 3 of them, on {hardware.device}, "
                f"{str(hardware.dtype).removeprefix('torch.')}") in output


def check_release(repo: Path, finetuned: dict) -> None:
    """The release holds the adapter and a card whose metadata are the run's metrics (the card's
    `base_model`, a hub id, only for a hub model: the embedded run checks it)."""
    from huggingface_hub import ModelCard

    from medqa.release.card import card_results

    release = repo / "models/release"
    assert (release / "adapter_model.safetensors").read_bytes() == (
        repo / "models/adapter/adapter_model.safetensors").read_bytes()
    card = ModelCard.load(release / "README.md")
    assert card.data.library_name == "peft"
    found = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert found == pytest.approx({label: value for label, _, value in card_results(finetuned)}, abs=1e-6)
    assert found["Decision accuracy (choice)"] == finetuned["decision"]["choice"]["accuracy"]
    assert "4 test questions" in card.text and "[More Information Needed]" not in card.text


def commit(repo: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", message, "--allow-empty"], repo, env)


