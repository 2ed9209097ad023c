"""Running on rented GPUs: the SkyPilot task file, read by SkyPilot's own parser (in its own environment,
.venv/skypilot), and the set-up of `make gpu-check`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "configs/skypilot/gpu.yaml"
SKY_PYTHON = Path(sys.executable).parent.parent / "skypilot/bin/python"

# One process reads the file in every case of CASES (importing SkyPilot takes seconds): each case
# is the --env and --secret values given at launch.
READ = """
import copy, json, sys, yaml, sky
config = yaml.safe_load(open(sys.argv[1]))

def read(envs, secrets):
    try:  # (SkyPilot fills the overrides into the dict it is given)
        task = sky.Task.from_yaml_config(copy.deepcopy(config), env_overrides=list(envs.items()),
                                         secrets_overrides=list(secrets.items()))
    except ValueError as exc:
        return {"error": str(exc)}
    return {
        "accelerators": [r.accelerators for r in task.resources], "spot": [r.use_spot for r in task.resources],
        "envs": task.envs,
        "secrets": {k: v if v is None else v.get_secret_value() for k, v in task.secrets.items()},
        "file_mounts": task.file_mounts,
        "storage": {path: [store.name, store.mode.value] for path, store in task.storage_mounts.items()},
        "setup": task.setup, "run": task.run, "workdir": task.workdir,
    }

print(json.dumps([read(envs, secrets) for envs, secrets in json.loads(sys.argv[2])]))
"""
CASES = {"launched": ({"DVC_REMOTE": "s3://team-bucket/pubmedqa"}, {"HF_TOKEN": "hf_x"}),
         "no remote": ({}, {"HF_TOKEN": "hf_x"}),
         "no token": ({"DVC_REMOTE": "s3://b/p"}, {})}


@pytest.fixture(scope="module")
def read() -> dict[str, dict]:
    """SkyPilot's reading of the task file in each case of CASES."""
    if not SKY_PYTHON.exists():
        pytest.fail(f"no SkyPilot environment at {SKY_PYTHON}: `make test` installs requirements-skypilot.txt there")
    out = subprocess.run([str(SKY_PYTHON), "-c", READ, str(TASK), json.dumps(list(CASES.values()))],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(zip(CASES, json.loads(out.stdout.strip().splitlines()[-1])))


def _commands(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines()
            if line.strip() and not line.strip().startswith(("set -e", "export PATH", ": "))]


def test_the_task_asks_for_a_spot_gpu_checkpoints_on_a_bucket_and_runs_the_documented_commands(read):
    task = read["launched"]
    assert task["accelerators"] and all(a and sum(a.values()) == 1 for a in task["accelerators"])
    assert all(task["spot"])
    # the finetune stage's checkpoints live on the bucket mount, which outlives a preempted instance
    mount = task["envs"]["MEDQA_CHECKPOINT_DIR"]
    assert task["storage"][mount] == [task["envs"]["CHECKPOINT_BUCKET"], "MOUNT"]
    assert task["secrets"] == {"HF_TOKEN": "hf_x"} and "HF_TOKEN" not in task["envs"]  # a secret: not logged
    assert task["workdir"] == "." and task["file_mounts"] == {"~/sky_workdir/.git": ".git"}
    docs = (ROOT / "docs/models.md").read_text() + (ROOT / "README.md").read_text()
    commands = _commands(task["setup"]) + _commands(task["run"])
    assert "make setup" in commands and "dvc exp run --pull $(cat profiles/gpu.args)" in commands
    assert "dvc push --run-cache" in commands
    for command in commands:
        assert command.replace('"$TORCH_INDEX"', "https://download.pytorch.org/whl/cu128") in docs, command
    assert (ROOT / "profiles/gpu.args").exists()


def test_the_task_will_not_start_without_the_remote_and_the_token(read):
    assert "DVC_REMOTE" in read["no remote"]["error"]  # SkyPilot refuses at launch
    # A secret left out is not SkyPilot's error: the run stops on its first line, before any work.
    task = read["no token"]
    assert not task["secrets"].get("HF_TOKEN")
    first = task["run"].splitlines()[1]
    assert first.startswith(': "${HF_TOKEN:?') and subprocess.run(
        ["bash", "-c", f"set -e; {first}; echo started"], capture_output=True, text=True, env={}).stdout == ""


def test_gpu_check_runs_in_a_scratch_copy_with_small_caps(tmp_path, monkeypatch):
    """`make gpu-check`'s set-up, without its run: a git repo of the tracked files, the caps in its
    params (valid ones), this checkout untouched; no nvidia-smi, no memory column."""
    import yaml

    from bench import gpu_check
    from medqa.params import params_from_dict

    before = (ROOT / "params.yaml").read_text()
    repo = gpu_check.scratch_copy(tmp_path, tmp_path / "pubmedqa", steps=3, questions=5)
    assert (repo / ".git").is_dir() and (repo / "dvc.yaml").is_file() and (repo / "bench/gpu_check.py").is_file()
    params = params_from_dict(yaml.safe_load((repo / "params.yaml").read_text()))
    assert (params.train.max_steps, params.train.eval_steps, params.eval.max_samples) == (3, 3, 5)
    assert params.data.source == str((tmp_path / "pubmedqa").resolve())
    assert (ROOT / "params.yaml").read_text() == before
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert not gpu_check.GpuMemory().available
    assert any(line.startswith("python ") for line in gpu_check.environment())
