"""The adapter as it is shared: a release folder holding the trained adapter and a model card written
from the run's own params and metrics (the hub's YAML metadata with a `model-index`, the prompt to
use it with, the training settings, the results with their intervals, the limitations)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa.decisions.answer_format import DECISIONS, AnswerFormat
from medqa.decisions.protocols import PRIMARY, protocol
from medqa.evaluation.text_metrics import TEXT_METRICS
from medqa.io import atomic_dir
from medqa.modeling.profiles import get_profile
from medqa.params import LoraParams, ModelParams, PromptParams, TrainParams
from medqa.report.render import (
    fitted_text,
    is_model_metric,
    label_distribution,
    metric_at,
    metrics_table,
    questions_behind,
    reported_rows,
    standing_section,
)

DATASET = ("qiaojin/PubMedQA", "pqa_labeled")  # the hub's copy of the data the pipeline trains on
CARD = "README.md"
SPLIT_NOTES = {"official": " (the test questions are among the 500 of PubMedQA's official test set)",
               "random": " (stratified by decision)"}
REPO_PLACEHOLDER = "<hub-repo-id>"  # the usage snippet's repository; `medqa.release.publish` fills in the real one
TAGS = ["lora", "peft", "pubmedqa", "medical", "biomedical", "question-answering"]
# A reported statistic's metric type on the hub (https://hf.co/metrics) and its configuration.
METRIC_TYPES = {
    "accuracy": ("accuracy", None), "macro_f1": ("f1", "macro"), "weighted_f1": ("f1", "weighted"),
    "none_rate": ("none_rate", None), **{metric.name: metric.card for metric in TEXT_METRICS},
}


@dataclass(frozen=True)
class RunOutcome:
    """What the card reports, as the run's stages wrote it."""

    source: dict  # models/base/source.json: where the base weights came from
    trained_on: dict  # the adapter's trained_on.json: the base as the adapter saw it
    baseline: dict  # metrics/baseline.json
    finetuned: dict  # metrics/finetuned.json
    differences: dict[str, tuple[float, float, float]]  # paired fine-tuned - base, with its interval
    train: dict  # metrics/train.json
    split: dict  # metrics/split.json


def hub_base_model(source: dict) -> str | None:
    """The base model's hub id for the card's `base_model` (None for a model from a local directory)."""
    return None if source.get("weights") == "dir" else source["hub_id"]


def card_results(finetuned: dict) -> list[tuple[str, str, float]]:
    """(label, metrics path, value) of each fine-tuned result the card's `model-index` lists: the
    report's rows, without the majority-class rows (no model's result)."""
    return [(label, path, float(metric_at(finetuned, path))) for label, path in reported_rows() if is_model_metric(path)]


def _eval_results(finetuned: dict, split_strategy: str) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for label, path, value in card_results(finetuned):
        metric_type, config = METRIC_TYPES[path.rsplit(".", 1)[1]]
        results.append(EvalResult(
            task_type="question-answering", task_name="PubMedQA yes/no/maybe with a long answer",
            dataset_type=DATASET[0], dataset_name="PubMedQA (pqa_labeled)", dataset_config=DATASET[1],
            dataset_split=f"test ({split_strategy} split, {questions_behind(finetuned, path)} questions)",
            metric_type=metric_type, metric_config=config, metric_name=label, metric_value=round(value, 6),
        ))
    return results


def card_metadata(outcome: RunOutcome, model: ModelParams, split_strategy: str) -> Any:
    """The card's YAML header (`huggingface_hub.ModelCardData`)."""
    from huggingface_hub import ModelCardData

    base = hub_base_model(outcome.source)
    return ModelCardData(
        base_model=base, library_name="peft", datasets=[DATASET[0]], language=["en"],
        license=get_profile(model.name).license, tags=TAGS, pipeline_tag="text-generation",
        model_name=f"{(base or 'local model').rsplit('/', 1)[-1]} LoRA for PubMedQA",
        eval_results=_eval_results(outcome.finetuned, split_strategy),
    )


def _base_text(source: dict, trained_on: dict) -> str:
    if source.get("weights") == "local":
        where = (f"`{source['hub_id']}` as the `{source['origin'].split('/')[0]}` package ships it "
                 f"(`{source['origin'].split('/', 1)[1]}`, de-quantised to floating point): the adapter "
                 "learned against those weights, which differ slightly from the hub's originals")
    elif source.get("weights") == "dir":
        where = f"a local model directory (`{Path(source['path']).name}`, fingerprint `{source['fingerprint'][:12]}`)"
    else:
        where = f"`{source['hub_id']}` at revision `{source.get('revision')}`"
    quantized = trained_on.get("quantization", "none") != "none"
    return where + ("; trained on it loaded in 4-bit nf4 (QLoRA)" if quantized
                    else f"; trained on it in {trained_on.get('dtype', 'float32')}"
                    + (f" with {trained_on['autocast']} autocast" if trained_on.get("autocast") else ""))


def _usage(base: str | None, prompt: PromptParams) -> str:
    return (
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base or '<the base model>')})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(base or '<the base model>')})\n"
        f"model = PeftModel.from_pretrained(base, {json.dumps(REPO_PLACEHOLDER)})\n"
        f"system = {json.dumps(prompt.system)}\n"
        "user = f\"Question: {question}\\nContext: {abstract}\"\n"
        "ids = tokenizer.apply_chat_template([{\"role\": \"system\", \"content\": system},\n"
        "                                     {\"role\": \"user\", \"content\": user}],\n"
        "                                    add_generation_prompt=True, return_tensors=\"pt\")\n"
        "answer = tokenizer.decode(model.generate(ids, max_new_tokens=96)[0, ids.shape[1]:], skip_special_tokens=True)\n"
        "```\n"
    )


