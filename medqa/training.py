"""LoRA / QLoRA fine-tuning with transformers' Trainer: answer-only loss, best checkpoint, resume."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from medqa.errors import PipelineError, explain_out_of_memory
from medqa.io import atomic_dir, read_json, read_jsonl, write_json
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
    """What a checkpoint was trained from: the params that shape training and the bytes of the data
    and code files."""
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


def training_code() -> list[Path]:
    """The library's source files: a checkpoint is resumed only by the code that wrote it."""
    return sorted(Path(__file__).parent.glob("*.py"))


def resume_point(params: dict, base_dir: Path, train_path: Path, val_path: Path, checkpoints: Path) -> Path | None:
    """The last complete checkpoint of an interrupted run with the same params, data and code, else None.

    Checkpoints of other params, data or code are cleared: DVC re-runs the stage when any of them
    changed, and resuming would then finish the old run instead of training anew. Idempotent, so
    every process of a multi-GPU run, started after the launcher called it, gets the same answer
    without clearing anything.
    """
    fingerprint = _fingerprint(
        {k: params[k] for k in ("model", "prompt", "lora", "train")},
        [train_path, val_path, base_dir / "source.json", *training_code()],
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


def check_distributed(strategy: str) -> None:
    """FSDP needs GPUs (accelerate's FSDP plugin has no CPU device): one clear line instead of a
    traceback from every process. DDP runs anywhere (NCCL on GPUs, gloo on the CPU)."""
    import torch

    if strategy == "fsdp" and not torch.cuda.is_available():
        raise PipelineError("train.distributed=fsdp needs GPUs (accelerate's FSDP has no CPU device): use "
                            "train.distributed=ddp, which runs several CPU processes over gloo")


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


class AnswerBatchCollator:
    """Pads a batch on the left, so every answer ends in the last column, and asks the model for
    logits only over the columns that predict answer tokens (`logits_to_keep`).

    The loss is on the answer only (~15% of each sequence), but a plain batch would run the
    vocabulary projection, its log-softmax and their gradients at every position. Position ids
    are given explicitly, so a left-padded row sees the same positions as an unpadded one.
    """

    def __init__(self, tokenizer: Any, window_logits: bool = True):
        from transformers import DataCollatorForSeq2Seq

        tokenizer = copy.copy(tokenizer)
        tokenizer.padding_side = "left"
        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.window_logits = window_logits

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.pad(features)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if self.window_logits:
            labelled = batch["labels"] != -100
            first = int(labelled.int().argmax(-1)[labelled.any(-1)].min())
            # The logits at column c predict the token at c + 1: keep from the column before the first answer token.
            batch["logits_to_keep"] = batch["labels"].shape[1] - first + 1
        return batch


def answer_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Cross-entropy of the answer tokens from logits over the last columns of the batch (all, or
    the `logits_to_keep` window): the same value as the model's own causal-LM loss.

    Normalised by `num_items_in_batch` (the labelled tokens of the whole accumulated batch, as
    the Trainer counts them) when given, else by this batch's labelled tokens.
    """
    import torch.nn.functional as F

    logits = outputs.logits
    targets = labels[:, labels.shape[1] - logits.shape[1] + 1 :].to(logits.device)
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def supports_logits_to_keep(model: Any) -> bool:
    """Whether the (possibly peft-wrapped) causal LM's forward takes `logits_to_keep`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _setup_data(train: list[dict], val: list[dict], tokenizer: Any, max_length: int) -> tuple[Any, Any]:
    return _dataset(train, tokenizer, max_length), _dataset(val, tokenizer, max_length)


def setup_model(base_dir: Path, model_params: dict, lora_params: dict, hardware: Hardware) -> Any:
    """The base model (4-bit on CUDA) prepared for k-bit training where it applies, with a fresh LoRA adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = lora_targets(get_profile(model_params["name"]), lora_params["target_modules"])
    model = load_model(base_dir, hardware)
    if hardware.quantize_4bit and not fsdp_enabled():
        # (Under FSDP it would upcast the frozen weights to fp32, but FSDP needs one dtype to shard.)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(
        r=lora_params["r"], lora_alpha=lora_params["alpha"], lora_dropout=lora_params["dropout"], bias="none",
        target_modules=targets, task_type="CAUSAL_LM",
    ))
    return model


def training_arguments(tp: dict, hardware: Hardware, output_dir: Path) -> Any:
    """transformers' TrainingArguments from the `train` params and the hardware."""
    import torch
    from transformers import TrainingArguments

    cuda = hardware.device == "cuda"
    fsdp = fsdp_enabled()
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=tp["epochs"],
        max_steps=tp["max_steps"],
        per_device_train_batch_size=tp["batch_size"],
        per_device_eval_batch_size=tp["batch_size"],
        gradient_accumulation_steps=tp["grad_accum"],
        learning_rate=tp["learning_rate"],
        weight_decay=tp["weight_decay"],
        # transformers 5 reads a warmup_steps value below 1 as a fraction of the total steps (its
        # warmup_ratio argument is gone); train.warmup_ratio is validated to be in [0, 1).
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
        prediction_loss_only=True,
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


def warm_up_from_the_first_step(scheduler: Any, warmup_steps: int) -> Any:
    """`scheduler` (a LambdaLR from transformers' `get_scheduler`) with its linear warmup shifted by
    one step: step s < warmup_steps runs at (s + 1) / (warmup_steps + 1) of the peak rate, not
    s / warmup_steps, so the first optimiser step is not wasted at rate 0. Unchanged after the warmup."""
    from torch.optim.lr_scheduler import LambdaLR

    if warmup_steps <= 0 or not isinstance(scheduler, LambdaLR):
        return scheduler

    def shifted(after: Callable[[int], float]) -> Callable[[int], float]:
        return lambda step: (step + 1) / (warmup_steps + 1) if step < warmup_steps else after(step)

    # A new LambdaLR on the same optimiser starts from the peak rates the first one recorded.
    return LambdaLR(scheduler.optimizer, [shifted(f) for f in scheduler.lr_lambdas])


def build_trainer(model: Any, tokenizer: Any, args: Any, train_ds: Any, val_ds: Any, callbacks: list) -> Any:
    """A Trainer with answer-only loss computed from the answer columns' logits alone, whose warmup
    starts above rate 0 (`warm_up_from_the_first_step`)."""
    from transformers import Trainer

    class AnswerTrainer(Trainer):
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                scheduler = super().create_scheduler(num_training_steps, optimizer)
                self.lr_scheduler = warm_up_from_the_first_step(scheduler, self.args.get_warmup_steps(num_training_steps))
            return self.lr_scheduler

    return AnswerTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=AnswerBatchCollator(tokenizer, window_logits=supports_logits_to_keep(model)),
        compute_loss_func=answer_loss,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _callbacks(tp: dict, live_dir: Path) -> list:
    from transformers import EarlyStoppingCallback

    callbacks: list = [LiveLossCallback(live_dir), StopOnNonFiniteLoss()]
    if tp["early_stopping_patience"]:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=tp["early_stopping_patience"]))
    return callbacks


