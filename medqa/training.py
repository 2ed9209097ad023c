"""LoRA / QLoRA fine-tuning with transformers' Trainer: answer-only loss, best checkpoint, resume."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medqa.errors import PipelineError, explain_out_of_memory
from medqa.io import atomic_dir, read_json, write_json
from medqa.models import (
    Hardware, fsdp_enabled, get_profile, load_model, load_tokenizer, lora_targets, resolve_hardware,
)
from medqa.prompts import fit_prompt

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"


def tokenize_example(example: dict, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Prompt + target ids with the loss masked (-100) on the prompt; the context is cut, never the target."""
    target = tokenizer(example["target"], add_special_tokens=False)["input_ids"]
    if len(target) >= max_length:
        raise PipelineError(
            f"pmid {example['pmid']}: the answer alone is {len(target)} tokens; raise train.max_length above it"
        )
    prompt = fit_prompt(example, tokenizer, max_length - len(target))
    return {
        "input_ids": prompt + target,
        "attention_mask": [1] * (len(prompt) + len(target)),
        "labels": [-100] * len(prompt) + target,
    }


def _dataset(examples: list[dict], tokenizer: Any, max_length: int) -> Any:
    from datasets import Dataset

    return Dataset.from_list([tokenize_example(ex, tokenizer, max_length) for ex in examples])


def _fingerprint(params: dict, files: list[Path]) -> str:
    """What a checkpoint was trained from: the params that shape training and the data files' bytes."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that was written to the end.

    The Trainer writes trainer_state.json last, so a checkpoint whose state file is missing, cut
    short, or names another step was interrupted and is never loaded.
    """
    found = []
    for folder in checkpoints.glob("checkpoint-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if step.isdigit():
            found.append((int(step), folder))
    for step, folder in sorted(found, reverse=True):
        try:
            if json.loads((folder / "trainer_state.json").read_text()).get("global_step") == step:
                return folder
        except (OSError, ValueError):
            log.warning("ignoring the incomplete checkpoint %s", folder)
    return None


def resume_point(params: dict, base_dir: Path, train_path: Path, val_path: Path, checkpoints: Path) -> Path | None:
    """The last complete checkpoint of an interrupted run with the same params and data, else None.

    Checkpoints of other params or data are cleared. Idempotent, so every process of a multi-GPU
    run, started after the launcher called it, gets the same answer without clearing anything.
    """
    fingerprint = _fingerprint(
        {k: params[k] for k in ("model", "prompt", "lora", "train")}, [train_path, val_path, base_dir / "source.json"]
    )
    marker = checkpoints / FINGERPRINT
    if marker.exists() and read_json(marker).get("fingerprint") == fingerprint:
        return last_complete_checkpoint(checkpoints)
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    write_json(marker, {"fingerprint": fingerprint})
    return None


ACCELERATE_CONFIGS = {"ddp": Path("configs/accelerate/ddp.yaml"), "fsdp": Path("configs/accelerate/fsdp.yaml")}


def launched_by_accelerate() -> bool:
    """True inside a process started by `accelerate launch` / torchrun."""
    return "LOCAL_RANK" in os.environ


def accelerate_command(num_processes: int, strategy: str = "ddp", module: str = "stages.finetune") -> list[str]:
    """The command that re-runs `module` as `num_processes` processes (one per GPU), DDP or FSDP."""
    return ["accelerate", "launch", "--config_file", str(ACCELERATE_CONFIGS[strategy]),
            "--num_processes", str(num_processes), "-m", module]


class NonFiniteLossError(PipelineError):
    pass


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops training when the loss becomes NaN or infinite, before a bad checkpoint is written."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the {key.replace('_', ' ')} became {value} at step {state.global_step}: lower "
                    "train.learning_rate or use model.dtype=float32/bfloat16 (fp16 overflows); the last good "
                    f"checkpoint is kept in {args.output_dir}"
                )




def _optimizer(name: str, hardware: Hardware) -> str:
    if name != "auto":
        return name
    # bitsandbytes' paged 8-bit states are not sharded by FSDP: plain AdamW there.
    return "paged_adamw_8bit" if hardware.quantize_4bit and not fsdp_enabled() else "adamw_torch"


# Trainer log keys -> DVCLive metric names (dvclive/plots/metrics/<name>.tsv).
LIVE_METRICS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "eval_loss": "eval/loss"}


