"""Fine-tuning on a tiny model: outputs, early stopping, and resume after a kill."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from medqa.decisions.answer_format import AnswerFormat
from medqa.params import PromptParams, params_from_dict
from medqa.prompting.prompts import PromptFormat, format_record
from medqa.report.plots import live_metric_file
from tests.conftest import free_port, train_params

ROOT = Path(__file__).resolve().parents[1]


SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from tests.test_training import train_in_this_process
train_in_this_process(Path(sys.argv[3]), Path(sys.argv[2]), json.loads(sys.argv[1]))
"""


def train_in_this_process(workdir: Path, out: Path, raw: dict) -> None:
    """train_adapter on the workdir's splits, writing under `out`."""
    from medqa.training.recipe import TrainFiles, train_adapter

    # A zero learning rate (the early-stopping test's) is no valid param, but the trainer takes it: set
    # past the schema's check, on this process's own copy.
    lr = raw["train"]["learning_rate"]
    params = params_from_dict(dict(raw, train=dict(raw["train"], learning_rate=lr or 1.0)))
    object.__setattr__(params.train, "learning_rate", lr)
    train_adapter(params, TrainFiles(workdir / "base", workdir / "train.jsonl", workdir / "val.jsonl", out / "adapter",
                                     out / "checkpoints", out / "live", out / "train.json"))


def _start(workdir: Path, out: Path, params: dict) -> subprocess.Popen:
    """Training in a process of its own: for the tests that kill it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(params), str(out), str(workdir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train(workdir: Path, out: Path, params: dict) -> None:
    """Train in this process (no interpreter and torch start-up per run); tests read its log from caplog."""
    train_in_this_process(workdir, out, params)


def _log_from_here(caplog) -> None:
    """caplog holds the project's INFO lines from now on, and nothing logged before."""
    caplog.set_level(logging.INFO, logger="medqa")
    caplog.clear()


def test_training_writes_adapter_history_and_best_step(workdir, tmp_path):
    _train(workdir, tmp_path, train_params())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "adapter").glob("*.bin"))
    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets)  # not peft's hash order, which differs between runs
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["steps"] == 6 and summary["best_step"] in (2, 4, 6) and not summary["resumed"]
    val = pd.read_csv(live_metric_file(tmp_path / "live", "eval/loss"), sep="\t")
    assert list(val["step"]) == [0, 2, 4, 6]  # step 0: the base model's validation loss
    assert summary["base_val_loss"] == pytest.approx(val["loss"].iloc[0])
    assert summary["best_val_loss"] == pytest.approx(val["loss"].iloc[1:].min())
    train = pd.read_csv(live_metric_file(tmp_path / "live", "train/loss"), sep="\t")
    assert list(train["step"]) == [1, 2, 3, 4, 5, 6]
    rates = pd.read_csv(live_metric_file(tmp_path / "live", "train/learning_rate"), sep="\t")
    assert len(rates) == 6 and rates["learning_rate"].iloc[-1] < rates["learning_rate"].max()


def test_early_stopping_stops(workdir, tmp_path):
    # With a zero learning rate the validation loss never improves: patience 1 stops at the second eval.
    _train(workdir, tmp_path, train_params(max_steps=20, eval_steps=1, save_steps=1, learning_rate=0.0,
                                      early_stopping_patience=1, warmup_ratio=0.0))
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 2


def test_resume_after_kill_gives_the_same_adapter(workdir, tmp_path, caplog):
    params = train_params(max_steps=12)
    _train(workdir, tmp_path / "straight", params)

    out = tmp_path / "killed"
    proc = _start(workdir, out, params)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("*/checkpoint-2/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()

    _log_from_here(caplog)
    _train(workdir, out, params)
    assert "resuming from" in caplog.text
    summary = json.loads((out / "train.json").read_text())
    assert summary["resumed"] and summary["steps"] == 12
    # The loss curve of the resumed run has every step, the ones before the kill included.
    curve = pd.read_csv(live_metric_file(out / "live", "train/loss"), sep="\t")
    straight = pd.read_csv(live_metric_file(tmp_path / "straight" / "live", "train/loss"), sep="\t")
    assert list(curve["step"]) == list(range(1, 13))
    assert list(curve["loss"]) == pytest.approx(list(straight["loss"]), abs=1e-4)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key


def test_an_interrupted_checkpoint_is_never_loaded(tmp_path):
    from medqa.training.checkpoints import last_complete_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-8").mkdir()  # killed before its state was written
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "nothing-here") is None


def test_changed_params_start_fresh(workdir, tmp_path, caplog):
    _train(workdir, tmp_path, train_params(max_steps=2))
    _log_from_here(caplog)
    _train(workdir, tmp_path, train_params(max_steps=4))
    assert "resuming from" not in caplog.text
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 4


EXPORTED = {"max_steps": 2, "learning_rate": 0.01}  # the adapter the export tests merge


