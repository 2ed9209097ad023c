"""LoRA / QLoRA fine-tuning with transformers' Trainer, in the order it runs: data, model, trainer,
train, save. The examples are tokenised in `examples`, the Trainer's own parts are in `trainer`,
resumable checkpoints in `checkpoints`, several processes in `launch`."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa import paths
from medqa.data.splits import validation_loss_examples
from medqa.decisions.answer_format import AnswerFormat
from medqa.errors import PipelineError, explain_out_of_memory
from medqa.io import atomic_dir, read_jsonl, write_json
from medqa.modeling.hardware import Hardware, fsdp_enabled, resolve_hardware
from medqa.modeling.loading import TRAINED_ON, load_model, load_tokenizer
from medqa.modeling.profiles import get_profile, lora_targets
from medqa.params import LoraParams, ModelParams, Params, TrainParams, as_dict
from medqa.resumable import SHARED_DIR_ENV
from medqa.training.checkpoints import claim_checkpoints
from medqa.training.examples import decision_loss, option_first_tokens, tokenized_dataset
from medqa.training.launch import launched_by_accelerate, save_fsdp_adapter
from medqa.training.trainer import (
    LiveLossCallback,
    SameBatchesFreshOrResumed,
    StopOnNonFiniteLoss,
    build_trainer,
    forward_as_loaded,
)

log = logging.getLogger(__name__)


def setup_model(base_dir: Path, model: ModelParams, lora: LoraParams, hardware: Hardware,
                checkpoint_activations: bool = True) -> Any:
    """The base model (4-bit on CUDA) prepared for k-bit training where it applies, with a fresh LoRA adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = lora_targets(get_profile(model.name), lora.target_modules)
    base = load_model(base_dir, hardware)
    if hardware.quantize_4bit and not fsdp_enabled():
        # (Under FSDP it would upcast the frozen weights to fp32, but FSDP needs one dtype to shard.)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpoint_activations)
    elif checkpoint_activations:
        # Reentrant checkpointing (FSDP's) gives a layer's LoRA weights no gradient unless its inputs
        # require one; transformers' checkpointing switch adds this hook today, stated here so that no
        # library default decides whether LoRA trains (tests/test_fsdp.py).
        base.enable_input_require_grads()
    return get_peft_model(base, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=targets, task_type="CAUSAL_LM",
    ))


def _optimizer(name: str, hardware: Hardware) -> str:
    if name != "auto":
        return name
    # bitsandbytes' paged 8-bit states are not sharded by FSDP: plain AdamW there.
    return "paged_adamw_8bit" if hardware.quantize_4bit and not fsdp_enabled() else "adamw_torch"


def training_arguments(train: TrainParams, hardware: Hardware, output_dir: Path, evaluate_first: bool = True) -> Any:
    """transformers' TrainingArguments from the `train` params and the hardware; `evaluate_first`:
    the validation loss of the untrained adapter (the base model) at step 0 (a resumed run has it)."""
    import torch
    from transformers import TrainingArguments

    cuda = hardware.device == "cuda"
    fsdp = fsdp_enabled()
    recompute = train.checkpoints_activations(cuda)
    if train.liger_kernel:
        _require_liger(cuda)
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        # transformers 5 reads a warmup_steps value below 1 as a fraction of the total steps (its
        # warmup_ratio argument is gone); train.warmup_ratio is validated to be in [0, 1).
        warmup_steps=train.warmup_ratio,
        lr_scheduler_type=train.scheduler,
        optim=_optimizer(train.optim, hardware),
        logging_steps=train.logging_steps,
        eval_strategy="steps",
        eval_steps=train.eval_steps,
        eval_on_start=evaluate_first,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        prediction_loss_only=True,
        seed=train.seed,
        data_seed=train.seed,
        train_sampling_strategy="group_by_length",
        # On the CPU, bf16 is the Trainer's autocast over fp32 weights (`Hardware.autocast`).
        bf16=(cuda and hardware.dtype == torch.bfloat16) or hardware.autocast == torch.bfloat16,
        fp16=cuda and hardware.dtype == torch.float16,
        activation_checkpointing=recompute,
        # Non-reentrant checkpointing lets gradients reach LoRA weights when the frozen inputs need none.
        # (FSDP-QLoRA wants the reentrant variant, as in peft's FSDP-QLoRA guide.)
        activation_checkpointing_kwargs={"use_reentrant": fsdp} if recompute else None,
        # Several machines, each with its own checkpoints folder: each keeps a copy to resume from
        # (on a shared MEDQA_CHECKPOINT_DIR the main machine's copy serves all).
        save_on_each_node=train.num_machines > 1 and not os.environ.get(SHARED_DIR_ENV),
        # Liger patches the model's RMSNorm, RoPE and SwiGLU; its fused cross-entropy needs labels in
        # the forward, which the answer-column loss does not pass, so that one stays unfused.
        use_liger_kernel=train.liger_kernel,
        use_cpu=not cuda,
        report_to="none",
        # The datasets hold only what the collator reads (loss_weights is not a model input).
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False if launched_by_accelerate() else None,
    )