class LiveLossCallback(TrainerCallback):
    """Logs train and validation loss and the learning rate per step with DVCLive.

    The curves are written from the trainer state's log history at every log, so they can be
    watched during a run (`dvc plots show`), and a run resumed from a checkpoint logs the steps
    before the interruption too (the trainer restores its history from the checkpoint).
    """

    def __init__(self, live_dir: Path):
        self.live_dir = live_dir
        self.live: Any = None
        self.logged = 0

    def on_log(self, args, state, control, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        if self.live is None:
            from dvclive import Live

            # Inside a DVC stage: the pipeline declares these files; DVCLive must not write its own
            # dvc.yaml, make an experiment or a report.
            self.live = Live(str(self.live_dir), resume=False, dvcyaml=None, save_dvc_exp=False, report=None)
        for entry in state.log_history[self.logged:]:
            self.live.step = entry["step"]
            for key, name in LIVE_METRICS.items():
                if key in entry:
                    self.live.log_metric(name, entry[key], plot=True)
        self.logged = len(state.log_history)
        self.live.make_summary()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.live is not None:
            self.live.end()


def train_adapter(
    params: dict[str, Any],
    base_dir: Path,
    train_path: Path,
    val_path: Path,
    adapter_dir: Path,
    checkpoints_dir: Path,
    live_dir: Path,
    metrics_path: Path,
) -> dict:
    """Fine-tune a LoRA adapter on the train split, keep the best by validation loss, write outputs."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        DataCollatorForSeq2Seq, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed,
    )

    from medqa.io import read_jsonl

    tp, lp = params["train"], params["lora"]
    set_seed(tp["seed"])
    targets = lora_targets(get_profile(params["model"]["name"]), lp["target_modules"])
    hardware = resolve_hardware(params["model"]["quantization"], params["model"]["dtype"])
    tokenizer = load_tokenizer(base_dir)
    train_ds = _dataset(read_jsonl(train_path), tokenizer, tp["max_length"])
    val_ds = _dataset(read_jsonl(val_path), tokenizer, tp["max_length"])
    log.info("training on %d examples, validating on %d (%s)", len(train_ds), len(val_ds), hardware.device)

    model = load_model(base_dir, hardware)
    fsdp = fsdp_enabled()
    if hardware.quantize_4bit and not fsdp:
        # (Under FSDP it would upcast the frozen weights to fp32, but FSDP needs one dtype to shard.)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(
        r=lp["r"], lora_alpha=lp["alpha"], lora_dropout=lp["dropout"], bias="none",
        target_modules=targets, task_type="CAUSAL_LM",
    ))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)

    resume = resume_point(params, base_dir, train_path, val_path, checkpoints_dir)
    if resume:
        log.info("resuming from %s", resume)
    cuda = hardware.device == "cuda"
    args = TrainingArguments(
        output_dir=str(checkpoints_dir),
        num_train_epochs=tp["epochs"],
        max_steps=tp["max_steps"],
        per_device_train_batch_size=tp["batch_size"],
        per_device_eval_batch_size=tp["batch_size"],
        gradient_accumulation_steps=tp["grad_accum"],
        learning_rate=tp["learning_rate"],
        weight_decay=tp["weight_decay"],
        warmup_steps=tp["warmup_ratio"],
        lr_scheduler_type=tp["scheduler"],
        optim=_optimizer(tp["optim"], hardware),
        logging_steps=tp["logging_steps"],
        eval_strategy="steps",
        eval_steps=tp["eval_steps"],
        save_strategy="steps",
        save_steps=tp["save_steps"],
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=tp["seed"],
        data_seed=tp["seed"],
        train_sampling_strategy="group_by_length",
        bf16=cuda and hardware.dtype == torch.bfloat16,
        fp16=cuda and hardware.dtype == torch.float16,
        activation_checkpointing=cuda,
        # Non-reentrant checkpointing lets gradients reach LoRA weights when the frozen inputs need none.
        # (FSDP-QLoRA wants the reentrant variant, as in peft's FSDP-QLoRA guide.)
        activation_checkpointing_kwargs={"use_reentrant": fsdp} if cuda else None,
        use_cpu=not cuda,
        report_to="none",
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False if launched_by_accelerate() else None,
    )
    callbacks: list = [LiveLossCallback(live_dir), StopOnNonFiniteLoss()]
    if tp["early_stopping_patience"]:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=tp["early_stopping_patience"]))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    with explain_out_of_memory("lower train.batch_size (raising train.grad_accum keeps the effective batch) "
                               "or train.max_length, or on CUDA keep model.quantization=auto (4-bit)"):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    state = trainer.state
    if fsdp:
        _save_fsdp_adapter(trainer, adapter_dir)
    if not trainer.is_world_process_zero():
        return {}
    if not fsdp:
        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
    best = state.best_model_checkpoint
    train_losses = [e["loss"] for e in state.log_history if "loss" in e]
    summary = {
        "best_step": int(best.rsplit("-", 1)[-1]) if best else state.global_step,
        "best_val_loss": state.best_metric,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "steps": state.global_step,
        "epochs": state.epoch,
        "trainable_params": trainable,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "resumed": bool(resume),
    }
    write_json(metrics_path, summary)
    return summary


def _save_fsdp_adapter(trainer: Any, adapter_dir: Path) -> None:
    """Gather the sharded adapter (every rank must take part) and let rank 0 move it into place."""
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    staging = adapter_dir.parent / f".{adapter_dir.name}.fsdp"
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        with atomic_dir(adapter_dir) as tmp:
            for name in ("adapter_config.json", "adapter_model.safetensors"):  # not the pickled training args
                shutil.move(str(staging / name), tmp / name)
        shutil.rmtree(staging, ignore_errors=True)
