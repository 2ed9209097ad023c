"""A classification head as the decision protocol, judged out of fold: per fold, a 3-way logistic
regression (scikit-learn, its strength chosen by inner cross-validation) on the model's last hidden state
where choice scoring reads the options (after the prompt and the answer prefix), fitted on the fold's
training questions and read on its held-out ones. The hidden states are the frozen base model's, or with
`--adapters`, each fold's fine-tuned model's (the LoRA model with a head fitted on top, the encoder
anchors' way without training through the head). Writes its out-of-fold probabilities laid out as
`data/cv`, so that `research.cv_levers` compares them with the choice scoring of any run.

Inputs: a cross-validated run's `data/cv` (each fold's `train.jsonl`, `held_out.jsonl`, `folds.json`),
`models/base`, and for `--adapters` its `models/cv` (`fold-<id>/adapter`); the prompt section of
params.yaml as the run had it. One forward pass per question and model (about 0.6 s on a 2-core CPU).

    python -m research.decision_head data/cv heads/base
    python -m research.decision_head data/cv heads/lora --adapters models/cv
    python -m research.cv_levers choice=data/cv head=heads/base lora-head=heads/lora
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medqa import paths
from medqa.decisions.answer_format import AnswerFormat
from medqa.decisions.protocols import reference_codes
from medqa.io import read_json, read_jsonl, write_json, write_jsonl
from medqa.prompting.prompts import fit_prompt
from research.cv_rules import held_out_scores_path

# Inverse regularisation strengths the head's inner cross-validation tries.
HEAD_CS = np.logspace(-4, 1, 11)


def decision_prompts(examples: list[dict], tokenizer: Any, answer_format: AnswerFormat, budget: int) -> list[list[int]]:
    """Each example's tokens up to the decision: its prompt (cut to `budget` tokens) and the answer
    prefix, as choice scoring reads the options after them; the last token's state is the head's input."""
    prefix = answer_format.prefix_ids(tokenizer)
    return [fit_prompt(example, tokenizer, budget) + prefix for example in examples]


def decision_states(model: Any, tokenizer: Any, examples: list[dict], answer_format: AnswerFormat, budget: int,
                    desc: str | None = "hidden states") -> np.ndarray:
    """The model's final hidden state (after its last norm: what the LM head reads) at the position whose
    next token is the decision (`decision_prompts`), shape (n, hidden): one forward pass per question,
    unpadded."""
    import torch
    from tqdm.auto import tqdm

    from medqa.inference.core import model_device

    decoder = model.get_decoder()
    device = model_device(model)
    states = []
    with torch.no_grad():
        for prompt in tqdm(decision_prompts(examples, tokenizer, answer_format, budget), desc=desc, unit="q",
                           disable=desc is None):
            ids = torch.tensor([prompt], device=device)
            states.append(decoder(input_ids=ids).last_hidden_state[0, -1].float().cpu().numpy())
    return np.array(states, dtype=np.float32).reshape(len(examples), model.config.hidden_size)


def fit_head(states: np.ndarray, truth: np.ndarray, seed: int) -> Any:
    """A multinomial logistic regression from standardised hidden states to the decision (option
    indices), its L2 strength chosen from `HEAD_CS` by log-loss over 5 stratified inner folds; unweighted,
    so that its probabilities stay calibrated for the macro-F1 rule to shift."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=HEAD_CS, cv=StratifiedKFold(5, shuffle=True, random_state=seed), scoring="neg_log_loss",
        l1_ratios=(0.0,), max_iter=5000, use_legacy_attributes=False)).fit(states, truth)


def held_out_rows(examples: list[dict], loglik: np.ndarray) -> list[dict]:
    """The held-out questions' rows as `cv_fold` writes them (`pmid`, `final_decision`, `loglik`), with a
    head's log-probabilities (or any option scores, shape (n, 3)) as `loglik`."""
    return [{"pmid": ex["pmid"], "final_decision": ex["final_decision"], "loglik": [round(float(v), 6) for v in row]}
            for ex, row in zip(examples, loglik)]


def held_out_head_scores(folds: dict[str, int], parts: Callable[[int], tuple[list[dict], list[dict]]],
                         states: Callable[[int, list[dict]], np.ndarray], seed: int) -> dict[int, list[dict]]:
    """Per fold, its held-out questions' rows as `cv_fold` writes them (`pmid`, `final_decision`, and as
    `loglik` the head's log-probabilities), the head fitted on that fold's training questions' states.
    `parts(fold)`: the fold's (training, held-out) examples; `states(fold, examples)`: their hidden
    states under the fold's model."""
    out = {}
    for fold in sorted(set(folds.values())):
        train, held_out = parts(fold)
        head = fit_head(states(fold, train), reference_codes(train), seed)
        out[fold] = held_out_rows(held_out, np.log(np.clip(head.predict_proba(states(fold, held_out)), 1e-12, None)))
    return out


def main() -> None:
    from medqa.modeling.hardware import resolve_hardware
    from medqa.modeling.loading import load_for_inference
    from medqa.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path, help="a cross-validated run's data/cv")
    parser.add_argument("out_dir", type=Path, help="where the head's out-of-fold scores go (laid out as data/cv)")
    parser.add_argument("--base", type=Path, default=paths.BASE_MODEL)
    parser.add_argument("--adapters", type=Path, help="the run's models/cv: each fold's states from its own adapter")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    params = load_params()
    hardware = resolve_hardware(params.model.quantization, params.model.dtype)
    answer_format, budget = AnswerFormat.of(params.prompt), params.eval.max_prompt_length
    folds = read_json(args.cv_dir / paths.CV_FOLDS.name)

    def parts(fold: int) -> tuple[list[dict], list[dict]]:
        fold_dir = args.cv_dir / paths.cv_fold_dir(fold).name
        return read_jsonl(fold_dir / "train.jsonl"), read_jsonl(fold_dir / "held_out.jsonl")

    loaded: dict[int | None, Any] = {}
    cache: dict[tuple[int | None, str], np.ndarray] = {}

    def states(fold: int, examples: list[dict]) -> np.ndarray:
        key = fold if args.adapters else None  # the frozen base reads each question once
        if key not in loaded:
            loaded.clear()
            adapter = args.adapters / paths.cv_fold_models(fold).name / "adapter" if args.adapters else None
            loaded[key] = load_for_inference(args.base, hardware, adapter, merge=True)
        todo = [ex for ex in examples if (key, ex["pmid"]) not in cache]
        model = loaded[key]
        for ex, row in zip(todo, decision_states(model.model, model.tokenizer, todo, answer_format, budget,
                                                 desc=f"fold {fold} hidden states")):
            cache[key, ex["pmid"]] = row
        return np.array([cache[key, ex["pmid"]] for ex in examples])

    scores = held_out_head_scores(folds, parts, states, args.seed)
    write_json(args.out_dir / paths.CV_FOLDS.name, folds)
    for fold, rows in scores.items():
        write_jsonl(held_out_scores_path(args.out_dir, fold), rows)
    print(f"head scores of {sum(map(len, scores.values()))} held-out questions -> {args.out_dir}")


if __name__ == "__main__":
    main()