def _require_liger(cuda: bool) -> None:
    import importlib.util

    if not cuda:
        raise PipelineError("train.liger_kernel=true needs CUDA (Liger's kernels are Triton GPU kernels): set it to false")
    if importlib.util.find_spec("liger_kernel") is None:
        raise PipelineError("train.liger_kernel=true needs the liger-kernel package: "
                            ".venv/.uv/bin/uv pip install --python .venv/bin/python liger-kernel")


def _callbacks(train: TrainParams, live_dir: Path) -> list:
    from transformers import EarlyStoppingCallback

    callbacks: list = [LiveLossCallback(live_dir), StopOnNonFiniteLoss(), SameBatchesFreshOrResumed(train.seed)]
    if train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    return callbacks


def _trained_on(trainer: Any, hardware: Hardware) -> dict:
    """How the base weights looked to the adapter while it learned: 4-bit nf4 or as loaded."""
    return {
        "quantization": "nf4-double-quant" if hardware.quantize_4bit else "none",
        "dtype": str(hardware.dtype).removeprefix("torch."),
        "autocast": str(hardware.autocast).removeprefix("torch.") if hardware.autocast is not None else None,
        "device": hardware.device,
        "optim": str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim),
    }


def _save_adapter(trainer: Any, adapter_dir: Path, hardware: Hardware) -> None:
    # peft holds target_modules as a set and writes it in hash order, which differs between processes:
    # sorted, the same training writes the same adapter_config.json, and DVC re-runs nothing after it.
    for config in trainer.model.peft_config.values():
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    if fsdp_enabled():
        save_fsdp_adapter(trainer.model, adapter_dir, _trained_on(trainer, hardware), TRAINED_ON)
    elif trainer.is_world_process_zero():
        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            write_json(tmp / TRAINED_ON, _trained_on(trainer, hardware))


def _validation_decisions(trainer: Any, tokenizer: Any, val: list[dict], answer_format: AnswerFormat,
                          train: TrainParams) -> dict:
    """The best checkpoint's choice-scored decisions on the validation split, computed as the eval
    stages compute (the adapter re-loaded would score the same)."""
    from medqa.evaluation.evaluate import validation_decisions
    from medqa.inference.decision_scorer import DecisionScorer

    trainer.model.eval()
    with forward_as_loaded(trainer.model) as model:
        scorer = DecisionScorer(model, tokenizer, answer_format, train.max_length, train.batch_size)
        return validation_decisions(scorer, val, seed=train.seed)