@pytest.fixture(scope="module")
def trained(workdir, tmp_path_factory) -> Path:
    """One short training run whose adapter the export tests share (under `adapter/`)."""
    out = tmp_path_factory.mktemp("trained")
    _train(workdir, out, train_params(**EXPORTED))
    return out


def test_export_merges_the_adapter(workdir, trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from medqa.modeling.hardware import resolve_hardware
    from medqa.modeling.loading import load_model
    from medqa.release.export import merge_adapter

    merge_adapter(workdir / "base", trained / "adapter", tmp_path / "merged", "float32")
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        adapted = load_model(workdir / "base", resolve_hardware("none", "float32"), trained / "adapter")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
        base = AutoModelForCausalLM.from_pretrained(workdir / "base")(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4)
    assert not torch.allclose(base, merged, atol=1e-4)  # the adapter changed something


@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 2e-3), ("q8_0", 5e-2)])
def test_gguf_export_reads_back_as_the_merged_model(workdir, trained, tmp_path, gguf_type, tolerance):
    """The GGUF file, read back by an independent reader (transformers' GGUF loader), gives the merged
    safetensors model's logits (largest difference: f16 within 2e-3, q8_0 within 5e-2, on logits of
    magnitude ~1), the same token ids (chat markup included) and the same chat template; the
    Modelfile's template, filled in as Ollama fills it, is the pipeline's prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medqa.prompting.prompts import prompt_format, user_message
    from medqa.release.export import export_gguf, merge_adapter

    params = train_params(**EXPORTED)
    typed = params_from_dict(params)
    gguf_file = export_gguf(workdir / "base", trained / "adapter", tmp_path / "gguf", typed.prompt, typed.model.name,
                            gguf_type=gguf_type)
    merge_adapter(workdir / "base", trained / "adapter", tmp_path / "merged", "float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    read_back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)

    fmt = prompt_format(tokenizer, typed.prompt, typed.model.name)
    question = user_message("Does aspirin reduce fever?", ["Aspirin reduced fever in 40 of 50 patients."])
    prompt = fmt.prompt(params["prompt"]["system"], question)
    for text in ("Hello, world.", prompt):
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        expected, got = merged(input_ids=ids).logits, read_back(input_ids=ids).logits
    assert (got - expected).abs().max().item() < tolerance

    modelfile = (gguf_file.parent / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{gguf_file.name}\n")
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    filled = template.replace("{{ .System }}", params["prompt"]["system"]).replace("{{ .Prompt }}", question)
    assert filled == prompt
    assert f'SYSTEM """{params["prompt"]["system"]}"""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_non_finite_loss_stops_with_a_clear_message(workdir, tmp_path):
    from medqa.errors import PipelineError

    with pytest.raises(PipelineError) as stopped:
        _train(workdir, tmp_path, train_params(max_steps=30, learning_rate=1e8, warmup_ratio=0.0))
    output = str(stopped.value)
    assert "became nan" in output or "became inf" in output, output[-2000:]
    assert "lower train.learning_rate" in output
    assert not (tmp_path / "adapter").exists()


def test_resume_point_is_idempotent_and_multi_gpu_launch_command(workdir, tmp_path, monkeypatch):
    from medqa.training.checkpoints import claim_checkpoints
    from medqa.training.launch import accelerate_command
    from medqa.training.recipe import shaping_params

    def sections(**train) -> dict:
        return shaping_params(params_from_dict(train_params(**train)))

    monkeypatch.delenv("MEDQA_CHECKPOINT_DIR", raising=False)
    params, ckpt = sections(), tmp_path / "checkpoints"
    args = (params, workdir / "base", workdir / "train.jsonl", workdir / "val.jsonl", ckpt)

    def write_checkpoint(folder: Path) -> Path:
        (folder / "checkpoint-2").mkdir()
        (folder / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
        return folder / "checkpoint-2"

    folder, resume = claim_checkpoints(*args)
    assert folder.parent == ckpt and resume is None
    written = write_checkpoint(folder)
    assert claim_checkpoints(*args) == (folder, written)  # the same params: kept, not cleared
    assert claim_checkpoints(*args) == (folder, written)
    other, resume = claim_checkpoints(sections(learning_rate=0.5), *args[1:])
    assert other != folder and resume is None and not written.exists()  # this clone's scratch: the old run's goes
    # a change to the training code (which makes DVC re-run the stage) starts afresh, too
    written = write_checkpoint(other)
    assert claim_checkpoints(sections(learning_rate=0.5), *args[1:]) == (other, written)
    code = tmp_path / "training.py"
    code.write_text("# changed\n")
    monkeypatch.setattr("medqa.training.checkpoints.training_code", lambda: [code])
    assert claim_checkpoints(sections(learning_rate=0.5), *args[1:])[1] is None and not written.exists()
    from accelerate.commands.config.config_args import load_config_from_file

    for strategy, kind in (("ddp", "MULTI_GPU"), ("fsdp", "FSDP")):
        command = accelerate_command(4, strategy)
        assert "--num_machines" not in command
        assert command[:2] == ["accelerate", "launch"] and command[-2:] == ["-m", "stages.finetune"]
        assert command[command.index("--num_processes") + 1] == "4"
        config = load_config_from_file(str(ROOT / command[command.index("--config_file") + 1]))  # accelerate parses it
        assert config.distributed_type == kind
    assert config.fsdp_config["fsdp_version"] == 2  # FSDP2, what tests/test_fsdp.py trains with


def test_machines_come_from_the_environment_a_scheduler_sets():
    from medqa.errors import PipelineError
    from medqa.training.launch import Machines, accelerate_command, machines_from_env

    assert machines_from_env(1, {}) == Machines()
    ours = machines_from_env(2, {"MEDQA_MACHINE_RANK": "1", "MEDQA_MAIN_ADDRESS": "10.0.0.5", "MEDQA_MAIN_PORT": "6000"})
    assert ours == Machines(2, 1, "10.0.0.5", 6000)
    skypilot = machines_from_env(3, {"SKYPILOT_NODE_RANK": "2", "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.8\n10.0.0.9\n"})
    assert skypilot == Machines(3, 2, "10.0.0.7", 29500)
    with pytest.raises(PipelineError, match="set MEDQA_MACHINE_RANK"):
        machines_from_env(2, {"MEDQA_MACHINE_RANK": "0"})
    with pytest.raises(PipelineError, match="expected 0 to 1"):
        machines_from_env(2, {"MEDQA_MACHINE_RANK": "2", "MEDQA_MAIN_ADDRESS": "h"})
    command = accelerate_command(4, "ddp", ours)
    flags = dict(zip(command[2:-2:2], command[3:-2:2]))
    assert flags["--num_processes"] == "8"  # accelerate counts the processes of all machines
    assert (flags["--num_machines"], flags["--machine_rank"], flags["--main_process_ip"],
            flags["--main_process_port"]) == ("2", "1", "10.0.0.5", "6000")


def test_the_gpu_knobs_reach_the_trainer_and_liger_off_cuda_is_one_clear_line(tmp_path, monkeypatch):
    from medqa.errors import PipelineError
    from medqa.modeling.hardware import resolve_hardware
    from medqa.training.recipe import training_arguments

    cpu = resolve_hardware("none", "float32")
    train = params_from_dict(train_params()).train
    assert not training_arguments(train, cpu, tmp_path).activation_checkpointing  # auto: off on the CPU
    forced = params_from_dict(train_params(gradient_checkpointing=True)).train
    assert training_arguments(forced, cpu, tmp_path).activation_checkpointing
    monkeypatch.delenv("MEDQA_CHECKPOINT_DIR", raising=False)
    assert training_arguments(params_from_dict(train_params(num_machines=2)).train, cpu, tmp_path).save_on_each_node
    monkeypatch.setenv("MEDQA_CHECKPOINT_DIR", str(tmp_path / "shared"))  # one shared copy serves every machine
    assert not training_arguments(params_from_dict(train_params(num_machines=2)).train, cpu, tmp_path).save_on_each_node
    with pytest.raises(PipelineError, match="liger_kernel=true needs CUDA"):
        training_arguments(params_from_dict(train_params(liger_kernel=True)).train, cpu, tmp_path)


def _lora_trainer(workdir: Path, out: Path, stage_way: bool):
    """A LoRA trainer over the tiny base: the stage's (answer-column logits) or the plain one."""
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    from medqa.io import read_jsonl
    from medqa.modeling.hardware import resolve_hardware
    from medqa.modeling.loading import load_tokenizer
    from medqa.training.examples import tokenized_dataset
    from medqa.training.recipe import setup_model, training_arguments
    from medqa.training.trainer import build_trainer

    params = train_params(max_steps=4, batch_size=3, grad_accum=2, learning_rate=0.01, warmup_ratio=0.0,
                     logging_steps=1, eval_steps=4, save_steps=4)
    params["lora"]["dropout"] = 0.0  # dropout masks would differ between the two layouts
    set_seed(0)
    hardware = resolve_hardware("none", "float32")
    tokenizer = load_tokenizer(workdir / "base")
    data = tokenized_dataset(read_jsonl(workdir / "train.jsonl"), tokenizer, 256)
    typed = params_from_dict(params)
    model = setup_model(workdir / "base", typed.model, typed.lora, hardware)
    args = training_arguments(typed.train, hardware, out)
    if stage_way:
        return build_trainer(model, tokenizer, args, data, data)
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                   data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))


