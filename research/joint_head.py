"""The answer loss and a classification head trained together through the LoRA adapter, judged out of fold:
per fold, the finetune stage's training (the answer text's cross-entropy, the decision word weighted as
params.yaml says, the best checkpoint by the plain answer loss on the fold's validation questions) with a
3-way linear head added on the final hidden state at the position whose next token is the decision, its
cross-entropy (times `--head-weight`) added to the loss. The head starts from the LM head's rows for the
options' first tokens and is saved with the adapter (peft's `modules_to_save`), so the best checkpoint
restores both. Then the fold's held-out questions are scored twice from one forward pass each: by the head,
written to OUT_DIR, and by the same model's plain choice (its LM's option log-likelihoods), written to
OUT_DIR/choice; both laid out as `data/cv` for `research.cv_levers`.

Inputs: a cross-validated run's `data/cv` (each fold's `train.jsonl`, `val.jsonl`, `held_out.jsonl`,
`folds.json`) and `models/base`. About as long per fold as a `cv_fold` stage.

    python -m research.joint_head data/cv heads/joint
    python -m research.cv_levers choice=data/cv joint-head=heads/joint joint-choice=heads/joint/choice
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medqa import paths
from medqa.decisions.answer_format import DECISIONS, AnswerFormat
from medqa.io import read_jsonl
from medqa.modeling.hardware import Hardware
from medqa.params import Params
from medqa.training.trainer import AnswerTrainer
from research.adapter_head import lora_config, option_head, score_folds, with_train
from research.decision_head import decision_prompts, held_out_rows

HEAD = "decision_head"  # the head's module name in the base model, saved with the adapter


def setup_joint_model(base_dir: Path, params: Params, hardware: Hardware, choice_ids: Sequence[int]) -> Any:
    """The base model with a 3-way head (`HEAD`, started from the LM head's rows for `choice_ids`) and a
    fresh LoRA adapter on the profile's modules; the head trains in full and is saved with the adapter."""
    from peft import get_peft_model

    from medqa.modeling.loading import load_model

    base = load_model(base_dir, hardware)
    base.add_module(HEAD, option_head(base, choice_ids))
    return get_peft_model(base, lora_config(params.model, params.lora, "CAUSAL_LM", modules_to_save=[HEAD]))


def decision_head_of(model: Any) -> Any:
    """The (trainable) head of a `setup_joint_model` model."""
    return getattr(model.get_base_model(), HEAD)


class JointTrainer(AnswerTrainer):
    """The finetune stage's answer loss plus `head_weight` times the head's cross-entropy over the three
    decisions, read at the column before each training example's decision word (its `choice_mask`); the
    validation batches have no mask, so the validation loss stays the plain answer loss."""

    def __init__(self, *args: Any, option_ids: Sequence[int], head_weight: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.option_ids, self.head_weight = list(option_ids), head_weight

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        import torch
        import torch.nn.functional as F

        mask, labels = inputs.get("choice_mask"), inputs["labels"]
        # The head reads the final hidden states (their last entry is the normed state the LM head reads).
        loss, outputs = super().compute_loss(model, dict(inputs, output_hidden_states=True), return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if mask is not None:
            rows = torch.arange(labels.shape[0], device=labels.device)
            word = mask.to(labels.device).argmax(-1)  # the decision word's first column
            states = outputs.hidden_states[-1][rows, word - 1]
            codes = (labels[rows, word].unsqueeze(-1) == torch.tensor(self.option_ids, device=labels.device)).int().argmax(-1)
            loss = loss + self.head_weight * F.cross_entropy(decision_head_of(model)(states).float(), codes)
        return (loss, outputs) if return_outputs else loss


def joint_log_probabilities(model: Any, prompts: list[list[int]], option_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """For each prompt (its tokens up to the decision), the head's log-probabilities of the three decisions
    and the LM's log-likelihoods of the options' first tokens, both shape (n, 3), from one unpadded forward
    pass each, in the weights' dtype."""
    import torch
    from tqdm.auto import tqdm

    from medqa.inference.core import model_device
    from medqa.training.trainer import forward_as_loaded

    device, head_rows, choice_rows = model_device(model), [], []
    model.eval()
    with torch.no_grad(), forward_as_loaded(model) as plain:
        for prompt in tqdm(prompts, desc="held-out decisions", unit="q"):
            out = plain(input_ids=torch.tensor([prompt], device=device), logits_to_keep=1, output_hidden_states=True)
            head_rows.append(torch.log_softmax(decision_head_of(model)(out.hidden_states[-1][0, -1]).float(), -1))
            choice_rows.append(torch.log_softmax(out.logits[0, -1].float(), -1)[list(option_ids)])
    empty = np.zeros((0, 3), dtype=np.float32)
    return tuple(np.array([r.cpu().numpy() for r in rows]) if rows else empty for rows in (head_rows, choice_rows))


def fold_joint_scores(params: Params, base_dir: Path, fold_dir: Path, work_dir: Path,
                      head_weight: float) -> tuple[list[dict], list[dict]]:
    """One fold: the model trained on the fold's `train.jsonl` (best checkpoint by the answer loss on
    `val.jsonl`); its `held_out.jsonl` rows as `cv_fold` writes them, by the head and by the plain choice."""
    from transformers import set_seed

    from medqa.modeling.hardware import resolve_hardware
    from medqa.modeling.loading import load_tokenizer
    from medqa.training.examples import DecisionLoss, decision_loss, option_first_tokens, tokenized_dataset
    from medqa.training.recipe import training_arguments
    from medqa.training.trainer import AnswerBatchCollator, supports_logits_to_keep

    train = params.train
    set_seed(train.seed)
    tokenizer = load_tokenizer(base_dir)
    answer_format = AnswerFormat.of(params.prompt)
    option_ids = option_first_tokens(answer_format, tokenizer)
    examples, val, held_out = (read_jsonl(fold_dir / f"{name}.jsonl") for name in ("train", "val", "held_out"))
    weighted = decision_loss(train, [ex["final_decision"] for ex in examples], answer_format, option_ids)
    # The options' ids mark where the head reads (`choice_mask`); the trainer gets none, so the decision
    # word's own cross-entropy stays over the whole vocabulary, as train.decision_loss says.
    marked = DecisionLoss(weighted.weights if weighted else dict.fromkeys(DECISIONS, 1.0), answer_format, option_ids)
    hardware = resolve_hardware(params.model.quantization, params.model.dtype)
    model = setup_joint_model(base_dir, params, hardware, option_ids)
    trainer = JointTrainer(
        model=model, args=training_arguments(train, hardware, work_dir),
        train_dataset=tokenized_dataset(examples, tokenizer, train.max_length, marked),
        # The fold's val.jsonl holds its validation-loss questions already (`crossval.folds.fold_parts`).
        eval_dataset=tokenized_dataset(val, tokenizer, train.max_length),
        data_collator=AnswerBatchCollator(tokenizer, window_logits=supports_logits_to_keep(model)),
        processing_class=tokenizer, option_ids=option_ids, head_weight=head_weight)
    trainer.train()
    prompts = decision_prompts(held_out, tokenizer, answer_format, params.eval.max_prompt_length)
    head, choice = joint_log_probabilities(trainer.model, prompts, option_ids)
    return held_out_rows(held_out, head), held_out_rows(held_out, choice)


def main() -> None:
    from medqa.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path, help="a cross-validated run's data/cv")
    parser.add_argument("out_dir", type=Path, help="the head's out-of-fold scores (laid out as data/cv); the choice's in OUT_DIR/choice")
    parser.add_argument("--base", type=Path, default=paths.BASE_MODEL)
    parser.add_argument("--head-weight", type=float, default=1.0, help="the head's cross-entropy times this in the loss")
    parser.add_argument("--folds", type=int, nargs="+", help="only these folds (a screen; cv_levers needs all)")
    parser.add_argument("--seed", type=int, help="instead of train.seed")
    args = parser.parse_args()
    params = with_train(load_params(), seed=args.seed)
    score_folds(args.cv_dir, [args.out_dir, args.out_dir / "choice"], args.folds,
                lambda fold_dir, work_dir: fold_joint_scores(params, args.base, fold_dir, work_dir, args.head_weight))

if __name__ == "__main__":
    main()
