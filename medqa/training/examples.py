"""The finetune stage's examples as the Trainer reads them: prompt and target tokens with the loss on
the target only, the context cut to fit, and each token's loss weight where the decision word counts
more (`DecisionWeighting`)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medqa.decisions.answer_format import AnswerFormat
from medqa.errors import PipelineError
from medqa.params import TrainParams
from medqa.prompting.prompts import fit_example


@dataclass(frozen=True)
class DecisionWeighting:
    """How much the decision's tokens count in the training loss: `weights[decision]` times each,
    every other answer token once. Stated where the target states it (`AnswerFormat.decision_span`)."""

    weights: dict[str, float]
    answer_format: AnswerFormat


def decision_weighting(train: TrainParams, decisions: Sequence[str],
                       answer_format: AnswerFormat) -> DecisionWeighting | None:
    """The decision tokens' loss weights from the `train` params: `decision_loss_weight` for every
    decision, or with `decision_class_weights: balanced` that times the decision's inverse frequency
    among the training questions (mean 1 over them, so the mean weight stays `decision_loss_weight`).
    None when every token counts once: the plain answer loss."""
    if train.decision_loss_weight == 1 and train.decision_class_weights == "none":
        return None
    counts = Counter(decisions)
    if train.decision_class_weights == "balanced":
        weights = {d: train.decision_loss_weight * len(decisions) / (len(counts) * n) for d, n in counts.items()}
    else:
        weights = {d: float(train.decision_loss_weight) for d in counts}
    return DecisionWeighting(weights, answer_format)


def _target_weights(example: dict, tokenizer: Any, weighting: DecisionWeighting) -> list[float]:
    """Each target token's loss weight: the decision's for the tokens that spell the decision word."""
    try:
        start, end = weighting.answer_format.decision_span(example["target"], example["final_decision"])
    except ValueError as e:
        raise PipelineError(f"pmid {example['pmid']}: {e}; re-run the format stage") from e
    encoded = tokenizer(example["target"], add_special_tokens=False, return_offsets_mapping=True)
    weight = weighting.weights[example["final_decision"]]
    return [weight if s < end and e > start else 1.0 for s, e in encoded["offset_mapping"]]


def tokenize_example(example: dict, tokenizer: Any, max_length: int,
                     weighting: DecisionWeighting | None = None) -> dict[str, list]:
    """Prompt + target ids with the loss masked (-100) on the prompt; the context is cut, never the
    target. With a `weighting`, also each token's loss weight (`loss_weights`, 0 on the prompt)."""
    prompt, target = fit_example(example, tokenizer, max_length)
    tokenized: dict[str, list] = {
        "input_ids": prompt + target,
        "attention_mask": [1] * (len(prompt) + len(target)),
        "labels": [-100] * len(prompt) + target,
    }
    if weighting is not None:
        tokenized["loss_weights"] = [0.0] * len(prompt) + _target_weights(example, tokenizer, weighting)
    return tokenized


def tokenized_dataset(examples: list[dict], tokenizer: Any, max_length: int, weighting: DecisionWeighting | None = None) -> Any:
    """The examples tokenised (`tokenize_example`) as a datasets.Dataset, what the Trainer reads."""
    from datasets import Dataset

    return Dataset.from_list([tokenize_example(ex, tokenizer, max_length, weighting) for ex in examples])