def test_answer_column_loss_trains_as_the_full_logits_loss(workdir, tmp_path):
    """The stage's way (left-padded, logits only where answers are predicted) gives the plain way's
    loss at every step, the same validation loss and the same adapter."""
    runs = {}
    for stage_way in (True, False):
        trainer = _lora_trainer(workdir, tmp_path / str(stage_way), stage_way)
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
        runs[stage_way] = (losses, trainer.evaluate()["eval_loss"], weights)
    (fast_losses, fast_val, fast_w), (plain_losses, plain_val, plain_w) = runs[True], runs[False]
    assert len(fast_losses) == 4
    assert fast_losses == pytest.approx(plain_losses, abs=1e-4)
    assert fast_val == pytest.approx(plain_val, abs=1e-4)
    assert fast_losses[-1] < fast_losses[0]  # it trained: the comparison is not of two idle runs
    for key in plain_w:
        assert (fast_w[key] - plain_w[key]).abs().max() < 1e-4, key


def test_answer_batch_keeps_only_the_answer_columns(tokenizer):
    import torch

    from medqa.training.trainer import AnswerBatchCollator, answer_loss

    features = [
        {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, -100, -100, 9]},
        {"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": [-100, 6, 7]},
    ]
    batch = AnswerBatchCollator(tokenizer)(features)
    # Left-padded: both answers end in the last column, positions count from each row's first token.
    assert batch["input_ids"][1].tolist() == [tokenizer.pad_token_id] * 2 + [5, 6, 7]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 9], [-100, -100, -100, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    # The first answer token is in column 3, predicted from column 2: keep the last 3 columns.
    assert batch["logits_to_keep"] == 3
    logits = torch.randn(2, 5, 11)
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100)
    window = type("Out", (), {"logits": logits[:, -batch["logits_to_keep"]:]})()
    assert answer_loss(window, batch["labels"]).item() == pytest.approx(full.item(), abs=1e-6)
    assert answer_loss(window, batch["labels"], num_items_in_batch=6).item() == pytest.approx(full.item() / 2, abs=1e-6)


