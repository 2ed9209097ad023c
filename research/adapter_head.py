"""A classification head trained through the LoRA adapter (the encoder anchors' way), judged out of fold:
per fold, the base model with a fresh LoRA adapter and a 3-way linear head on the last hidden state where
choice scoring reads the options (after the prompt and the answer prefix), trained together by cross-entropy
over the three decisions on the fold's training questions (no answer text), the best checkpoint by the same
loss on the fold's validation questions kept, then the fold's held-out questions scored. The head starts
from the LM head's rows for the options' first tokens (`--init choices`: at step 0 it is choice scoring)
or at random (`--init random`). Training runs as params.yaml's train and lora sections say (transformers'
Trainer with the finetune stage's arguments); its output is laid out as `data/cv`, so that
`research.cv_levers` compares it with any run's choice scoring.

Inputs: a cross-validated run's `data/cv` (each fold's `train.jsonl`, `val.jsonl`, `held_out.jsonl`,
`folds.json`) and `models/base`. About as long per fold as a `cv_fold` stage's training.

    python -m research.adapter_head data/cv heads/adapter-head
    python -m research.cv_levers choice=data/cv adapter-head=heads/adapter-head
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medqa import paths
from medqa.decisions.answer_format import DECISIONS, AnswerFormat
from medqa.decisions.protocols import reference_codes
from medqa.io import read_json, read_jsonl, write_json, write_jsonl
from medqa.modeling.hardware import Hardware
from medqa.params import LoraParams, ModelParams, Params
from research.cv_rules import held_out_scores_path
from research.decision_head import decision_prompts, held_out_rows

HeadInit = Literal["choices", "random"]


def option_head(causal: Any, choice_ids: Sequence[int] | None) -> Any:
    """A 3-way linear head on `causal`'s hidden states, in its LM head's dtype and device: the LM head's rows
    for `choice_ids` (its logits are then the options' logits, what choice scoring compares), or with None
    a fresh random layer."""
    import torch

    lm_head = causal.get_output_embeddings().weight
    head = torch.nn.Linear(lm_head.shape[1], 3, bias=False, dtype=lm_head.dtype, device=lm_head.device)
    if choice_ids is not None:
        with torch.no_grad():
            head.weight.copy_(lm_head[list(choice_ids)])
    return head


def lora_config(model: ModelParams, lora: LoraParams, task_type: str, modules_to_save: list[str] | None = None) -> Any:
    """peft's LoraConfig as the finetune stage builds it (the lora section, the profile's modules), for
    `task_type`, with `modules_to_save` trained in full and saved with the adapter."""
    from peft import LoraConfig

    from medqa.modeling.profiles import get_profile, lora_targets

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                      target_modules=lora_targets(get_profile(model.name), lora.target_modules),
                      task_type=task_type, modules_to_save=modules_to_save)


def with_train(params: Params, **changes: Any) -> Params:
    """`params` with the train section's keys in `changes` replaced, those given as None left as they are."""
    given = {key: value for key, value in changes.items() if value is not None}
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **given))


def score_folds(cv_dir: Path, out_dirs: Sequence[Path], fold_ids: Sequence[int] | None,
                score_fold: Callable[[Path, Path], Sequence[list[dict]]]) -> None:
    """Each fold of a run's `data/cv` (`cv_dir`; all, or `fold_ids`) scored by `score_fold(fold_dir,
    work_dir)`, whose row lists are written to `out_dirs` in order, each laid out as `data/cv`. A fold
    whose last file exists (finished before a crash) is kept; its scratch `work_dir` is removed after."""
    folds = read_json(cv_dir / paths.CV_FOLDS.name)
    for out_dir in out_dirs:
        write_json(out_dir / paths.CV_FOLDS.name, folds)
    for fold in fold_ids or sorted(set(folds.values())):
        if held_out_scores_path(out_dirs[-1], fold).exists():
            print(f"fold {fold}: scored already, kept")
            continue
        work_dir = out_dirs[0] / f"checkpoints-{fold}"
        scored = score_fold(cv_dir / paths.cv_fold_dir(fold).name, work_dir)
        for out_dir, rows in zip(out_dirs, scored):
            write_jsonl(held_out_scores_path(out_dir, fold), rows)
        shutil.rmtree(work_dir, ignore_errors=True)
        print(f"fold {fold}: {len(scored[0])} held-out questions -> {', '.join(map(str, out_dirs))}")