def _prompt_text(prompt: PromptParams) -> str:
    template = f"the template `{prompt.template}`" if prompt.template else "the tokenizer's chat template"
    answer_format = AnswerFormat.of(prompt)
    where = "first" if answer_format.decision_first else "after the long answer"
    return (
        f"Rendered with {template}: the system prompt below, then the user turn `Question: <question>\\n"
        f"Context: <the abstract's passages, joined by spaces>`. The model answers with a long answer and "
        f"states the decision {where} as \"{answer_format.sentence('<yes|no|maybe>')}\"; the decision the "
        f"results call *{PRIMARY.label}* is the most likely of yes/no/maybe straight after the prompt and "
        f"\"{answer_format.prefix}\".\n\nSystem prompt:\n\n> {prompt.system}\n"
    )


def _training_text(outcome: RunOutcome, lora: LoraParams, train: TrainParams, split_strategy: str) -> str:
    t, split = outcome.train, outcome.split
    counts = "; ".join(f"{name} {split[name]['n']} ({label_distribution({d: split[name][d] for d in DECISIONS})})"
                       for name in ("train", "val", "test") if name in split)
    targets = ", ".join(lora.target_modules) if lora.target_modules else "all attention and MLP projections"
    return (
        f"PubMedQA's 1,000 expert-labelled questions (`{DATASET[0]}`, `{DATASET[1]}`), split "
        f"`{split_strategy}`{SPLIT_NOTES.get(split_strategy, '')}: {counts}.\n\n"
        f"LoRA r={lora.r}, alpha={lora.alpha}, dropout {lora.dropout}, on {targets}; {t['trainable_params']:,} "
        f"trainable parameters. {t['steps']} optimiser steps ({t['epochs']:.2f} epochs) of "
        f"{train.batch_size} x {train.grad_accum} questions, learning rate {train.learning_rate} ({train.scheduler}, "
        f"warmup {train.warmup_ratio}), weight decay {train.weight_decay}, sequences up to {train.max_length} "
        f"tokens with the loss on the answer only, seed {train.seed}, optimiser {outcome.trained_on.get('optim')}. "
        f"The adapter is the checkpoint of step {t['best_step']}, the lowest validation loss "
        f"({t['best_val_loss']:.4f}).\n"
    )


def card_text(outcome: RunOutcome, model: ModelParams, prompt: PromptParams, lora: LoraParams,
              train: TrainParams, *, split_strategy: str) -> str:
    """The whole model card: YAML metadata, then the Markdown body."""
    meta = card_metadata(outcome, model, split_strategy)
    base = hub_base_model(outcome.source)
    table = metrics_table(outcome.baseline, outcome.finetuned, outcome.differences).to_markdown(
        index=False, disable_numparse=True)
    n, n_answers = outcome.finetuned["n_questions"], outcome.finetuned["n_answers"]
    return (
        f"---\n{meta.to_yaml()}\n---\n\n"
        f"# {meta.model_name}\n\n"
        "A LoRA adapter that answers PubMedQA questions (a biomedical question with the abstract it comes "
        "from) with a long answer and a yes/no/maybe decision. Generated by the pipeline that trained and "
        "evaluated it, from that run's params and metrics; not edited by hand.\n\n"
        f"Base model: {_base_text(outcome.source, outcome.trained_on)}.\n\n"
        f"## How to use\n\n{_usage(base, prompt)}\n"
        f"## Prompt\n\n{_prompt_text(prompt)}\n"
        f"## Training\n\n{_training_text(outcome, lora, train, split_strategy)}\n"
        "## Results\n\n"
        f"Decisions on {n} test questions (labels: {label_distribution(outcome.finetuned['decision']['labels'])}), "
        f"long answers on a seeded sample of {n_answers} of them (the *questions* column), the base "
        "model and this adapter on the same questions. Brackets: 95% bootstrap intervals; the change is "
        "fine-tuned minus base with its paired interval. *Majority class*: always answering the most frequent "
        "decision; a model that does not beat it has not learned the decisions. *choice + offsets*: the "
        "options' log-likelihoods plus offsets fitted on the validation questions, for this adapter "
        f"{fitted_text(protocol('offsets'), outcome.finetuned)}: add them to read its decisions as the table does.\n\n"
        f"{table}\n\n"
        f"#{standing_section(outcome.baseline, outcome.finetuned, split_strategy)}\n"
        "## Limitations\n\n"
        f"- Intervals are wide on {n} questions and wider on the {n_answers} with generated answers: differences "
        "inside them are not evidence.\n"
        "- Trained on a few hundred questions; a small model learns the answer's form more than the decision.\n"
        "- Answers follow the abstract it is given and can be wrong, or confidently wrong. Not medical advice; "
        "not for clinical use.\n"
    )


def write_release(adapter_dir: Path, out_dir: Path, card: str, base_model: str | None) -> None:
    """The adapter's files and the card in `out_dir`, replaced atomically. The adapter's config names
    the base by its hub id (not the local path it was trained from), so hub tools find the base."""
    with atomic_dir(out_dir) as tmp:
        for f in sorted(Path(adapter_dir).iterdir()):
            if f.is_file() and f.name != CARD:  # (peft's empty template card is replaced)
                shutil.copy2(f, tmp / f.name)
        config_path = tmp / "adapter_config.json"
        if base_model and config_path.exists():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base_model
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(card, encoding="utf-8")

