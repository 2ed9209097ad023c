"""End to end: the pipeline's mechanics (re-runs, experiments, push/pull, kills, resume, restore) in a
throw-away git + DVC copy of the project, run once for the module and shared by its tests: a tiny random
local model as `model.name` and `judge.model`, tiny params, a small synthetic set. What is about the embedded
default model is tested in test_embedded_run.py.
Slow, all of it: every stage is a Python process that DVC starts (torch and transformers loaded
anew each time), and a test runs several stages, most of them more than once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from medqa.io import read_jsonl
from tests.conftest import free_port, write_official_dir
from tests.pipeline_repo import (
    ALL_STAGES,
    FAKE_TOKEN,
    assert_evaluated_in_the_weights_dtype,
    check_release,
    commit,
    make_repo,
    run,
    save_tiny_model,
    stages_run,
)

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def project(tmp_path_factory, tokenizer) -> tuple[Path, dict]:
    """The project with tiny params and a tiny random model on a synthetic set, before any run."""
    work = tmp_path_factory.mktemp("pipeline")
    return make_repo(work, write_official_dir(work / "pubmedqa", n=60, n_test=10),
                     save_tiny_model(work / "tiny-model", tokenizer))


def test_pipeline_runs_then_reruns_only_what_changed(project):
    """Slow: the whole pipeline, then two experiments that re-run most of it."""
    repo, env = project
    first = run(["dvc", "repro"], repo, env)
    assert stages_run(first) == ALL_STAGES
    assert_evaluated_in_the_weights_dtype(first)

    again = run(["dvc", "repro"], repo, env)
    assert stages_run(again) == set(), again

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
    assert (baseline["n_questions"], baseline["n_answers"]) == (4, 3)
    assert baseline["decision"]["choice"]["n_questions"] == 4 and baseline["decision"]["generated"]["n_questions"] == 3
    # Every test question's decisions; the generations of the seeded sample only, the same for both models.
    predictions = read_jsonl(repo / "data/predictions/baseline.jsonl")
    assert len(predictions) == 4 and all(p["prompt_id"] and p["pmid"] for p in predictions)
    assert all(p["decision_choice"] in ("yes", "no", "maybe") and p["decision_offsets"] for p in predictions)
    sampled = [p["pmid"] for p in predictions if p["generation"] is not None]
    assert len(sampled) == 3 and all(p["decision_generated"] is None and p["rougeL"] is None
                                     for p in predictions if p["pmid"] not in sampled)
    tuned_rows = read_jsonl(repo / "data/predictions/finetuned.jsonl")
    assert [p["pmid"] for p in tuned_rows if p["generation"] is not None] == sampled
    official = json.loads((repo / "data/predictions/baseline_official.json").read_text())
    assert official == {p["pmid"]: p["decision_choice"] for p in predictions}
    # Scored as PubMedQA's evaluation.py scores it, on these questions' ground truth: the choice accuracy.
    from medqa.evaluation.official import score_official

    (repo.parent / "truth.json").write_text(json.dumps({p["pmid"]: p["reference_decision"] for p in predictions}))
    scored = score_official(repo / "data/predictions/baseline_official.json", repo.parent / "truth.json")
    assert scored["accuracy"] == pytest.approx(baseline["decision"]["choice"]["accuracy"])
    assert (repo / "models/adapter/adapter_model.safetensors").exists()
    report = (repo / "reports/report.md").read_text()
    assert "| Decision accuracy: majority class" in report and "Test labels: " in report
    assert "Not comparable with published PubMedQA results: this run scored 4 of the 500" in report
    assert "| Decision accuracy (choice)" in report and "![loss curves](loss.png)" in report
    assert "| Decision accuracy (choice + offsets) minus the majority class's" in report
    assert f"({n_val} validation questions)" in report
    assert (repo / "reports/loss.png").stat().st_size > 1000
    assert "![decisions](decisions.png)" in report and (repo / "reports/decisions.png").stat().st_size > 1000
    confusion = (repo / "reports/decisions_finetuned.csv").read_text().splitlines()
    assert confusion[0] == "pmid,reference,decision" and len(confusion) == 5
    assert train["base_val_loss"] > 0 and "for the base model at step 0" in report
    judged = json.loads((repo / "metrics/judge.json").read_text())
    assert judged["n_questions"] == 2 and judged["n_test_questions"] == 3
    assert set(judged["criteria"]) == {"helpfulness", "relevance", "completeness", "correctness"}
    assert sum(judged["head_to_head"][o]["mean"] for o in ("win", "tie", "loss")) == pytest.approx(1.0)
    verdicts = read_jsonl(repo / "data/predictions/judge.jsonl")
    assert len(verdicts) == 2 and {v["pmid"] for v in verdicts} <= set(sampled)
    assert all(1 <= v["ratings"][m]["correctness"]["score"] <= 4 for v in verdicts for m in ("baseline", "finetuned"))
    assert "## LLM judge" in report and "**A weak judge.**" in report and "![head to head](judge.png)" in report
    assert (repo / "reports/judge.png").stat().st_size > 1000
    check_release(repo, finetuned)

    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline run"], repo, env)
    generation = run(["dvc", "exp", "run", "-S", "generation.max_new_tokens=6"], repo, env)
    # check_params runs on any param change; its output never changes, so it re-runs nothing else.
    assert stages_run(generation) == {"check_params", "baseline_eval", "finetuned_eval", "cv_rule", "judge", "report",
                                      "release"}

    judge = run(["dvc", "exp", "run", "-S", "judge.max_samples=3"], repo, env)
    assert stages_run(judge) == {"check_params", "judge", "report"}
    assert json.loads((repo / "metrics/judge.json").read_text())["n_questions"] == 3

    # (A training param's experiment, and the stages it re-runs: the README test's `dvc exp run`.)
    assert (repo / "models/checkpoints").is_dir()  # scratch for resuming, kept by DVC between runs
    leaks = [p for p in repo.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks, f"HF_TOKEN leaked into {leaks}"

    diff = run(["dvc", "metrics", "diff", "--all"], repo, env)
    assert "metrics/baseline.json" in diff and "metrics/finetuned.json" in diff
    assert "decision.choice.accuracy" in diff
    run(["dvc", "plots", "show", "-o", str(repo / "plots_html")], repo, env)
    html = (repo / "plots_html" / "index.html").read_text()
    assert "Fine-tuned model decisions" in html and "Base model decisions" in html


def _clone(repo: Path, dest: Path, env: dict) -> Path:
    run(["git", "clone", "-q", str(repo), str(dest)], repo.parent, env)
    return dest


def _assert_up_to_date(clone: Path, env: dict) -> None:
    status = run(["dvc", "status"], clone, env)
    assert "Data and pipelines are up to date." in status, status
    assert stages_run(run(["dvc", "repro"], clone, env)) == set()


def test_push_then_pull_in_a_fresh_clone_needs_no_rerun(project, tmp_path):
    repo, env = project
    run(["dvc", "remote", "add", "-f", "-d", "storage", str(tmp_path / "remote")], repo, env)
    commit(repo, env, "results and remote")
    pushed = run(["dvc", "push"], repo, env)
    assert "pushed" in pushed
    stored = {p.name for p in (tmp_path / "remote").rglob("*") if p.is_file()}
    assert stored, "nothing reached the remote"

    # The adapter as a registry artifact: a version tag, then fetched by name without a clone.
    run(["git", "tag", "-a", "pubmedqa-adapter@v0.1.0", "-m", "Registered version v0.1.0"], repo, env)
    run(["dvc", "artifacts", "get", str(repo), "pubmedqa-adapter", "-o", str(tmp_path / "fetched")], tmp_path, env)
    fetched = tmp_path / "fetched/adapter_model.safetensors"
    assert fetched.read_bytes() == (repo / "models/adapter/adapter_model.safetensors").read_bytes()
    assert (tmp_path / "fetched/README.md").read_text() == (repo / "models/release/README.md").read_text()

    clone = _clone(repo, tmp_path / "clone", env)
    assert not (clone / "models/adapter").exists()
    run(["dvc", "pull", "finetune"], clone, env)
    assert (clone / "models/adapter/adapter_model.safetensors").exists()
    assert not (clone / "models/checkpoints").exists()  # never shared
    run(["dvc", "pull"], clone, env)
    _assert_up_to_date(clone, env)

    lazy = _clone(repo, tmp_path / "lazy", env)
    assert stages_run(run(["dvc", "repro", "--pull", "--allow-missing"], lazy, env)) == set()

    # An experiment run in one clone, shared through git + the DVC remote, applied in another.
    answers = (clone / "data/predictions/finetuned.jsonl").read_text()
    ran = run(["dvc", "exp", "run", "-n", "three-epochs", "-S", "train.epochs=3"], clone, env)
    # The judge re-runs only if the fine-tuned answers changed (a tiny random model's may not).
    changed = (clone / "data/predictions/finetuned.jsonl").read_text() != answers
    assert stages_run(ran) == ({"check_params", "finetune", "finetuned_eval", "report", "release"}
                                | ({"judge", "cv_rule"} if changed else set()))
    run(["dvc", "exp", "push", "origin", "three-epochs"], clone, env)
    other = _clone(repo, tmp_path / "other", env)
    run(["dvc", "exp", "pull", "origin", "three-epochs"], other, env)
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], other, env)
    assert "three-epochs" in shown and "decision.choice.accuracy" in shown
    run(["dvc", "exp", "apply", "three-epochs"], other, env)
    run(["dvc", "pull"], other, env)
    adapter = "models/adapter/adapter_model.safetensors"
    assert (other / adapter).read_bytes() == (clone / adapter).read_bytes()
    assert stages_run(run(["dvc", "repro"], other, env)) == set()


@pytest.fixture
def sshd(tmp_path):
    """A real OpenSSH server on 127.0.0.1 (a free port), accepting one throw-away key."""
    import getpass
    import socket
    import time

    # Skipped where no sshd can run, but failed where REQUIRE_SSHD is set (.ci/run sets it and installs sshd).
    missing = pytest.fail if os.environ.get("REQUIRE_SSHD") else pytest.skip
    server = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if server is None:
        missing("sshd is not installed (Debian's openssh-server; .ci/run installs it)")
    privsep = Path("/run/sshd")
    if not privsep.exists():
        try:
            privsep.mkdir(mode=0o755, parents=True)
        except OSError:
            missing("sshd needs /run/sshd, which this user cannot create")
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
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
    run(["dvc", "remote", "add", "-f", "ssh", url], repo, env)
    commit(repo, env, "ssh remote")
    # The key path is machine-specific: it goes in .dvc/config.local, which git never sees.
    run(["dvc", "remote", "modify", "--local", "ssh", "keyfile", str(sshd["key"])], repo, env)
    run(["dvc", "push", "-r", "ssh"], repo, env)
    assert any((tmp_path / "ssh-remote").rglob("*"))

    clone = _clone(repo, tmp_path / "clone", env)
    assert "keyfile" not in (clone / ".dvc/config").read_text()
    run(["dvc", "remote", "modify", "--local", "ssh", "keyfile", str(sshd["key"])], clone, env)
    run(["dvc", "pull", "-r", "ssh"], clone, env)
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
    progress = repo / "data/progress/baseline_eval"
    _kill_after_a_kept_batch(repo, env, "baseline_eval", progress)  # inside the stage, after its answers, before its outputs
    status = run(["dvc", "status"], repo, env)
    assert "baseline_eval" in status, status
    assert "Data and pipelines are up to date." not in status

    # Everything the two evaluations depend on, run again (the judge, report and release only read them),
    # computed afresh: without the killed run's kept answers.
    shutil.rmtree(progress)
    rerun = run(["dvc", "repro", "--force", "--no-run-cache", "baseline_eval", "finetuned_eval"], repo, env)
    assert stages_run(rerun) == ALL_STAGES - {"judge", "report", "harness_task", "release", "cv_folds", "cv_rule"}
    for name in outputs:  # same params and seed: byte-identical data, generations and metrics
        assert (repo / name).read_bytes() == before[name], name


def _kept_batches(progress: Path) -> int:
    """The finished batches kept in a stage's progress folder."""
    return sum(len(read_jsonl(p)) for p in progress.glob("*.jsonl"))