def _rates(scheduler, steps: int) -> list[float]:
    """The learning rate each optimiser step runs at."""
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_warmup_starts_above_rate_zero(tokenizer, tiny_model, tmp_path):
    """transformers' warmup runs the first optimiser step at rate 0 (wasted on a short run); ours at
    1 / (warmup + 1) of the peak, rising to the peak where transformers' does, and the same after it."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    from medqa.training.trainer import build_trainer, warm_up_from_the_first_step

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    theirs = _rates(get_scheduler("cosine", optimizer(), num_warmup_steps=4, num_training_steps=20), 20)
    ours = _rates(warm_up_from_the_first_step(
        get_scheduler("cosine", optimizer(), num_warmup_steps=4, num_training_steps=20), 4), 20)
    assert theirs[0] == 0.0
    assert ours[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert ours[4:] == pytest.approx(theirs[4:]) and min(ours) > 0
    # and the fine-tuning Trainer schedules this way
    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.25, learning_rate=1.0, lr_scheduler_type="cosine",
                             use_cpu=True, report_to="none")
    trainer = build_trainer(tiny_model, tokenizer, args, None, None)
    trainer.create_optimizer()
    assert _rates(trainer.create_scheduler(8), 3) == pytest.approx([1 / 3, 2 / 3, 1.0])


def _stage_dir(path: Path, workdir: Path, params: dict) -> Path:
    """A working directory laid out as the pipeline leaves it before the finetune stage."""
    import shutil

    shutil.copytree(workdir / "base", path / "models/base")
    (path / "data/split").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(workdir / f"{split}.jsonl", path / f"data/split/{split}.jsonl")
    shutil.copytree(ROOT / "configs", path / "configs")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _run_finetune_stage(path: Path, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               **env)
    return subprocess.run([sys.executable, "-m", "stages.finetune"], cwd=path, env=env, capture_output=True, text=True,
                          timeout=900)


def _finetune_stage(path: Path, **env: str) -> str:
    proc = _run_finetune_stage(path, **env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def _finetune_stage_here(path: Path, monkeypatch, **env: str) -> None:
    """What `python -m stages.finetune` does in `path`, in this process."""
    from stages.finetune import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(path)
    main.__wrapped__()  # the stage itself, without the wrapper that exits the process


def _machine(path: Path, rank: int, port: int) -> subprocess.Popen:
    """The finetune stage started on "machine" `rank` of two, both on this host."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MEDQA_MACHINE_RANK=str(rank), MEDQA_MAIN_ADDRESS="127.0.0.1", MEDQA_MAIN_PORT=str(port))
    return subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_cpu_processes_or_two_machines_train_the_adapter_one_process_trains(workdir, tmp_path, monkeypatch):
    """train.num_processes=2 on the CPU: the finetune stage settles resume, relaunches itself through
    `accelerate launch` as two processes (DDP over gloo, as on GPUs over NCCL), rank 0 writes. Two
    processes of 2 questions give the adapter that one process with 2 × 2 accumulated gives, within
    float32 rounding (the gradients are summed in a different order). train.num_machines=2, two
    stage processes in two clones that meet at 127.0.0.1 (one process each): the same adapter, in the
    main machine's clone only. Slow: four training processes and two launchers, each starting
    Python, torch and accelerate (a distributed run cannot share this process)."""
    import torch

    steps = {"max_steps": 3, "eval_steps": 3, "save_steps": 3, "batch_size": 2, "warmup_ratio": 0.0}
    one = _stage_dir(tmp_path / "one", workdir, train_params(**steps, grad_accum=2, num_processes=1))
    two = _stage_dir(tmp_path / "two", workdir, train_params(**steps, grad_accum=1, num_processes=2))
    output = _finetune_stage(two)
    assert "finetune: accelerate launch" in output and "--num_processes 2" in output
    assert output.count("training on 20 examples") == 2  # both processes trained
    # Each process joined the group and took its device before its model loaded (FSDP needs that order).
    assert "loading the base model (rank 0 of 2, device cpu" in output
    assert "loading the base model (rank 1 of 2, device cpu" in output
    assert output.count("finetune: best step") == 1  # rank 0 alone writes and reports

    machines = [_stage_dir(tmp_path / f"machine{rank}", workdir, train_params(**steps, grad_accum=1, num_machines=2))
                for rank in (0, 1)]
    port = free_port()
    started = [_machine(path, rank, port) for rank, path in enumerate(machines)]
    outputs = [proc.communicate(timeout=900)[0] for proc in started]
    assert all(proc.returncode == 0 for proc in started), outputs[0][-3000:] + outputs[1][-3000:]
    assert "--num_machines 2 --machine_rank 1 --main_process_ip 127.0.0.1" in outputs[1]
    assert "loading the base model (rank 1 of 2" in outputs[1] and "finetune: best step" in outputs[0]
    assert not (machines[1] / "models/adapter").exists()  # the main machine writes

    _finetune_stage_here(one, monkeypatch)
    for run in (one, two, machines[0]):
        assert json.loads((run / "metrics/train.json").read_text())["steps"] == 3
    trained = [load_file(run / "models/adapter/adapter_model.safetensors") for run in (one, two, machines[0])]
    assert trained[0].keys() == trained[1].keys() == trained[2].keys() and trained[0]
    for other in trained[1:]:
        for name, weight in trained[0].items():
            assert torch.allclose(weight, other[name], rtol=1e-4, atol=1e-6), (
                name, (weight - other[name]).abs().max().item())
    # and training moved the weights: lora_B starts at zero
    assert any(w.abs().max() > 0 for name, w in trained[0].items() if "lora_B" in name)


