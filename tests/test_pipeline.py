"""End to end: the real pipeline, with tiny params, in throw-away git + DVC copies of the project.

Two copies, each run once for the whole module and shared by its tests:
- `project`, for the pipeline's mechanics (re-runs, experiments, push/pull, kills, resume, restore):
  a tiny random local model as `model.name` and `judge.model`, on a small synthetic set;
- `embedded`, for what is about the embedded default model (the README's commands, the lm-eval
  agreement, the names in the model card and the report): the real SmolLM2 (offline), on the PubMedQA
  copy named by PUBMEDQA_DATA, or the synthetic set when that is not set.
Slow, all of it: every stage is a Python process that DVC starts (torch and transformers loaded
anew each time), and a test runs several stages, most of them more than once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from medqa.io import read_jsonl
from tests.conftest import pubmedqa_data, save_tiny_base, write_official_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = {"check_params", "download", "format", "split", "baseline_eval", "finetune", "finetuned_eval", "judge",
              "report", "harness_task", "release"}
FAKE_TOKEN = "hf_" + uuid.uuid4().hex  # made at run time, so no file holds it beforehand
TINY = {
    # 3 of the synthetic set's 50 non-test questions: the eval stages score the whole validation split
    # for their decision offsets, in every run below (the embedded run holds out fewer of PubMedQA's).
    "split": {"val_size": 0.06},
    # 2 steps an epoch, so that an experiment with more epochs trains another adapter.
    "train": {"max_samples": 4, "max_val_samples": 2, "max_steps": -1, "batch_size": 2, "grad_accum": 1,
              "eval_steps": 2, "save_steps": 2, "max_length": 384},
    "generation": {"max_new_tokens": 8},
    "eval": {"max_samples": 4, "batch_size": 4, "bootstrap": 50},
    "judge": {"max_samples": 2, "max_context_tokens": 64},
}


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return _succeeded(cmd, proc.returncode, proc.stdout + proc.stderr)


def _succeeded(cmd: list[str], returncode: int, output: str) -> str:
    """A command's output, once it is known to have succeeded without printing the token."""
    assert returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    assert FAKE_TOKEN not in output
    return output


def _stages_run(output: str) -> set[str]:
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
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "project"], repo, env)
    return repo, env


def save_tiny_model(path: Path, tokenizer) -> Path:
    """A small random Llama with the default model's tokenizer: real stages, seconds a stage."""
    save_tiny_base(path, tokenizer, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   max_position_embeddings=2048)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, tokenizer) -> tuple[Path, dict]:
    """The project with tiny params and a tiny random model on a synthetic set, before any run."""
    work = tmp_path_factory.mktemp("pipeline")
    return make_repo(work, write_official_dir(work / "pubmedqa", n=60, n_test=10),
                     save_tiny_model(work / "tiny-model", tokenizer))


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
    first = _run(["dvc", "repro"], repo, env)
    assert _stages_run(first) == ALL_STAGES
    return repo, env, first


def _assert_evaluated_in_the_weights_dtype(output: str) -> None:
    """Both evaluations in the weights' dtype: fp32 on a CPU, even where training computed in bf16
    autocast (docs/benchmarks.md, "bf16 on the CPU")."""
    from medqa.models import resolve_hardware

    hardware = resolve_hardware("auto", "auto")
    for label in ("baseline", "finetuned"):
        assert f"{label}: 4 test questions on {hardware.device}, {str(hardware.dtype).removeprefix('torch.')}" in output