def _kill_after_a_kept_batch(repo: Path, env: dict, stage: str, progress: Path) -> None:
    """`dvc repro --force` of `stage` in its own process group, SIGKILLed as a whole once the stage
    has kept a finished batch in `progress` (a progress event, not a timer)."""
    import signal
    import time

    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", stage], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while _kept_batches(progress) < 1:
        assert proc.poll() is None, f"{stage} ended before a batch was kept"
        assert time.monotonic() < deadline, f"{stage} kept no batch in 600 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _new_machine(repo: Path, dest: Path, env: dict) -> Path:
    """A fresh clone of `repo`'s last commit with its workspace's params.yaml, whose DVC outputs come
    from `repo`'s cache (what `dvc pull` gives a new machine, without a remote)."""
    clone = _clone(repo, dest, env)
    shutil.copy2(repo / "params.yaml", clone / "params.yaml")
    run(["dvc", "cache", "dir", "--local", str(repo / ".dvc/cache")], clone, env)
    run(["dvc", "checkout"], clone, env)
    return clone


# stage: its outputs. baseline_eval stands for both eval stages: finetuned_eval runs the same
# `run_evaluation` with the same kind of progress (its own folder; the adapter's files in its
# fingerprint), so a third case would re-test the same code at a minute's cost (docs/pipeline.md).
RESUMABLE = {
    "baseline_eval": ["data/predictions/baseline.jsonl", "data/predictions/baseline_official.json",
                      "metrics/baseline.json"],
    "judge": ["data/predictions/judge.jsonl", "metrics/judge.json"],
}