def test_checkpoints_on_shared_storage_resume_in_another_clone_and_keep_other_runs(workdir, tmp_path, monkeypatch,
                                                                                    caplog):
    """MEDQA_CHECKPOINT_DIR: a run cut off after step 2 in one clone (its later checkpoint gone)
    resumes in a clone at another path pointed at the same place and ends with the adapter of the
    uninterrupted run; another experiment there keeps the first one's checkpoints."""
    import shutil

    shared = str(tmp_path / "bucket")
    steps = {"max_steps": 4, "eval_steps": 2, "save_steps": 2}
    first = _stage_dir(tmp_path / "first", workdir, train_params(**steps))
    _finetune_stage_here(first, monkeypatch, MEDQA_CHECKPOINT_DIR=shared)
    assert not (first / "models/checkpoints").exists() or not any((first / "models/checkpoints").iterdir())
    (run,) = (tmp_path / "bucket").iterdir()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(run / "checkpoint-4")  # as if the machine had gone after step 2

    second = _stage_dir(tmp_path / "elsewhere" / "second", workdir, train_params(**steps))
    _log_from_here(caplog)
    _finetune_stage_here(second, monkeypatch, MEDQA_CHECKPOINT_DIR=shared)
    assert f"resuming from {run / 'checkpoint-2'}" in caplog.text
    a, b = (load_file(d / "models/adapter/adapter_model.safetensors") for d in (first, second))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key

    other = _stage_dir(tmp_path / "other", workdir, train_params(**steps, learning_rate=0.002))
    _finetune_stage_here(other, monkeypatch, MEDQA_CHECKPOINT_DIR=shared)
    runs = sorted((tmp_path / "bucket").iterdir())
    assert len(runs) == 2 and run in runs
    assert all(sorted(p.name for p in r.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"] for r in runs)


@pytest.mark.parametrize("read", ["whole", "in blocks"])
def test_a_local_model_is_known_by_its_content_not_its_path(tmp_path, tokenizer, monkeypatch, read):
    """model.name a local directory: the same weights under another path resume each other's checkpoints
    (and eval progress, keyed on the same record); weights changed in place, same names and sizes, do
    not. "in blocks": the weights read as a 7B model's are, 64 blocks of each file."""
    import shutil

    from safetensors.torch import save_file

    import medqa.modeling.loading
    from medqa.modeling.loading import prepare_base_model
    from medqa.modeling.profiles import get_profile
    from medqa.resumable import base_identity
    from medqa.training.checkpoints import claim_checkpoints
    from tests.conftest import save_tiny_base

    monkeypatch.setattr(medqa.modeling.loading, "WHOLE_FILE_BYTES", 10**12 if read == "whole" else 1000)
    monkeypatch.setenv("MEDQA_CHECKPOINT_DIR", str(tmp_path / "bucket"))
    original = tmp_path / "a/model"
    save_tiny_base(original, tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    shutil.copytree(original, tmp_path / "b/model")
    shutil.copytree(original, tmp_path / "changed/model")
    weights = tmp_path / "changed/model/model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == (original / "model.safetensors").stat().st_size
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("{}\n")

    def claim(model: Path) -> tuple[Path, Path | None]:
        """The download stage for `model`, then the finetune stage's claim on the shared checkpoints."""
        prepare_base_model(get_profile(str(model)), model.parent / "base")
        return claim_checkpoints({"train": {}}, model.parent / "base", tmp_path / "train.jsonl",
                                 tmp_path / "val.jsonl", tmp_path / "scratch")

    folder, resume = claim(original)
    assert resume is None
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2/trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert claim(tmp_path / "b/model") == (folder, folder / "checkpoint-2")
    assert claim(tmp_path / "changed/model")[1] is None
    identities = [base_identity(tmp_path / name / "base") for name in ("a", "b", "changed")]
    assert identities[0] == identities[1] != identities[2]


def test_fsdp_without_gpus_is_one_clear_line(workdir, tmp_path):
    """accelerate's FSDP plugin needs an accelerator device: on the CPU the stage says so and stops."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs: FSDP can start")
    run = _stage_dir(tmp_path / "fsdp", workdir, train_params(num_processes=2, distributed="fsdp"))
    proc = _run_finetune_stage(run)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: train.distributed=fsdp needs GPUs" in proc.stderr
    assert not (run / "models/checkpoints").exists()  # stopped before anything was cleared or written


def _weighted_train(**overrides):
    from medqa.params import params_from_dict

    return params_from_dict(train_params(**overrides)).train


def test_decision_weights_are_the_param_or_inverse_frequency_with_mean_the_param():
    from medqa.training.examples import decision_loss

    decisions = ["yes"] * 6 + ["no"] * 3 + ["maybe"]
    assert decision_loss(_weighted_train(decision_loss_weight=1.0), decisions, AnswerFormat("The answer is:")) is None  # plain
    flat = decision_loss(_weighted_train(decision_loss_weight=3.0), decisions, AnswerFormat("The answer is:"))
    assert flat.weights == {"yes": 3.0, "no": 3.0, "maybe": 3.0}
    balanced = decision_loss(_weighted_train(decision_loss_weight=2.0, decision_class_weights="balanced"),
                                  decisions, AnswerFormat("The answer is:")).weights
    assert balanced["maybe"] == pytest.approx(6 * balanced["yes"])
    assert balanced["no"] == pytest.approx(2 * balanced["yes"])
    assert sum(balanced[d] for d in decisions) / len(decisions) == pytest.approx(2.0)


@pytest.mark.parametrize("decision_first", [True, False])
def test_the_decision_word_alone_carries_the_decision_weight(tokenizer, decision_first):
    from medqa.training.examples import DecisionLoss, tokenize_example

    fmt = PromptFormat(tokenizer)
    record = {"pmid": "1", "question": "Does it work, or not?", "contexts": ["No effect was seen; maybe later."],
              "long_answer": "No, it does not work in these patients.", "final_decision": "no"}
    example = format_record(record, fmt, PromptParams("Answer.", None, "The answer is:", decision_first))
    weighting = DecisionLoss({"no": 5.0}, AnswerFormat("The answer is:"))
    tokenized = tokenize_example(example, tokenizer, 256, weighting)
    plain = tokenize_example(example, tokenizer, 256)
    assert {k: tokenized[k] for k in plain} == plain
    weights, labels = tokenized["loss_weights"], tokenized["labels"]
    assert len(weights) == len(labels)
    assert all(w == 0.0 for w, label in zip(weights, labels) if label == -100)
    weighted = [i for i, w in enumerate(weights) if w == 5.0]
    # The "No," opening the long answer and the "no" in the context stay at weight 1.
    assert tokenizer.decode([tokenized["input_ids"][i] for i in weighted]).strip() == "no"
    assert sum(w == 1.0 for w in weights) == len(weights) - len(weighted) - labels.count(-100)


def test_the_three_way_decision_loss_needs_the_option_tokens_and_marks_their_first(tokenizer):
    """decision_loss=choices: a DecisionLoss even at weight 1 (the plain loss is no longer it), with the
    options' first tokens; the example marks one position, the decision word's first token, whose label is
    that option's token, in either order of the target."""
    from medqa.training.examples import decision_loss, option_first_tokens, tokenize_example

    answer_format = AnswerFormat("The answer is:")
    train = _weighted_train(decision_loss_weight=1.0, decision_loss="choices")
    with pytest.raises(ValueError, match="first tokens"):
        decision_loss(train, ["yes"], answer_format)
    ids = option_first_tokens(answer_format, tokenizer)
    assert len(set(ids)) == 3
    loss = decision_loss(train, ["yes", "maybe"], answer_format, ids)
    assert loss.choice_ids == ids and loss.weights == {"yes": 1.0, "maybe": 1.0}
    assert decision_loss(_weighted_train(decision_loss_weight=2.0), ["yes"], answer_format, ids).choice_ids is None
    fmt = PromptFormat(tokenizer)
    record = {"pmid": "1", "question": "Does it work?", "contexts": ["Maybe, maybe not."],
              "long_answer": "Maybe it works in some patients.", "final_decision": "maybe"}
    for decision_first in (True, False):
        example = format_record(record, fmt, PromptParams("Answer.", None, "The answer is:", decision_first))
        tokenized = tokenize_example(example, tokenizer, 256, loss)
        marked = [i for i, m in enumerate(tokenized["choice_mask"]) if m == 1.0]
        assert len(marked) == 1 and sum(tokenized["choice_mask"]) == 1.0
        assert tokenized["labels"][marked[0]] == ids[2]  # " maybe", not the long answer's "Maybe"


def test_the_three_way_loss_is_the_options_cross_entropy_at_the_choice(tokenizer):
    import torch
    import torch.nn.functional as F

    from medqa.training.trainer import AnswerBatchCollator, answer_loss

    features = [
        {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, 7, 8, 9],
         "loss_weights": [0.0, 0.0, 1.0, 2.0, 1.0], "choice_mask": [0.0, 0.0, 0.0, 1.0, 0.0]},
        {"input_ids": [5, 3, 7], "attention_mask": [1] * 3, "labels": [-100, 3, 7],
         "loss_weights": [0.0, 2.0, 1.0], "choice_mask": [0.0, 1.0, 0.0]},
    ]
    batch = AnswerBatchCollator(tokenizer)(features)
    assert batch["choice_mask"].tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]  # padded on the left
    choice_ids = (3, 8, 10)
    logits = torch.randn(2, 5, 11)
    out = type("Out", (), {"logits": logits[:, -batch["logits_to_keep"]:]})()
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, 11), batch["labels"][:, 1:].reshape(-1),
                                ignore_index=-100, reduction="none").reshape(2, 4)
    # Column 3 of each row is the choice, predicted by the logits at column 2: token 8 (option 1), token 3 (option 0).
    three_way = F.cross_entropy(logits[:, 2][:, list(choice_ids)], torch.tensor([1, 0]), reduction="none")
    expected = (per_token[0, 1] + per_token[0, 3] + per_token[1, 3] + 2 * three_way.sum()) / 5
    got = answer_loss(out, batch["labels"], weights=batch["loss_weights"], choices=(choice_ids, batch["choice_mask"]))
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert got.item() != pytest.approx(answer_loss(out, batch["labels"], weights=batch["loss_weights"]).item(), abs=1e-3)
    # The gradient reaches only the options' logits at the choice positions.
    leaf = logits.clone().requires_grad_()
    leaf_out = type("Out", (), {"logits": leaf[:, -batch["logits_to_keep"]:]})()
    answer_loss(leaf_out, batch["labels"], choices=(choice_ids, batch["choice_mask"])).backward()
    at_choice = leaf.grad[:, 2]
    assert torch.count_nonzero(at_choice[:, [i for i in range(11) if i not in choice_ids]]) == 0
    assert torch.count_nonzero(at_choice[:, list(choice_ids)]) == 6