def test_pipeline_runs_then_reruns_only_what_changed(project):
    """Slow: the whole pipeline, then two experiments that re-run most of it."""
    repo, env = project
    first = _run(["dvc", "repro"], repo, env)
    assert _stages_run(first) == ALL_STAGES
    _assert_evaluated_in_the_weights_dtype(first)

    again = _run(["dvc", "repro"], repo, env)
    assert _stages_run(again) == set(), again

    baseline = json.loads((repo / "metrics/baseline.json").read_text())
    finetuned = json.loads((repo / "metrics/finetuned.json").read_text())

    def keys(tree, prefix=""):
        return {k2 for k, v in tree.items()
                for k2 in (keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"})}

    assert keys(baseline) == keys(finetuned)
    assert {"decision.choice.accuracy", "decision.generated.macro_f1", "decision.choice.weighted_f1",
            "decision.after_answer.accuracy", "decision.calibrated.macro_f1", "decision.calibrated.content_free_prior.no",
            "text.rouge1", "text.rouge2", "text.rougeL", "text.bertscore_f1", "text.token_f1",
            "text.bertscore_f1_ci_low", "decision.majority.accuracy", "decision.majority.macro_f1",
            "decision.labels.yes", "decision.offsets.accuracy", "decision.offsets.over_majority.macro_f1",
            "decision.offsets.fitted.maybe"} <= keys(baseline)
    assert sum(baseline["decision"]["labels"].values()) == 4
    # The validation split stays whole: the validation loss takes train.max_val_samples (2) of it, the
    # validation decisions and both models' offsets all of it.
    n_val = len(read_jsonl(repo / "data/split/val.jsonl"))
    assert n_val > 2 and f"validation loss on 2 of {n_val}" in first
    train = json.loads((repo / "metrics/train.json").read_text())
    assert 0 <= train["val_choice_accuracy"] <= 1 and sum(train["val_chosen"].values()) == n_val
    assert baseline["decision"]["offsets"]["validation_questions"] == n_val
    assert finetuned["decision"]["offsets"]["fitted"]["yes"] == 0
    assert baseline["n_questions"] == 4
    predictions = read_jsonl(repo / "data/predictions/baseline.jsonl")
    assert len(predictions) == 4 and all(p["prompt_id"] and p["pmid"] for p in predictions)
    official = json.loads((repo / "data/predictions/baseline_official.json").read_text())
    assert set(official) == {p["pmid"] for p in predictions} and set(official.values()) <= {"yes", "no", "maybe"}
    assert (repo / "models/adapter/adapter_model.safetensors").exists()
    report = (repo / "reports/report.md").read_text()
    assert "| Decision accuracy: majority class" in report and "Test labels: " in report
    assert "| Decision accuracy (choice)" in report and "![loss curves](loss.png)" in report
    assert "| Decision accuracy (choice + offsets) minus the majority class's" in report
    assert f"({n_val} validation questions)" in report
    assert (repo / "reports/loss.png").stat().st_size > 1000
    assert "![decisions](decisions.png)" in report and (repo / "reports/decisions.png").stat().st_size > 1000
    confusion = (repo / "reports/decisions_finetuned.csv").read_text().splitlines()
    assert confusion[0] == "pmid,reference,decision" and len(confusion) == 5
    assert train["base_val_loss"] > 0 and "for the base model at step 0" in report
    judged = json.loads((repo / "metrics/judge.json").read_text())
    assert judged["n_questions"] == 2 and judged["n_test_questions"] == 4
    assert set(judged["criteria"]) == {"helpfulness", "relevance", "completeness", "correctness"}
    assert sum(judged["head_to_head"][o]["mean"] for o in ("win", "tie", "loss")) == pytest.approx(1.0)
    verdicts = read_jsonl(repo / "data/predictions/judge.jsonl")
    assert len(verdicts) == 2 and {v["pmid"] for v in verdicts} <= {p["pmid"] for p in predictions}
    assert all(1 <= v["ratings"][m]["correctness"]["score"] <= 4 for v in verdicts for m in ("baseline", "finetuned"))
    assert "## LLM judge" in report and "**A weak judge.**" in report and "![head to head](judge.png)" in report
    assert (repo / "reports/judge.png").stat().st_size > 1000
    _check_release(repo, finetuned)

    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "baseline run"], repo, env)
    generation = _run(["dvc", "exp", "run", "-S", "generation.max_new_tokens=6"], repo, env)
    # check_params runs on any param change; its output never changes, so it re-runs nothing else.
    assert _stages_run(generation) == {"check_params", "baseline_eval", "finetuned_eval", "judge", "report", "release"}

    judge = _run(["dvc", "exp", "run", "-S", "judge.max_samples=3"], repo, env)
    assert _stages_run(judge) == {"check_params", "judge", "report"}
    assert json.loads((repo / "metrics/judge.json").read_text())["n_questions"] == 3

    # (A training param's experiment, and the stages it re-runs: the README test's `dvc exp run`.)
    assert (repo / "models/checkpoints").is_dir()  # scratch for resuming, kept by DVC between runs
    leaks = [p for p in repo.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks, f"HF_TOKEN leaked into {leaks}"

    diff = _run(["dvc", "metrics", "diff", "--all"], repo, env)
    assert "metrics/baseline.json" in diff and "metrics/finetuned.json" in diff
    assert "decision.choice.accuracy" in diff
    _run(["dvc", "plots", "show", "-o", str(repo / "plots_html")], repo, env)
    html = (repo / "plots_html" / "index.html").read_text()
    assert "Fine-tuned model decisions" in html and "Base model decisions" in html


def _check_release(repo: Path, finetuned: dict) -> None:
    """The release holds the adapter and a card whose metadata are the run's metrics (the card's
    `base_model`, a hub id, only for a hub model: the embedded run checks it)."""
    from huggingface_hub import ModelCard

    from medqa.release import card_results

    release = repo / "models/release"
    assert (release / "adapter_model.safetensors").read_bytes() == (
        repo / "models/adapter/adapter_model.safetensors").read_bytes()
    card = ModelCard.load(release / "README.md")
    assert card.data.library_name == "peft"
    found = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert found == pytest.approx({label: value for label, _, value in card_results(finetuned)}, abs=1e-6)
    assert found["Decision accuracy (choice)"] == finetuned["decision"]["choice"]["accuracy"]
    assert "4 test questions" in card.text and "[More Information Needed]" not in card.text


def test_the_embedded_run_names_its_model_and_judge(embedded):
    """`dvc repro` on the embedded default: evaluated in fp32 on a CPU; the judge, the card's base model
    and the report name SmolLM2, the report as a weak judge. Slow: the whole pipeline on the real model."""
    from huggingface_hub import ModelCard

    repo, env, first = embedded
    _assert_evaluated_in_the_weights_dtype(first)
    assert json.loads((repo / "metrics/judge.json").read_text())["judge"] == "smollm2-135m-instruct"
    card = ModelCard.load(repo / "models/release/README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    _check_release(repo, json.loads((repo / "metrics/finetuned.json").read_text()))
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
        _succeeded(commands[label], proc.returncode, output)
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


def _commit(repo: Path, env: dict, message: str) -> None:
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", message, "--allow-empty"], repo, env)


def _clone(repo: Path, dest: Path, env: dict) -> Path:
    _run(["git", "clone", "-q", str(repo), str(dest)], repo.parent, env)
    return dest


def _assert_up_to_date(clone: Path, env: dict) -> None:
    status = _run(["dvc", "status"], clone, env)
    assert "Data and pipelines are up to date." in status, status
    assert _stages_run(_run(["dvc", "repro"], clone, env)) == set()


def test_push_then_pull_in_a_fresh_clone_needs_no_rerun(project, tmp_path):
    repo, env = project
    _run(["dvc", "remote", "add", "-f", "-d", "storage", str(tmp_path / "remote")], repo, env)
    _commit(repo, env, "results and remote")
    pushed = _run(["dvc", "push"], repo, env)
    assert "pushed" in pushed
    stored = {p.name for p in (tmp_path / "remote").rglob("*") if p.is_file()}
    assert stored, "nothing reached the remote"

    # The adapter as a registry artifact: a version tag, then fetched by name without a clone.
    _run(["git", "tag", "-a", "pubmedqa-adapter@v0.1.0", "-m", "Registered version v0.1.0"], repo, env)
    _run(["dvc", "artifacts", "get", str(repo), "pubmedqa-adapter", "-o", str(tmp_path / "fetched")], tmp_path, env)
    fetched = tmp_path / "fetched/adapter_model.safetensors"
    assert fetched.read_bytes() == (repo / "models/adapter/adapter_model.safetensors").read_bytes()
    assert (tmp_path / "fetched/README.md").read_text() == (repo / "models/release/README.md").read_text()

    clone = _clone(repo, tmp_path / "clone", env)
    assert not (clone / "models/adapter").exists()
    _run(["dvc", "pull", "finetune"], clone, env)
    assert (clone / "models/adapter/adapter_model.safetensors").exists()
    assert not (clone / "models/checkpoints").exists()  # never shared
    _run(["dvc", "pull"], clone, env)
    _assert_up_to_date(clone, env)

    lazy = _clone(repo, tmp_path / "lazy", env)
    assert _stages_run(_run(["dvc", "repro", "--pull", "--allow-missing"], lazy, env)) == set()

    # An experiment run in one clone, shared through git + the DVC remote, applied in another.
    answers = (clone / "data/predictions/finetuned.jsonl").read_text()
    ran = _run(["dvc", "exp", "run", "-n", "three-epochs", "-S", "train.epochs=3"], clone, env)
    # The judge re-runs only if the fine-tuned answers changed (a tiny random model's may not).
    changed = (clone / "data/predictions/finetuned.jsonl").read_text() != answers
    assert _stages_run(ran) == ({"check_params", "finetune", "finetuned_eval", "report", "release"}
                                | ({"judge"} if changed else set()))
    _run(["dvc", "exp", "push", "origin", "three-epochs"], clone, env)
    other = _clone(repo, tmp_path / "other", env)
    _run(["dvc", "exp", "pull", "origin", "three-epochs"], other, env)
    shown = _run(["dvc", "exp", "show", "--no-pager", "--csv"], other, env)
    assert "three-epochs" in shown and "decision.choice.accuracy" in shown
    _run(["dvc", "exp", "apply", "three-epochs"], other, env)
    _run(["dvc", "pull"], other, env)
    adapter = "models/adapter/adapter_model.safetensors"
    assert (other / adapter).read_bytes() == (clone / adapter).read_bytes()
    assert _stages_run(_run(["dvc", "repro"], other, env)) == set()


@pytest.fixture
def sshd(tmp_path):
    """A real OpenSSH server on 127.0.0.1 (a free port), accepting one throw-away key."""
    import getpass
    import socket
    import time

    server = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if server is None:
        pytest.skip("sshd is not installed (Debian's openssh-server; .ci/run installs it)")
    privsep = Path("/run/sshd")
    if not privsep.exists():
        try:
            privsep.mkdir(mode=0o755, parents=True)
        except OSError:
            pytest.skip("sshd needs /run/sshd, which this user cannot create")
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\nSubsystem sftp internal-sftp\n"
    )
    proc = subprocess.Popen([server, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not start: {proc.communicate()[0][-2000:]}")
            time.sleep(0.1)
    yield {"port": port, "key": d / "client_key", "user": getpass.getuser()}
    proc.terminate()
    proc.wait(timeout=10)


def test_round_trip_over_ssh(project, sshd, tmp_path):
    repo, env = project
    url = f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}{tmp_path / 'ssh-remote'}"
    _run(["dvc", "remote", "add", "-f", "ssh", url], repo, env)
    _commit(repo, env, "ssh remote")
    # The key path is machine-specific: it goes in .dvc/config.local, which git never sees.
    _run(["dvc", "remote", "modify", "--local", "ssh", "keyfile", str(sshd["key"])], repo, env)
    _run(["dvc", "push", "-r", "ssh"], repo, env)
    assert any((tmp_path / "ssh-remote").rglob("*"))

    clone = _clone(repo, tmp_path / "clone", env)
    assert "keyfile" not in (clone / ".dvc/config").read_text()
    _run(["dvc", "remote", "modify", "--local", "ssh", "keyfile", str(sshd["key"])], clone, env)
    _run(["dvc", "pull", "-r", "ssh"], clone, env)
    assert (clone / "models/adapter/adapter_model.safetensors").exists()
    _assert_up_to_date(clone, env)


def test_a_killed_stage_is_never_taken_as_done_and_a_rerun_gives_the_same_outputs(project):
    """SIGKILL inside baseline_eval; then everything the evaluations depend on, run again from scratch,
    gives byte-identical outputs. Slow: seven stages run again."""
    repo, env = project
    outputs = ["data/raw/pubmedqa.jsonl", "data/formatted/examples.jsonl", "data/split/train.jsonl",
               "data/split/test.jsonl", "data/predictions/baseline.jsonl", "metrics/baseline.json",
               "data/predictions/finetuned.jsonl", "metrics/finetuned.json"]
    before = {name: (repo / name).read_bytes() for name in outputs}
    _kill_after_a_kept_batch(repo, env, "baseline_eval")  # inside the stage, after its answers, before its outputs
    status = _run(["dvc", "status"], repo, env)
    assert "baseline_eval" in status, status
    assert "Data and pipelines are up to date." not in status

    # Everything the two evaluations depend on, run again (the judge, report and release only read them),
    # computed afresh: without the killed run's kept answers.
    shutil.rmtree(repo / "data/progress/baseline_eval")
    rerun = _run(["dvc", "repro", "--force", "--no-run-cache", "baseline_eval", "finetuned_eval"], repo, env)
    assert _stages_run(rerun) == ALL_STAGES - {"judge", "report", "harness_task", "release"}
    for name in outputs:  # same params and seed: byte-identical data, generations and metrics
        assert (repo / name).read_bytes() == before[name], name


def _kept_batches(repo: Path, stage: str) -> int:
    return sum(len(read_jsonl(p)) for p in (repo / "data/progress" / stage).glob("*.jsonl"))


def _kill_after_a_kept_batch(repo: Path, env: dict, stage: str) -> None:
    """`dvc repro --force` of `stage` in its own process group, SIGKILLed as a whole once the stage
    has kept a finished batch (a progress event, not a timer)."""
    import signal
    import time

    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", stage], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while _kept_batches(repo, stage) < 1:
        assert proc.poll() is None, f"{stage} ended before a batch was kept"
        assert time.monotonic() < deadline, f"{stage} kept no batch in 600 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# stage: its outputs. baseline_eval stands for both eval stages: finetuned_eval runs the same
# `run_evaluation` with the same kind of progress (its own folder; the adapter's files in its
# fingerprint), so a third case would re-test the same code at a minute's cost (docs/pipeline.md).
RESUMABLE = {
    "baseline_eval": ["data/predictions/baseline.jsonl", "data/predictions/baseline_official.json",
                      "metrics/baseline.json"],
    "judge": ["data/predictions/judge.jsonl", "metrics/judge.json"],
}


@pytest.mark.parametrize("stage", sorted(RESUMABLE))
def test_a_killed_stage_goes_on_from_its_finished_questions(project, stage):
    """Killed after a batch (the judge: a question), a forced re-run through DVC reuses the finished
    questions and writes what an uninterrupted run writes, byte for byte; a changed param starts afresh.
    Slow: the stage runs five times, twice killed."""
    repo, env = project
    _run(["dvc", "repro"], repo, env)
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["eval"]["batch_size"] = 1  # the eval stages: four batches of one question
    params["judge"]["max_samples"] = 3
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    outputs = [repo / name for name in RESUMABLE[stage]]
    rerun = ["dvc", "repro", "--force", "--no-run-cache", "--single-item", stage]
    try:
        _run(rerun, repo, env)
        uninterrupted = [p.read_bytes() for p in outputs]
        assert _kept_batches(repo, stage) == 0  # a finished stage leaves no progress behind

        _kill_after_a_kept_batch(repo, env, stage)
        resumed = _run(rerun, repo, env)
        reused = re.search(r"(\d+) of (\d+) questions reused", resumed)
        assert reused and 1 <= int(reused.group(1)) <= int(reused.group(2)), resumed[-3000:]
        assert [p.read_bytes() for p in outputs] == uninterrupted

        _kill_after_a_kept_batch(repo, env, stage)
        params["eval"]["bootstrap"] = 40
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert "questions reused" not in _run(rerun, repo, env)
    finally:
        params_file.write_text(original)
        _run(["dvc", "repro"], repo, env)  # the module's outputs back, from DVC's run cache


def test_a_changed_source_file_re_runs_download(tmp_path, tokenizer):
    data = write_official_dir(tmp_path / "pubmedqa", n=40, n_test=10)
    repo, env = make_repo(tmp_path, data, save_tiny_model(tmp_path / "tiny-model", tokenizer))
    assert _stages_run(_run(["dvc", "repro", "download"], repo, env)) == {"check_params", "download"}
    assert "up to date" in _run(["dvc", "status", "download"], repo, env)
    raw = (repo / "data/raw/pubmedqa.jsonl").read_bytes()

    records = json.loads((data / "ori_pqal.json").read_text())
    first = next(iter(records))
    records[first]["LONG_ANSWER"] = "An edited long answer."
    (data / "ori_pqal.json").write_text(json.dumps(records))  # same path, same params, new content
    status = _run(["dvc", "status", "download"], repo, env)
    assert "changed deps" in status and str(data) in status, status
    assert _stages_run(_run(["dvc", "repro", "download"], repo, env)) == {"download"}
    assert (repo / "data/raw/pubmedqa.jsonl").read_bytes() != raw
    assert "An edited long answer." in (repo / "data/raw/pubmedqa.jsonl").read_text()

    # The hub reference file is a dependency in the same way.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "data/pubmedqa-hub.yaml"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert (repo / "data/pubmedqa-hub.yaml").is_file()  # committed, so every clone has the default source
    status = _run(["dvc", "status", "download"], repo, env)
    assert re.search(r"(new|modified):\s+data/pubmedqa-hub.yaml", status), status


def test_a_killed_finetune_resumes_and_gives_the_same_adapter(project):
    """SIGKILL the finetune stage after its first checkpoint: dvc status says it is not done, and
    dvc repro resumes from the checkpoint and ends with the adapter an uninterrupted run gives."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    from medqa.checkpoints import last_complete_checkpoint

    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=4, eval_steps=1, save_steps=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    checkpoints, adapter = repo / "models/checkpoints", repo / "models/adapter/adapter_model.safetensors"

    _run(["dvc", "repro", "finetune"], repo, env)
    straight = load_file(adapter)
    shutil.rmtree(checkpoints)

    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "finetune"], cwd=repo, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not any(last_complete_checkpoint(run) for run in checkpoints.glob("*")):
        assert proc.poll() is None and time.monotonic() < deadline, "finetune ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not adapter.exists()  # DVC removed the old output; the killed run wrote no new one
    status = _run(["dvc", "status", "finetune"], repo, env)
    assert "finetune" in status and "up to date" not in status, status

    # Every output of the straight run is in DVC's cache and dvc.lock still names it, so a plain repro
    # would check those out without training (what a user gets back): --force makes it train, and resume.
    rerun = _run(["dvc", "repro", "--force", "--single-item", "finetune"], repo, env)
    assert "resuming from" in rerun, rerun[-3000:]
    resumed = load_file(adapter)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], atol=1e-4), key


def _fail(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{' '.join(cmd)} should have failed:\n{output[-4000:]}"
    return output


def _outputs(repo: Path) -> dict[str, bytes]:
    """Every file of every output dvc.lock records, by path: what a run has to keep."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    files = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = repo / out["path"]
            for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
                files[str(f.relative_to(repo))] = f.read_bytes()
    return files


def test_a_failed_run_loses_nothing_and_says_how_to_restore(project):
    repo, env = project
    _run(["dvc", "repro"], repo, env)
    _commit(repo, env, "before failures")
    before = _outputs(repo)
    assert {"metrics/train.json", "metrics/baseline.json", "dvclive/metrics.json"} <= set(before)

    # Fails inside finetune (the answers do not fit 32 tokens: only the data can tell), after DVC
    # deleted finetune's outputs.
    failed = _fail(["dvc", "exp", "run", "-S", "train.max_length=32"], repo, env)
    assert "raise train.max_length" in failed
    assert re.search(r"finetune: failed; .*`dvc checkout` brings them back", failed), failed[-2000:]
    assert "`git show HEAD:params.yaml > params.yaml` restores" in failed
    assert not (repo / "metrics/train.json").exists()
    _restore_params(repo, env)
    _run(["dvc", "checkout"], repo, env)
    assert _outputs(repo) == before

    # A bad param stops the run in check_params, before DVC has deleted anything of the other stages.
    failed = _fail(["dvc", "exp", "run", "-S", "model.name=no-such-model"], repo, env)
    assert "unknown model.name 'no-such-model'" in failed
    assert _stages_run(failed) == {"check_params"}
    assert {k: v for k, v in _outputs(repo).items() if k != "data/params.checked"} == {
        k: v for k, v in before.items() if k != "data/params.checked"}
    _restore_params(repo, env)
    _run(["dvc", "checkout"], repo, env)
    assert _outputs(repo) == before

    # A failed experiment stays failed: with a value of the same width (DVC's YAML writer keeps the
    # comments' columns), `git checkout params.yaml` can keep it; the hinted command never does.
    _run(["dvc", "exp", "run", "-S", "eval.max_samples=4"], repo, env)  # the value it has: DVC's layout of the file
    _commit(repo, env, "params.yaml as DVC writes it")
    committed = (repo / "params.yaml").read_bytes()
    for _ in range(4):
        failed = _fail(["dvc", "exp", "run", "-S", "eval.max_samples=0"], repo, env)
        assert "eval.max_samples is 0" in failed and len((repo / "params.yaml").read_bytes()) == len(committed)
        _restore_params(repo, env)
        assert (repo / "params.yaml").read_bytes() == committed
        assert "eval.max_samples is 0" not in _run(["dvc", "exp", "run", "-S", "split.seed=42"], repo, env)

    # params.yaml that is not YAML: DVC stops before any stage.
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params + "train: [unclosed\n")
    failed = _fail(["dvc", "repro"], repo, env)
    assert "params.yaml" in failed and not _stages_run(failed)
    (repo / "params.yaml").write_text(params)
    assert _outputs(repo) == before
    # Only check_params ran with a bad value (and succeeded), so only it is out of date.
    assert _stages_run(_run(["dvc", "repro"], repo, env)) <= {"check_params"}
    assert _outputs(repo) == before


def _restore_params(repo: Path, env: dict) -> None:
    """What a failed stage's last line says to run to get the committed params.yaml back."""
    _run(["bash", "-c", "git show HEAD:params.yaml > params.yaml"], repo, env)


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
    _run(["dvc", "repro"], repo, env)  # what `make run` leaves (a no-op after the fixture's run)
    _commit(repo, env, "make run")
    block = _readme_block("<!-- after make run -->")
    assert block.startswith(". .venv/bin/activate") and "dvc exp run" in block and "dvc metrics diff" in block
    shell = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    shell["PATH"] = "/usr/local/bin:/usr/bin:/bin"
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
    ran = _stages_run(output)
    assert ran - {"judge"} == set(listed.group(1).split(", ")) - {"judge"}, (ran, listed.group(1))
    assert "finetune" in ran
    assert (repo / "dvc_plots" / "index.html").exists()