@pytest.mark.parametrize("stage", sorted(RESUMABLE))
def test_a_killed_stage_goes_on_from_its_finished_questions(project, stage, tmp_path):
    """Killed after a batch (the judge: a question), a forced re-run through DVC reuses the finished
    questions and writes what an uninterrupted run writes, byte for byte; a changed param starts afresh.
    Each runs as on spot machines, with MEDQA_CHECKPOINT_DIR set: its progress goes there, not in the
    clone's data/progress, and the re-run after the kill is on a new machine (a fresh clone) with the same
    directory. Slow: the stage runs five times, twice killed."""
    repo, env = project
    run(["dvc", "repro"], repo, env)
    commit(repo, env, "before the kills")
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["eval"]["batch_size"] = 1  # the eval stages: four batches of one question
    params["judge"]["max_samples"] = 3
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    stage_env = dict(env, MEDQA_CHECKPOINT_DIR=str(tmp_path / "bucket"))
    progress = tmp_path / "bucket/progress" / stage
    outputs = RESUMABLE[stage]
    rerun = ["dvc", "repro", "--force", "--no-run-cache", "--single-item", stage]
    try:
        run(rerun, repo, stage_env)
        uninterrupted = [(repo / name).read_bytes() for name in outputs]
        assert _kept_batches(progress) == 0  # a finished stage leaves no progress behind

        _kill_after_a_kept_batch(repo, stage_env, stage, progress)
        assert _kept_batches(repo / "data/progress" / stage) == 0  # all of it in the bucket
        resumed_in = _new_machine(repo, tmp_path / "new-machine", env)
        resumed = run(rerun, resumed_in, stage_env)
        reused = re.search(r"(\d+) of (\d+) questions reused", resumed)
        assert reused and 1 <= int(reused.group(1)) <= int(reused.group(2)), resumed[-3000:]
        assert [(resumed_in / name).read_bytes() for name in outputs] == uninterrupted

        _kill_after_a_kept_batch(repo, stage_env, stage, progress)
        params["eval"]["bootstrap"] = 40
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert "questions reused" not in run(rerun, repo, stage_env)
    finally:
        params_file.write_text(original)
        run(["dvc", "repro"], repo, env)  # the module's outputs back, from DVC's run cache