TRAINED_ON = "trained_on.json"  # beside the adapter: what it was trained against (export merges accordingly)


def _trained_on(trainer: Any, hardware: Hardware) -> dict:
    """How the base weights looked to the adapter while it learned: 4-bit nf4 or as loaded."""
    return {
        "quantization": "nf4-double-quant" if hardware.quantize_4bit else "none",
        "dtype": str(hardware.dtype).removeprefix("torch."),
        "device": hardware.device,
        "optim": str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim),
    }


def _save_adapter(trainer: Any, adapter_dir: Path, hardware: Hardware) -> None:
    if fsdp_enabled():
        _save_fsdp_adapter(trainer, adapter_dir, _trained_on(trainer, hardware))
    elif trainer.is_world_process_zero():
        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            write_json(tmp / TRAINED_ON, _trained_on(trainer, hardware))


def _validation_decisions(trainer: Any, tokenizer: Any, val: list[dict], answer_prefix: str, tp: dict) -> dict:
    """The best checkpoint's choice-scored decisions on the validation split."""
    from medqa.evaluation import validation_decisions

    trainer.model.eval()
    return validation_decisions(trainer.model, tokenizer, val, answer_prefix, tp["max_length"], tp["batch_size"])


def _summary(trainer: Any, result: Any, trainable: int, resumed: bool, val_decisions: dict) -> dict:
    state = trainer.state
    best = state.best_model_checkpoint
    train_losses = [e["loss"] for e in state.log_history if "loss" in e]
    return {
        "best_step": int(best.rsplit("-", 1)[-1]) if best else state.global_step,
        "best_val_loss": state.best_metric,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "steps": state.global_step,
        "epochs": state.epoch,
        "trainable_params": trainable,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "resumed": resumed,
        "val_choice_accuracy": val_decisions["accuracy"],
        "val_choice_macro_f1": val_decisions["macro_f1"],
        "val_chosen": val_decisions["chosen"],
    }


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
    from transformers import set_seed

    tp = params["train"]
    set_seed(tp["seed"])
    hardware = resolve_hardware(params["model"]["quantization"], params["model"]["dtype"])
    tokenizer = load_tokenizer(base_dir)
    val = read_jsonl(val_path)
    train_ds, val_ds = _setup_data(read_jsonl(train_path), val, tokenizer, tp["max_length"])
    log.info("training on %d examples, validating on %d (%s%s)", len(train_ds), len(val_ds), hardware.device,
             ", 4-bit nf4 base" if hardware.quantize_4bit else "")
    model = setup_model(base_dir, params["model"], params["lora"], hardware)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)

    resume = resume_point(params, base_dir, train_path, val_path, checkpoints_dir)
    if resume:
        log.info("resuming from %s", resume)
    trainer = build_trainer(model, tokenizer, training_arguments(tp, hardware, checkpoints_dir), train_ds, val_ds,
                            _callbacks(tp, live_dir))
    with explain_out_of_memory("lower train.batch_size (raising train.grad_accum keeps the effective batch) "
                               "or train.max_length, or on CUDA keep model.quantization=auto (4-bit)"):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    _save_adapter(trainer, adapter_dir, hardware)
    # Every process takes part (FSDP shards the weights); rank 0 writes.
    val_decisions = _validation_decisions(trainer, tokenizer, val, params["prompt"]["answer_prefix"], tp)
    if not trainer.is_world_process_zero():
        return {}
    summary = _summary(trainer, result, trainable, bool(resume), val_decisions)
    log.info("validation decisions (choice): accuracy %.3f, macro-F1 %.3f, chosen %s",
             val_decisions["accuracy"], val_decisions["macro_f1"], val_decisions["chosen"])
    write_json(metrics_path, summary)
    return summary


def _save_fsdp_adapter(trainer: Any, adapter_dir: Path, trained_on: dict) -> None:
    """Gather the sharded adapter (every rank must take part) and let rank 0 move it into place."""
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    staging = adapter_dir.parent / f".{adapter_dir.name}.fsdp"
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        with atomic_dir(adapter_dir) as tmp:
            for name in ("adapter_config.json", "adapter_model.safetensors"):  # not the pickled training args
                shutil.move(str(staging / name), tmp / name)
            write_json(tmp / TRAINED_ON, trained_on)
        shutil.rmtree(staging, ignore_errors=True)