def _summary(trainer: Any, result: Any, trainable: int, resumed: bool, val_decisions: dict) -> dict:
    state = trainer.state
    best = state.best_model_checkpoint
    train_losses = [e["loss"] for e in state.log_history if "loss" in e]
    at_start = [e["eval_loss"] for e in state.log_history if "eval_loss" in e and e["step"] == 0]
    return {
        "base_val_loss": at_start[0] if at_start else None,
        "best_step": int(best.rsplit("-", 1)[-1]) if best else state.global_step,
        "best_val_loss": state.best_metric,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "steps": state.global_step,
        "epochs": state.epoch,
        "trainable_params": trainable,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "resumed": resumed,
        # With 95% intervals: a validation set of 50 questions cannot tell recipes 0.05 apart.
        **{f"val_choice_{key}": val_decisions[key] for key in
           ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high")},
        "val_over_majority": val_decisions["over_majority"],
        "val_chosen": val_decisions["chosen"],
    }


def _process() -> str:
    """"rank r of n" in a process group, else "one process"."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()} of {dist.get_world_size()}"
    return "one process"


def shaping_params(params: Params) -> dict[str, Any]:
    """The params sections that shape training: what a resumable checkpoint's fingerprint covers."""
    return {name: as_dict(getattr(params, name)) for name in ("model", "prompt", "lora", "train")}


@dataclass(frozen=True)
class TrainFiles:
    """What the finetune stage reads (the base model, the train and validation splits) and writes (the
    adapter, DVCLive's logs, the training metrics; its checkpoints, scratch space for resuming)."""

    base_dir: Path
    train: Path
    val: Path
    adapter: Path
    checkpoints: Path
    live: Path
    metrics: Path

    @classmethod
    def of_stage(cls) -> TrainFiles:
        """The finetune stage's files, as `medqa.paths` places them."""
        return cls(paths.BASE_MODEL, paths.TRAIN, paths.VAL, paths.ADAPTER, paths.CHECKPOINTS, paths.LIVE_DIR,
                   paths.TRAIN_METRICS)


def train_adapter(params: Params, files: TrainFiles) -> dict:
    """Fine-tune a LoRA adapter on the train split, keep the best by validation loss, write outputs."""
    from transformers import set_seed

    train = params.train
    set_seed(train.seed)
    hardware = resolve_hardware(params.model.quantization, params.model.dtype)
    tokenizer = load_tokenizer(files.base_dir)
    val, train_examples = read_jsonl(files.val), read_jsonl(files.train)
    answer_format = AnswerFormat.of(params.prompt)
    choice_ids = option_first_tokens(answer_format, tokenizer) if train.decision_loss == "choices" else None
    loss = decision_loss(train, [ex["final_decision"] for ex in train_examples], answer_format, choice_ids)
    if loss is not None:
        log.info("decision tokens weighted %s in the training loss%s",
                 ", ".join(f"{d} {w:.2f}" for d, w in sorted(loss.weights.items())),
                 ", the decision's cross-entropy over the three options alone" if loss.choice_ids else "")
    train_ds = tokenized_dataset(train_examples, tokenizer, train.max_length, loss)
    # The validation loss stays the plain answer loss, comparable between recipes, on a seeded subset
    # of the validation split (its passes cost as much as training steps); the decisions use all of it.
    val_loss_examples = validation_loss_examples(val, train, params.split.seed)
    val_ds = tokenized_dataset(val_loss_examples, tokenizer, train.max_length)
    log.info("training on %d examples, validation loss on %d of %d (%s%s%s)", len(train_ds), len(val_ds), len(val),
             hardware.device, ", 4-bit nf4 base" if hardware.quantize_4bit else "",
             ", bf16 autocast" if hardware.autocast is not None else "")
    checkpoints_dir, resume = claim_checkpoints(shaping_params(params), files.base_dir, files.train, files.val,
                                                files.checkpoints)
    if resume:
        log.info("resuming from %s", resume)
    else:
        log.info("checkpoints in %s", checkpoints_dir)
    args = training_arguments(train, hardware, checkpoints_dir, evaluate_first=not resume)
    # The distributed state and this process's device before the model loads: under FSDP,
    # from_pretrained then reads the weights on rank 0 only (cpu_ram_efficient_loading), and each
    # rank's 4-bit weights land on its own GPU, not all on cuda:0.
    log.info("loading the base model (%s, device %s)", _process(), args.device)
    model = setup_model(files.base_dir, params.model, params.lora, hardware, args.activation_checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    trainer = build_trainer(model, tokenizer, args, train_ds, val_ds, callbacks=_callbacks(train, files.live),
                            choice_ids=loss.choice_ids if loss else None)
    with explain_out_of_memory("lower train.batch_size (raising train.grad_accum keeps the effective batch) "
                               "or train.max_length, or on CUDA keep model.quantization=auto (4-bit)"):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    _save_adapter(trainer, files.adapter, hardware)
    # Every process takes part (FSDP shards the weights); rank 0 writes.
    val_decisions = _validation_decisions(trainer, tokenizer, val, answer_format, train)
    if not trainer.is_world_process_zero():
        return {}
    summary = _summary(trainer, result, trainable, bool(resume), val_decisions)
    log.info("validation decisions (choice): accuracy %.3f, macro-F1 %.3f, chosen %s",
             val_decisions["accuracy"], val_decisions["macro_f1"], val_decisions["chosen"])
    write_json(files.metrics, summary)
    return summary