def test_a_changed_source_file_re_runs_download(tmp_path, tokenizer):
    data = write_official_dir(tmp_path / "pubmedqa", n=40, n_test=10)
    repo, env = make_repo(tmp_path, data, save_tiny_model(tmp_path / "tiny-model", tokenizer))
    assert stages_run(run(["dvc", "repro", "download"], repo, env)) == {"check_params", "download"}
    assert "up to date" in run(["dvc", "status", "download"], repo, env)
    raw = (repo / "data/raw/pubmedqa.jsonl").read_bytes()

    records = json.loads((data / "ori_pqal.json").read_text())
    first = next(iter(records))
    records[first]["LONG_ANSWER"] = "An edited long answer."
    (data / "ori_pqal.json").write_text(json.dumps(records))  # same path, same params, new content
    status = run(["dvc", "status", "download"], repo, env)
    assert "changed deps" in status and str(data) in status, status
    assert stages_run(run(["dvc", "repro", "download"], repo, env)) == {"download"}
    assert (repo / "data/raw/pubmedqa.jsonl").read_bytes() != raw
    assert "An edited long answer." in (repo / "data/raw/pubmedqa.jsonl").read_text()

    # The hub reference file is a dependency in the same way.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "data/pubmedqa-hub.yaml"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert (repo / "data/pubmedqa-hub.yaml").is_file()  # committed, so every clone has the default source
    status = run(["dvc", "status", "download"], repo, env)
    assert re.search(r"(new|modified):\s+data/pubmedqa-hub.yaml", status), status