def test_the_weighted_loss_counts_the_decision_tokens_that_many_times(tokenizer):
    import torch

    from medqa.training.trainer import AnswerBatchCollator, answer_loss

    features = [
        {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, 7, 8, 9],
         "loss_weights": [0.0, 0.0, 1.0, 4.0, 1.0]},
        {"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": [-100, 6, 7], "loss_weights": [0.0, 1.0, 1.0]},
    ]
    batch = AnswerBatchCollator(tokenizer)(features)
    assert batch["loss_weights"].tolist() == [[0, 0, 1, 4, 1], [0, 0, 0, 1, 1]]  # padded on the left
    logits = torch.randn(2, 5, 11)
    out = type("Out", (), {"logits": logits[:, -batch["logits_to_keep"]:]})()
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), batch["labels"][:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="none").reshape(2, 4)
    expected = (per_token.sum() + 3 * per_token[0, 2]) / 5  # token 8 (column 3) counted 4 times, 5 answer tokens
    assert answer_loss(out, batch["labels"], weights=batch["loss_weights"]).item() == pytest.approx(expected.item(), abs=1e-6)
    ones = torch.where(batch["labels"] != -100, 1.0, 0.0)
    assert answer_loss(out, batch["labels"], weights=ones).item() == pytest.approx(answer_loss(out, batch["labels"]).item(), abs=1e-6)


