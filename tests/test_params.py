"""params.yaml validation: one clear message naming the key, the value and what is allowed."""
from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medqa.errors import PipelineError
from medqa.params import SCHEMA, load_params, validate

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _with(key: str, value) -> dict:
    params = copy.deepcopy(PARAMS)
    section, leaf = key.split(".")
    params[section][leaf] = value
    return params


def test_shipped_params_are_valid_and_fully_described():
    validate(PARAMS)
    assert {f"{s}.{k}" for s, v in PARAMS.items() for k in v} == set(SCHEMA)


@pytest.mark.parametrize("profile", sorted((ROOT / "profiles").glob("*.args")), ids=lambda p: p.name)
def test_every_profile_gives_valid_params(profile):
    """`dvc exp run $(cat profiles/<name>.args)` on the shipped params.yaml: its -S overrides applied
    as DVC types them (YAML), the result passes check_params (a default changed under a profile, e.g.
    balanced sampling where the profile trains on every question, shows here, not hours into a run)."""
    words = shlex.split(profile.read_text())
    params = copy.deepcopy(PARAMS)
    for setting in (words[i + 1] for i, word in enumerate(words) if word == "-S"):
        key, value = setting.split("=", 1)
        section, leaf = key.split(".")
        assert leaf in params[section], f"{profile.name} sets {key}, which params.yaml does not have"
        params[section][leaf] = yaml.safe_load(value)
    validate(params, str(profile))


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("train.epochs", 0, "an integer >= 1"),
        ("train.epochs", "two", "an integer >= 1"),
        ("train.epochs", True, "an integer >= 1"),
        ("split.test_size", 1.5, "a number > 0 and < 1"),
        ("split.test_size", 0, "a number > 0 and < 1"),
        ("train.learning_rate", 0, "a number > 0"),
        ("split.strategy", "alphabetical", "one of official, random"),
        ("train.batch_size", 0, "an integer >= 1"),
        ("eval.batch_size", -2, "an integer >= 1"),
        ("generation.max_new_tokens", 0, "an integer >= 1"),
        ("generation.top_p", 1.2, "a number > 0 and <= 1"),
        ("model.quantization", "8bit", "one of auto, 4bit, none"),
        ("lora.target_modules", "q_proj", "a list of module names or null"),
        ("eval.max_samples", 0, "an integer >= 1 or null"),
        *(("prompt.template", template, "null or a string with {user} and optionally {system}, no other fields "
           "(a literal brace doubled)") for template in ("<s>{system} {user} {question}", "<s>{system}",
                                                         "{sys} {user}", "[INST] {user", "")),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, allowed):
    with pytest.raises(PipelineError) as err:
        validate(_with(key, value))
    assert str(err.value) == f"params.yaml: {key} is {value!r}; expected {allowed}"


def test_typos_missing_keys_and_cross_field_rules():
    params = copy.deepcopy(PARAMS)
    params["train"]["epoch"] = params["train"].pop("epochs")
    with pytest.raises(PipelineError, match=r"unknown key train.epoch \(did you mean train.epochs\?\)"):
        validate(params)
    params = copy.deepcopy(PARAMS)
    del params["eval"]["seed"]
    with pytest.raises(PipelineError, match="missing key eval.seed"):
        validate(params)
    with pytest.raises(PipelineError, match="must be a multiple of train.eval_steps"):
        validate(_with("train.save_steps", PARAMS["train"]["eval_steps"] + 1))
    with pytest.raises(PipelineError, match="train.sampling=balanced picks train.max_samples questions, which is null"):
        validate({**PARAMS, "train": dict(PARAMS["train"], sampling="balanced", max_samples=None)})
    validate(_with("train.sampling", "balanced"))
    with pytest.raises(PipelineError, match="unknown model.name 'gpt-5'"):
        validate(_with("model.name", "gpt-5"))
    with pytest.raises(PipelineError, match="set lora.target_modules"):
        validate(_with("model.name", "org/model"))
    validate(_with("model.name", "org/model") | {"lora": dict(PARAMS["lora"], target_modules=["q_proj"])})


def test_a_stage_with_bad_params_stops_with_one_error_line_then_the_restore_hint(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_with("split.test_size", 2)))
    proc = subprocess.run([sys.executable, "-m", "stages.split"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), DEBUG=""), timeout=120)
    assert proc.returncode == 1
    error, hint = proc.stderr.strip().splitlines()
    assert error == "error: params.yaml: split.test_size is 2; expected a number > 0 and < 1"
    assert hint.startswith("split: failed;")
    assert "Traceback" not in proc.stdout + proc.stderr
    (tmp_path / "params.yaml").write_text("data: [unclosed")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_out_of_memory_names_the_params_to_lower():
    from medqa.errors import explain_out_of_memory

    with pytest.raises(PipelineError, match=r"out of memory \(RuntimeError\): lower eval.batch_size"):
        with explain_out_of_memory("lower eval.batch_size"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(ValueError):  # other errors pass through untouched
        with explain_out_of_memory("lower eval.batch_size"):
            raise ValueError("bad")


@pytest.mark.parametrize("raised, code, first", [
    (PipelineError("train.epochs is 0"), 1, "error: train.epochs is 0"),
    (RuntimeError("a bug"), 1, "Traceback"),
    (KeyboardInterrupt(), 130, None),
])
def test_a_failing_stage_ends_with_how_to_restore_its_outputs(monkeypatch, capsys, raised, code, first):
    from medqa.errors import command_main, stage_main

    monkeypatch.setattr("sys.argv", ["/project/stages/finetune.py"])

    def body():
        raise raised

    with pytest.raises(SystemExit) as exit_:
        stage_main(body)()
    assert exit_.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("finetune: failed;") and "`dvc checkout` brings them back" in lines[-1]
    if first:
        assert lines[0].startswith(first)
    with pytest.raises(SystemExit):  # commands (chat, export) are no stages: no DVC hint
        command_main(body)()
    assert "dvc checkout" not in capsys.readouterr().err


def test_check_params_names_a_lora_target_the_model_lacks_before_any_stage_runs(tmp_path, tokenizer, monkeypatch,
                                                                               capsys, official_dir):
    """`lora.target_modules` is checked against the model's own modules (built from its config, no
    weights) in check_params: a typo is one line with "did you mean", no traceback, and the stage's
    restore hint; names the model has pass."""
    import stages.check_params
    from tests.conftest import save_tiny_base

    save_tiny_base(tmp_path / "model", tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    params = _with("model.name", str(tmp_path / "model"))
    params["data"]["source"] = str(official_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages/check_params.py"])  # as DVC runs it (the hint names the stage)
    for targets, error in ((["q_proj", "v_projj"], "lora.target_modules: 'v_projj' is no module of"),
                           (["q_proj", "v_proj"], None)):
        params["lora"]["target_modules"] = targets
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        if error is None:
            stages.check_params.main()
            continue
        with pytest.raises(SystemExit) as exit_:
            stages.check_params.main()
        stderr = capsys.readouterr().err
        assert exit_.value.code == 1 and "Traceback" not in stderr
        assert error in stderr and "(did you mean 'v_proj'?); its linear layers: " in stderr, stderr
        assert "check_params: failed; the outputs of its last successful run are in the DVC cache" in stderr