def classifier(causal: Any, tokenizer: Any, choice_ids: list[int] | None) -> Any:
    """A 3-way sequence classifier on `causal`'s own decoder (shared, not copied): transformers'
    `AutoModelForSequenceClassification` for its architecture, which reads the last token that is not
    padding. Its head is the LM head's rows for `choice_ids` (its logits are then the options' logits,
    what choice scoring compares), or with None a fresh random layer."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = causal.config.__class__.from_dict({
        **causal.config.to_dict(), "id2label": dict(enumerate(DECISIONS)),
        "label2id": {d: i for i, d in enumerate(DECISIONS)}, "pad_token_id": tokenizer.pad_token_id})
    with torch.device("meta"):  # the decoder is replaced below: no second copy of the weights
        model = AutoModelForSequenceClassification.from_config(config)
    setattr(model, model.base_model_prefix, causal.get_decoder())
    model.score = option_head(causal, choice_ids)
    return model


def setup_classifier(base_dir: Path, model: ModelParams, lora: LoraParams, hardware: Hardware, tokenizer: Any,
                     choice_ids: list[int] | None) -> Any:
    """The base model as `classifier`, with a fresh LoRA adapter on the profile's modules and the head
    trained in full (peft's sequence-classification task keeps `score` trainable)."""
    from peft import get_peft_model

    from medqa.modeling.loading import load_model

    causal = load_model(base_dir, hardware)
    return get_peft_model(classifier(causal, tokenizer, choice_ids), lora_config(model, lora, "SEQ_CLS"))


def decision_dataset(examples: list[dict], tokenizer: Any, answer_format: AnswerFormat, budget: int) -> Any:
    """Each example's prompt (cut to `budget` tokens) and the answer prefix, labelled with its decision's
    index: the position choice scoring reads is the last token."""
    from datasets import Dataset

    rows = decision_prompts(examples, tokenizer, answer_format, budget)
    return Dataset.from_list([{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(code)}
                              for ids, code in zip(rows, reference_codes(examples))])


def head_log_probabilities(model: Any, tokenizer: Any, dataset: Any, batch_size: int,
                           desc: str | None = "held-out decisions") -> np.ndarray:
    """The classifier's log-probabilities of the three decisions for each row of `dataset`, shape (n, 3),
    computed in the weights' dtype (the finetune stage's autocast wrapper undone, as the eval stages score),
    in batches of rows of similar length (less padding), returned in the dataset's order."""
    import torch
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    from medqa.inference.core import model_device
    from medqa.training.trainer import forward_as_loaded

    collate = DataCollatorWithPadding(tokenizer)
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in dataset["input_ids"]]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    device, out = model_device(model), np.zeros((len(rows), 3), dtype=np.float32)
    model.eval()
    with torch.no_grad(), forward_as_loaded(model) as plain:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=desc is None):
            chosen = order[start:start + batch_size]
            batch = collate([rows[i] for i in chosen])
            logits = plain(**{k: v.to(device) for k, v in batch.items()}).logits
            out[chosen] = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
    return out


def fold_head_scores(params: Params, base_dir: Path, fold_dir: Path, work_dir: Path, init: HeadInit) -> list[dict]:
    """One fold: the classifier trained on the fold's `train.jsonl` (best checkpoint by its loss on
    `val.jsonl`), its `held_out.jsonl` rows as `cv_fold` writes them, the head's log-probabilities as `loglik`."""
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from medqa.modeling.hardware import resolve_hardware
    from medqa.modeling.loading import load_tokenizer
    from medqa.training.examples import option_first_tokens
    from medqa.training.recipe import training_arguments

    set_seed(params.train.seed)
    hardware = resolve_hardware(params.model.quantization, params.model.dtype)
    tokenizer = load_tokenizer(base_dir)
    answer_format = AnswerFormat.of(params.prompt)
    choice_ids = list(option_first_tokens(answer_format, tokenizer)) if init == "choices" else None
    train, val, held_out = (read_jsonl(fold_dir / f"{name}.jsonl") for name in ("train", "val", "held_out"))
    model = setup_classifier(base_dir, params.model, params.lora, hardware, tokenizer, choice_ids)
    budget = params.train.max_length - len(answer_format.prefix_ids(tokenizer))
    trainer = Trainer(model=model, args=training_arguments(params.train, hardware, work_dir),
                      train_dataset=decision_dataset(train, tokenizer, answer_format, budget),
                      eval_dataset=decision_dataset(val, tokenizer, answer_format, budget),
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer.train()
    scored = decision_dataset(held_out, tokenizer, answer_format, params.eval.max_prompt_length)
    logprobs = head_log_probabilities(trainer.model, tokenizer, scored, params.eval.batch_size)
    return held_out_rows(held_out, logprobs)


def main() -> None:
    from medqa.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path, help="a cross-validated run's data/cv")
    parser.add_argument("out_dir", type=Path, help="where the head's out-of-fold scores go (laid out as data/cv)")
    parser.add_argument("--base", type=Path, default=paths.BASE_MODEL)
    parser.add_argument("--init", choices=("choices", "random"), default="choices")
    parser.add_argument("--epochs", type=int, help="instead of train.epochs")
    parser.add_argument("--learning-rate", type=float, help="instead of train.learning_rate")
    parser.add_argument("--folds", type=int, nargs="+", help="only these folds (a screen; cv_levers needs all)")
    args = parser.parse_args()
    params = with_train(load_params(), epochs=args.epochs, learning_rate=args.learning_rate)
    score_folds(args.cv_dir, [args.out_dir], args.folds,
                lambda fold_dir, work_dir: [fold_head_scores(params, args.base, fold_dir, work_dir, args.init)])

if __name__ == "__main__":
    main()