def test_a_killed_finetune_resumes_and_gives_the_same_adapter(project):
    """SIGKILL the finetune stage after its first checkpoint: dvc status says it is not done, and
    dvc repro resumes from the checkpoint and ends with the adapter an uninterrupted run gives."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    from medqa.training.checkpoints import last_complete_checkpoint

    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=4, eval_steps=1, save_steps=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    checkpoints, adapter = repo / "models/checkpoints", repo / "models/adapter/adapter_model.safetensors"

    run(["dvc", "repro", "finetune"], repo, env)
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
    status = run(["dvc", "status", "finetune"], repo, env)
    assert "finetune" in status and "up to date" not in status, status

    # Every output of the straight run is in DVC's cache and dvc.lock still names it, so a plain repro
    # would check those out without training (what a user gets back): --force makes it train, and resume.
    rerun = run(["dvc", "repro", "--force", "--single-item", "finetune"], repo, env)
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
    run(["dvc", "repro"], repo, env)
    commit(repo, env, "before failures")
    before = _outputs(repo)
    assert {"metrics/train.json", "metrics/baseline.json", "dvclive/metrics.json"} <= set(before)

    # Fails inside finetune (only the machine that trains can tell: check_params checks the params against
    # the model and the data), after DVC deleted finetune's outputs.
    failed = _fail(["dvc", "exp", "run", "-S", "train.liger_kernel=true"], repo, env)
    assert "train.liger_kernel=true needs CUDA" in failed
    assert re.search(r"finetune: failed; .*`dvc checkout` brings them back", failed), failed[-2000:]
    assert "`git checkout -- params.yaml` restores the committed params" in failed
    assert not (repo / "metrics/train.json").exists()
    _restore_params(repo, env)
    run(["dvc", "checkout"], repo, env)
    assert _outputs(repo) == before

    # A bad param stops the run in check_params, before DVC has deleted anything of the other stages.
    failed = _fail(["dvc", "exp", "run", "-S", "model.name=no-such-model"], repo, env)
    assert "unknown model.name 'no-such-model'" in failed
    assert stages_run(failed) == {"check_params"}
    assert {k: v for k, v in _outputs(repo).items() if k != "data/params.checked"} == {
        k: v for k, v in before.items() if k != "data/params.checked"}
    _restore_params(repo, env)
    run(["dvc", "checkout"], repo, env)
    assert _outputs(repo) == before

    # A failed experiment's value of the same width (DVC's YAML writer keeps the comments' columns): the
    # committed bytes come back (the race this guards, forced: tests/test_params.py).
    run(["dvc", "exp", "run", "-S", "eval.max_samples=4"], repo, env)  # the value it has: DVC's layout of the file
    commit(repo, env, "params.yaml as DVC writes it")
    committed = (repo / "params.yaml").read_bytes()
    failed = _fail(["dvc", "exp", "run", "-S", "eval.max_samples=0"], repo, env)
    assert "eval.max_samples is 0" in failed and len((repo / "params.yaml").read_bytes()) == len(committed)
    _restore_params(repo, env)
    assert (repo / "params.yaml").read_bytes() == committed
    assert "eval.max_samples is 0" not in run(["dvc", "exp", "run", "-S", "split.seed=42"], repo, env)

    # params.yaml that is not YAML: DVC stops before any stage.
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params + "train: [unclosed\n")
    failed = _fail(["dvc", "repro"], repo, env)
    assert "params.yaml" in failed and not stages_run(failed)
    (repo / "params.yaml").write_text(params)
    assert _outputs(repo) == before
    # Only check_params ran with a bad value (and succeeded), so only it is out of date.
    assert stages_run(run(["dvc", "repro"], repo, env)) <= {"check_params"}
    assert _outputs(repo) == before


def test_cross_validation_scores_every_non_test_question_out_of_fold(project, tmp_path):
    """cv.folds=[0,1]: one stage per fold, each trained without its own questions, which it scores; every
    non-test question is scored once, and the report shows the estimate. The folds run apart as
    docs/evaluation.md says: fold 0 as a queued experiment, fold 1 on another machine (a clone) that pushes
    DVC's run cache; the experiment with every fold then restores both from the run cache (`--pull`
    fetches fold 1's outputs). Last in this module: it leaves cross-validation on in the workspace."""
    repo, env = project
    run(["dvc", "repro"], repo, env)  # up to date after the tests above; a whole run where this runs alone
    run(["dvc", "remote", "add", "-f", "-d", "storage", str(tmp_path / "remote")], repo, env)
    commit(repo, env, "results and remote")
    run(["dvc", "push", "--run-cache"], repo, env)
    cv = ["-S", "cv.folds=[0,1]"]
    run(["dvc", "exp", "run", "--queue", "-n", "fold-0", *cv, "cv_fold@0"], repo, env)
    run(["dvc", "queue", "start", "-j", "1"], repo, env)
    other = _clone(repo, tmp_path / "other-machine", env)
    elsewhere = run(["dvc", "exp", "run", "--pull", *cv, "cv_fold@1"], other, env)
    assert stages_run(elsewhere) <= {"check_params", "cv_folds", "cv_fold@1"}, elsewhere
    run(["dvc", "push", "--run-cache"], other, env)
    deadline = time.monotonic() + 600
    while re.search(r"\b(Queued|Running)\b", status := run(["dvc", "queue", "status"], repo, env)):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert re.search(r"fold-0 .* Success", status), status
    folds = run(["dvc", "exp", "run", "--pull", *cv], repo, env)
    assert {"cv_rule", "report"} <= stages_run(folds)
    assert all(f"Stage 'cv_fold@{fold}' is cached - skipping run" in folds for fold in (0, 1)), folds
    assert not {"finetune", "baseline_eval", "finetuned_eval", "cv_fold@0", "cv_fold@1"} & stages_run(folds)

    def pmids(path: Path) -> list[str]:
        return [json.loads(line)["pmid"] for line in path.read_text().splitlines()]

    non_test = pmids(repo / "data/split/train.jsonl") + pmids(repo / "data/split/val.jsonl")
    held_out = {f: pmids(repo / f"data/cv/fold-{f}/held_out_scores.jsonl") for f in (0, 1)}
    assert sorted(held_out[0] + held_out[1]) == sorted(non_test)
    for f in (0, 1):
        seen = pmids(repo / f"data/cv/fold-{f}/train.jsonl") + pmids(repo / f"data/cv/fold-{f}/val.jsonl")
        assert seen and not set(seen) & set(held_out[f])
    assert json.loads((repo / "metrics/cv.json").read_text())["n_questions"] == len(non_test)
    assert f"## Cross-validation: 2 folds over {len(non_test)} non-test questions" in (
        repo / "reports/report.md").read_text()


def _restore_params(repo: Path, env: dict) -> None:
    """What a failed stage's last line says to run to get the committed params.yaml back."""
    run(["git", "checkout", "--", "params.yaml"], repo, env)


