"""The finetune stage's examples as the Trainer reads them: prompt and target tokens with the loss on
the target only, the context cut to fit, and how the decision word is scored in the loss (`DecisionLoss`):
its weight, and whether its cross-entropy is over the three options' tokens alone."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medqa.decisions.answer_format import DECISIONS, AnswerFormat
from medqa.errors import PipelineError
from medqa.params import TrainParams
from medqa.prompting.prompts import fit_example


@dataclass(frozen=True)
class DecisionLoss:
    """How the decision word counts in the training loss, where the target states it
    (`AnswerFormat.decision_span`): its tokens `weights[decision]` times each, every other answer token
    once; with `choice_ids` (the options' first tokens, in `DECISIONS` order), the cross-entropy at its
    first token is over those tokens alone, the three-way choice that choice scoring reads."""

    weights: dict[str, float]
    answer_format: AnswerFormat
    choice_ids: tuple[int, ...] | None = None


def option_first_tokens(answer_format: AnswerFormat, tokenizer: Any) -> tuple[int, ...]:
    """The first token of each option after the answer prefix, in `DECISIONS` order; they must differ,
    or a loss over them could not tell the options apart."""
    firsts = tuple(ids[0] for ids in answer_format.options(tokenizer))
    if len(set(firsts)) < len(firsts):
        raise PipelineError("train.decision_loss=choices needs options that start with different tokens; this "
                            f"tokenizer starts them with {list(firsts)}: use train.decision_loss=vocabulary")
    return firsts


def decision_loss(train: TrainParams, decisions: Sequence[str], answer_format: AnswerFormat,
                  choice_ids: tuple[int, ...] | None = None) -> DecisionLoss | None:
    """The decision word's place in the loss from the `train` params: weight `decision_loss_weight` for
    every decision, or with `decision_class_weights: balanced` that times the decision's inverse frequency
    among the training questions (mean 1 over them, so the mean weight stays `decision_loss_weight`); and
    `choice_ids` (`option_first_tokens`) with `decision_loss: choices`. None when every token counts once
    over the whole vocabulary: the plain answer loss."""
    if train.decision_loss == "choices" and choice_ids is None:
        raise ValueError("train.decision_loss=choices needs the options' first tokens (option_first_tokens)")
    if train.decision_loss_weight == 1 and train.decision_class_weights == "none" and train.decision_loss == "vocabulary":
        return None
    counts = Counter(decisions)
    if train.decision_class_weights == "balanced":
        weights = {d: train.decision_loss_weight * len(decisions) / (len(counts) * n) for d, n in counts.items()}
    else:
        weights = {d: float(train.decision_loss_weight) for d in counts}
    return DecisionLoss(weights, answer_format, choice_ids if train.decision_loss == "choices" else None)


def _decision_columns(example: dict, tokenizer: Any, loss: DecisionLoss) -> dict[str, list[float]]:
    """Per target token: its loss weight (the decision's for the tokens that spell the decision word)
    and, with `choice_ids`, 1 at the decision word's first token (`choice_mask`), else 0."""
    try:
        start, end = loss.answer_format.decision_span(example["target"], example["final_decision"])
    except ValueError as e:
        raise PipelineError(f"pmid {example['pmid']}: {e}; re-run the format stage") from e
    encoded = tokenizer(example["target"], add_special_tokens=False, return_offsets_mapping=True)
    in_word = [s < end and e > start for s, e in encoded["offset_mapping"]]
    weight = loss.weights[example["final_decision"]]
    columns = {"loss_weights": [weight if inside else 1.0 for inside in in_word]}
    if loss.choice_ids is not None:
        first = in_word.index(True)
        expected = loss.choice_ids[DECISIONS.index(example["final_decision"])]
        if encoded["input_ids"][first] != expected:
            raise PipelineError(f"pmid {example['pmid']}: the target spells its decision with token "
                                f"{encoded['input_ids'][first]}, not the option's first token {expected}; "
                                "use train.decision_loss=vocabulary")
        columns["choice_mask"] = [float(i == first) for i in range(len(in_word))]
    return columns


def tokenize_example(example: dict, tokenizer: Any, max_length: int,
                     loss: DecisionLoss | None = None) -> dict[str, list]:
    """Prompt + target ids with the loss masked (-100) on the prompt; the context is cut, never the
    target. With a decision `loss`, also each token's loss weight (`loss_weights`) and, for a three-way
    decision loss, where the decision is chosen (`choice_mask`): both 0 on the prompt."""
    prompt, target = fit_example(example, tokenizer, max_length)
    tokenized: dict[str, list] = {
        "input_ids": prompt + target,
        "attention_mask": [1] * (len(prompt) + len(target)),
        "labels": [-100] * len(prompt) + target,
    }
    if loss is not None:
        for name, column in _decision_columns(example, tokenizer, loss).items():
            tokenized[name] = [0.0] * len(prompt) + column
    return tokenized


def tokenized_dataset(examples: list[dict], tokenizer: Any, max_length: int, loss: DecisionLoss | None = None) -> Any:
    """The examples tokenised (`tokenize_example`) as a datasets.Dataset, what the Trainer reads."""
    from datasets import Dataset

    return Dataset.from_list([tokenize_example(ex, tokenizer, max_length, loss) for ex in examples])
