"""The Trainer the finetune stage runs (`AnswerTrainer`): answer-only loss from the answer columns'
logits alone, weighted by the batch's `loss_weights`, a warmup that starts above rate 0; and callbacks
that log the curves with DVCLive, stop on a non-finite loss and draw the same batches fresh or resumed.
Each override of a transformers default is pinned by a test that fails without it."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from medqa.errors import PipelineError


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


class SameBatchesFreshOrResumed(TrainerCallback):
    """Re-seeds the global random state when training begins and after the step-0 evaluation, so a
    fresh run and one resumed from a checkpoint draw the same training batches.

    transformers' length-grouped sampler shuffles with the global RNG when the epoch starts, and
    the step-0 evaluation of a fresh run (`eval_on_start`) draws from that RNG first (every
    DataLoader iterator takes a seed from it); a resumed run has no such evaluation. Without this
    callback the resumed run trains on other batches (tests/test_training.py,
    test_resume_after_kill_gives_the_same_adapter, fails).
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        from transformers import set_seed

        set_seed(self.seed)

    def on_evaluate(self, args, state, control, **kwargs) -> None:
        if state.global_step == 0:
            self.on_train_begin(args, state, control)


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


# Per-token columns of the training examples (`examples.DecisionLoss`) that the loss reads, not the model.
DECISION_COLUMNS = ("loss_weights", "choice_mask")


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
        import torch

        columns = {name: [f.pop(name) for f in features] for name in DECISION_COLUMNS if name in features[0]}
        batch = self.pad(features)
        width = batch["labels"].shape[1]
        for name, rows in columns.items():
            batch[name] = torch.tensor([[0.0] * (width - len(row)) + list(row) for row in rows])
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if self.window_logits:
            labelled = batch["labels"] != -100
            first = int(labelled.int().argmax(-1)[labelled.any(-1)].min())
            # The logits at column c predict the token at c + 1: keep from the column before the first answer token.
            batch["logits_to_keep"] = batch["labels"].shape[1] - first + 1
        return batch


def answer_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None, weights: Any = None,
                choices: tuple[Any, Any] | None = None) -> Any:
    """Cross-entropy of the answer tokens from logits over the last columns of the batch (all, or
    the `logits_to_keep` window): the same value as the model's own causal-LM loss.

    Normalised by `num_items_in_batch` (the labelled tokens of the whole accumulated batch, as
    the Trainer counts them) when given, else by this batch's labelled tokens. `weights` (the
    collator's `loss_weights`, shaped like `labels`) counts each token's cross-entropy that many
    times: the decision's weight. `choices`, the options' first tokens and the collator's
    `choice_mask`: where the mask is 1 the cross-entropy is over those tokens' logits alone, the
    three-way decision (`examples.DecisionLoss`).
    """
    import torch.nn.functional as F

    logits = outputs.logits
    window = slice(labels.shape[1] - logits.shape[1] + 1, None)
    targets = labels[:, window].to(logits.device)
    flat_logits, flat_targets = logits[:, :-1].flatten(0, 1).float(), targets.flatten()
    if weights is None and choices is None:
        total = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
    else:
        per_token = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="none")
        if choices is not None:
            per_token = _three_way_at_choices(per_token, flat_logits, flat_targets, choices, window)
        if weights is not None:
            per_token = per_token * weights[:, window].to(per_token.device).flatten()
        total = per_token.sum()
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def _three_way_at_choices(per_token: Any, flat_logits: Any, flat_targets: Any, choices: tuple[Any, Any],
                          window: slice) -> Any:
    """`per_token` with the cross-entropy at the choice positions taken over the options' logits alone."""
    import torch
    import torch.nn.functional as F

    choice_ids, mask = choices
    ids = torch.as_tensor(choice_ids, device=flat_logits.device)
    at = mask[:, window].to(flat_logits.device).flatten().nonzero().squeeze(-1)
    option = (flat_targets[at].unsqueeze(-1) == ids).int().argmax(-1)
    three_way = F.cross_entropy(flat_logits[at][:, ids], option, reduction="none")
    return per_token.index_put((at,), three_way)


def supports_logits_to_keep(model: Any) -> bool:
    """Whether the (possibly peft-wrapped) causal LM's forward takes `logits_to_keep`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


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


class AnswerTrainer(Trainer):
    """transformers' Trainer with the loss on the answer tokens alone, computed from the answer columns'
    logits (`answer_loss`) with each token's cross-entropy counted as the batch's `loss_weights` say, and
    a warmup that starts above rate 0 (`warm_up_from_the_first_step`)."""

    def __init__(self, *args: Any, choice_ids: Sequence[int] | None = None, **kwargs: Any):
        # A loss function of its own: the Trainer then counts the labelled tokens of the whole accumulated
        # batch, over every process (`num_items_in_batch`), and takes the loss as scaled for accumulation.
        super().__init__(*args, compute_loss_func=answer_loss, **kwargs)
        self.choice_ids = choice_ids

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The batch's answer loss. Its `loss_weights` (the decision's weight) and `choice_mask` (where the
        decision is chosen among the options, `choice_ids`) are no model input; the validation batches
        have neither, so the validation loss stays the plain answer loss."""
        inputs = dict(inputs)
        labels, weights, mask = inputs.pop("labels"), inputs.pop("loss_weights", None), inputs.pop("choice_mask", None)
        outputs = model(**inputs)
        choices = (self.choice_ids, mask) if mask is not None and self.choice_ids is not None else None
        loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch, weights=weights,
                                      choices=choices)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # `num_items_in_batch` counts every process's tokens while data parallelism averages the
            # gradients over processes: scaled back, as transformers' own compute_loss does.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            self.lr_scheduler = warm_up_from_the_first_step(scheduler, self.args.get_warmup_steps(num_training_steps))
        return self.lr_scheduler


def build_trainer(model: Any, tokenizer: Any, args: Any, train_ds: Any, val_ds: Any, *,
                  callbacks: Sequence[TrainerCallback] = (), choice_ids: Sequence[int] | None = None) -> AnswerTrainer:
    """The finetune stage's Trainer over these datasets, its batches left-padded with logits kept only
    where answers are predicted (`AnswerBatchCollator`); `choice_ids` for a three-way decision loss."""
    return AnswerTrainer(
        choice_ids=choice_ids,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=AnswerBatchCollator(tokenizer, window_logits=supports_logits_to_keep(model)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


@contextmanager
def forward_as_loaded(model: Any) -> Iterator[Any]:
    """The model computing in its weights' dtype, as the eval stages run it, inside the block.

    Under mixed precision accelerate wraps the model's forward in autocast for training and leaves
    the wrapper in place afterwards: scoring the trained model through it would compute in bf16 what
    the eval stages compute in fp32. The wrapper is put back after the block."""
    wrapped = {module: module.forward for module in model.modules() if "_original_forward" in module.__dict__}
    for module in wrapped:
        module.forward = module.__dict__["_original_forward"]
    try:
        yield model
    finally:
        for module, forward in wrapped.items():
            module.forward = forward