def test_the_decision_weight_reaches_the_training_loss_not_the_validation_loss(workdir, tmp_path, caplog):
    """The first logged training loss (the first batch, before any update) rises with the decision's
    weight; the validation loss at step 0 (the untrained adapter) is the same either way."""
    first = {}
    for weight in (1.0, 8.0):
        out = tmp_path / str(weight)
        _log_from_here(caplog)
        _train(workdir, out, train_params(max_steps=1, eval_steps=1, save_steps=1, decision_loss_weight=weight))
        history = pd.read_csv(live_metric_file(out / "live", "train/loss"), sep="\t")
        val = pd.read_csv(live_metric_file(out / "live", "eval/loss"), sep="\t")
        first[weight] = (history["loss"].iloc[0], val.loc[val["step"] == 0, "loss"].item())
        assert ("decision tokens weighted" in caplog.text) == (weight != 1.0)
    assert first[8.0][0] > first[1.0][0] + 0.01
    assert first[8.0][1] == pytest.approx(first[1.0][1], abs=1e-6)


def test_the_trained_model_is_scored_as_the_eval_stages_score_it(workdir, tmp_path):
    """Training under bf16 autocast leaves accelerate's autocast wrapper on the model's forward; the
    validation decisions the finetune stage writes are computed without it (`forward_as_loaded`),
    so they are the re-loaded adapter's, as the eval stages compute them in fp32."""
    import torch

    from medqa.io import read_jsonl
    from medqa.modeling.hardware import Hardware
    from medqa.modeling.loading import load_model, load_tokenizer
    from medqa.training.examples import tokenized_dataset
    from medqa.training.recipe import setup_model, training_arguments
    from medqa.training.trainer import build_trainer, forward_as_loaded

    params = params_from_dict(train_params(max_steps=1, eval_steps=1, save_steps=1))
    hardware = Hardware("cpu", torch.float32, False, autocast=torch.bfloat16)
    tokenizer = load_tokenizer(workdir / "base")
    model = setup_model(workdir / "base", params.model, params.lora, hardware, checkpoint_activations=False)
    data = tokenized_dataset(read_jsonl(workdir / "train.jsonl")[:2], tokenizer, 256)
    args = training_arguments(params.train, hardware, tmp_path / "checkpoints", evaluate_first=False)
    trainer = build_trainer(model, tokenizer, args, data, data)
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    reloaded = load_model(workdir / "base", Hardware("cpu", torch.float32, False), tmp_path / "adapter").eval()

    ids = torch.tensor([data[0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
        as_trained = trainer.model(input_ids=ids).logits
        with forward_as_loaded(trainer.model) as scored:
            as_loaded = scored(input_ids=ids).logits
        after = trainer.model(input_ids=ids).logits
    assert torch.allclose(as_loaded, expected, atol=1e-5)
    assert not torch.allclose(as_trained, expected, atol=1e-3)  # bf16 autocast was on
    assert torch.equal(after, as_trained)  # and the training wrapper is back after the block


@pytest.mark.parametrize("processes", [1, 2])
def test_the_answer_trainer_loss_is_transformers_loss_plus_the_weights(tokenizer, tiny_model, tmp_path, monkeypatch,
                                                                     processes):
    """`AnswerTrainer.compute_loss` is transformers' own `Trainer.compute_loss` with `answer_loss` as its
    loss function (its scaling by the number of processes included, where `num_items_in_batch` counts every
    process's tokens), and the batch's `loss_weights` on top: an unweighted batch scores the same both ways;
    a weighted one scores as `answer_loss` with the weights."""
    import accelerate
    import torch
    from transformers import Trainer, TrainingArguments

    from medqa.training.trainer import AnswerBatchCollator, answer_loss, build_trainer

    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: processes))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    ours = build_trainer(tiny_model, tokenizer, args, None, None)
    theirs = Trainer(model=tiny_model, args=args, compute_loss_func=answer_loss)
    features = [{"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 8, 9],
                 "loss_weights": [0.0, 0.0, 0.0, 5.0, 1.0]},
                {"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": [-100, 6, 7],
                 "loss_weights": [0.0, 1.0, 1.0]}]
    batch = AnswerBatchCollator(tokenizer)([dict(f) for f in features])
    weights = batch.pop("loss_weights")
    with torch.no_grad():
        for items in (None, torch.tensor(8)):
            expected = theirs.compute_loss(tiny_model, dict(batch), num_items_in_batch=items)
            assert ours.compute_loss(tiny_model, dict(batch), num_items_in_batch=items).item() == \
                pytest.approx(expected.item(), rel=1e-6)
            weighted = ours.compute_loss(tiny_model, {**batch, "loss_weights": weights}, num_items_in_batch=items)
            scale = processes if items is not None else 1
            plain = answer_loss(tiny_model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"],
                                items, weights)
            assert weighted.item() == pytest.approx(scale * plain.item(), rel=1e-6)
            assert weighted.item() > expected.item()
    # The three-way decision loss: `choice_mask` and the trainer's `choice_ids` reach `answer_loss`.
    three_way = build_trainer(tiny_model, tokenizer, args, None, None, choice_ids=(8, 6, 7))
    mask = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0] * 5])
    with torch.no_grad():
        got = three_way.compute_loss(tiny_model, {**batch, "choice_mask": mask})
        plain = answer_loss(tiny_model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"],
                            choices=((8, 6, 7), mask))
    assert got.item() == pytest.approx(plain.item(), rel=1e-6)
    assert got.item() != pytest.approx(expected.item(), rel=1e-3)
