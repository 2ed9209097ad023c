"""The research scripts (research/): the analyses' own statistics on known answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medqa.decisions.protocols import fit_offsets
from medqa.evaluation.metrics import CODES, decision_table
from medqa.params import PromptParams
from tests.test_metrics import _row


def test_a_sweep_pools_seeds_and_compares_two_recipes_paired():
    """research.sweep_decisions: a recipe's mean over seeds, and its difference from another recipe's
    with a paired interval (the same resampled questions for both)."""
    from research.sweep_decisions import pooled

    truth = np.array([CODES[t] for t in ["yes"] * 30 + ["no"] * 15 + ["maybe"] * 5])
    always_yes = np.full_like(truth, CODES["yes"])
    better = np.where(truth == CODES["no"], truth, always_yes)  # right on the "no" questions too: 0.9
    seeds = [better, always_yes]  # a recipe whose two seeds score 0.9 and 0.6
    mean = pooled(truth, seeds, n_resamples=200, seed=1)
    assert mean["accuracy"][0] == pytest.approx(0.75) and mean["accuracy"][1] < 0.75 < mean["accuracy"][2]
    same = pooled(truth, seeds, n_resamples=200, seed=1, against=seeds)
    assert same["accuracy"] == (0.0, 0.0, 0.0) and same["macro_f1"] == (0.0, 0.0, 0.0)
    gain = pooled(truth, seeds, n_resamples=200, seed=1, against=[always_yes])
    assert gain["accuracy"][0] == pytest.approx(0.15)
    # Paired: the recipes differ only where the first is right, so the interval stays above 0, where
    # the two recipes' own intervals, side by side, overlap.
    assert 0 < gain["accuracy"][1] < 0.15 < gain["accuracy"][2]
    assert pooled(truth, [always_yes], n_resamples=200, seed=1)["accuracy"][2] > mean["accuracy"][1]


def test_seeds_predictions_pool_to_their_mean_and_its_gain_over_the_majority(tmp_path, monkeypatch, capsys):
    """research.pool_predictions: two runs' prediction files on the same questions, per protocol the
    mean over the runs and its paired gain over always answering the most frequent decision; runs on
    other questions are refused."""
    from medqa.io import write_jsonl
    from research import pool_predictions

    truth = ["yes"] * 6 + ["no"] * 3 + ["maybe"]
    always_yes = [dict(_row(t, "yes", offsets="no" if t == "no" else "yes"), pmid=str(i)) for i, t in enumerate(truth)]
    right = [dict(_row(t, t), pmid=str(i)) for i, t in enumerate(truth)]
    write_jsonl(tmp_path / "a.jsonl", always_yes)
    write_jsonl(tmp_path / "b.jsonl", right)
    monkeypatch.setattr("sys.argv", ["pool", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--bootstrap", "50"])
    pool_predictions.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| m")]
    assert [line.split(" | ")[2].split()[0] for line in lines] == ["0.800", "+0.200", "0.950", "+0.350"]
    # Under each run's out-of-fold rule: "maybe" +1 turns the hesitant run's every answer to "maybe" (1 right of
    # 10) and leaves the confident one's right answers alone.
    for row in always_yes:
        row["choice_probs"] = {"yes": 0.5, "no": 0.3, "maybe": 0.2}
    for row in right:
        row["choice_probs"] = {d: 0.8 if d == row["reference_decision"] else 0.1 for d in ("yes", "no", "maybe")}
    write_jsonl(tmp_path / "a.jsonl", always_yes)
    write_jsonl(tmp_path / "b.jsonl", right)
    (tmp_path / "cv.json").write_text(json.dumps({"rule": {"offsets": {"yes": 0.0, "no": 0.0, "maybe": 1.0}}}))
    monkeypatch.setattr("sys.argv", ["pool", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--protocols",
                                     "choice", "--rules", str(tmp_path / "cv.json"), str(tmp_path / "cv.json"),
                                     "--bootstrap", "50"])
    pool_predictions.main()
    out = capsys.readouterr().out
    assert "mean accuracy (choice + rule)" in out
    lines = [line for line in out.splitlines() if line.startswith("| m")]
    assert [line.split(" | ")[2].split()[0] for line in lines] == ["0.800", "+0.200", "0.550", "-0.050"]
    monkeypatch.setattr("sys.argv", ["pool", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                                     "--rules", str(tmp_path / "cv.json")])
    with pytest.raises(SystemExit, match="one metrics/cv.json per run"):
        pool_predictions.main()
    write_jsonl(tmp_path / "b.jsonl", right[::-1])
    monkeypatch.setattr("sys.argv", ["pool", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    with pytest.raises(SystemExit, match="same questions"):
        pool_predictions.main()
    no_decision = dict(_row("yes", "none"), pmid="0")
    assert list(decision_table([no_decision])["choice"]) == [CODES["none"]]


def test_offsets_fitted_on_other_questions_undo_a_lean_to_one_answer():
    """The offsets protocol's fit (`answers.fit_offsets`), cross-validated as research.decision_offsets
    does: a model whose options rank the questions right but lean to "yes" by a constant says "yes" to
    all; offsets fitted on the other folds undo the lean on held-out ones."""
    from research.decision_offsets import cross_validated

    rng = np.random.default_rng(0)
    truth = rng.choice(3, size=120, p=[0.55, 0.35, 0.10])
    signal = np.eye(3)[truth] * 1.5 + rng.normal(0, 0.5, size=(120, 3))
    leaning = signal + np.array([3.0, 0.0, 0.0])
    assert np.all(leaning.argmax(axis=1) == CODES["yes"])
    assert fit_offsets(leaning, truth)[1] > 2  # "no" raised by about the lean
    held_out = cross_validated(leaning, truth, folds=5, repeats=2)
    assert held_out["accuracy"] > np.mean(truth == CODES["yes"]) + 0.2 and held_out["macro_f1"] > 0.5
    # no signal: the offsets cannot beat the majority answer on held-out questions
    noise = rng.normal(0, 1, size=(120, 3))
    assert cross_validated(noise, truth, folds=5, repeats=2)["accuracy"] < np.mean(truth == 0) + 0.05


def test_ranking_aucs_tell_a_maybe_signal_from_none():
    """research.decision_offsets' ranking AUCs: a model whose "maybe" option is likelier on the "maybe"
    questions ranks them first (AUC 1); one that scores them as it scores yes or no questions sits
    near 0.5; yes against no is read on the yes and no questions alone, and a lean (a constant added
    to one option) leaves it unchanged."""
    from research.decision_offsets import yes_no_and_maybe_aucs

    rng = np.random.default_rng(1)
    truth = rng.choice(3, size=300, p=[0.55, 0.35, 0.10])
    informed = np.eye(3)[truth] * 3.0 + rng.normal(0, 0.3, size=(300, 3))
    assert yes_no_and_maybe_aucs(informed, truth) == (1.0, 1.0)
    # "maybe" questions that look like yes or no ones: nothing tells them apart
    looks_like = np.where(truth == CODES["maybe"], rng.choice([CODES["yes"], CODES["no"]], size=300), truth)
    blind = np.eye(3)[looks_like] * 3.0 + rng.normal(0, 0.3, size=(300, 3))
    yes_vs_no, maybe_vs_rest = yes_no_and_maybe_aucs(blind, truth)
    assert yes_vs_no > 0.99 and abs(maybe_vs_rest - 0.5) < 0.15
    leaning = informed + np.array([5.0, 0.0, 0.0])
    assert yes_no_and_maybe_aucs(leaning, truth)[0] == yes_no_and_maybe_aucs(informed, truth)[0]


def test_rules_compared_out_of_fold_and_on_test():
    """research.cv_rules: the plain choice and each objective's offsets, out of fold (nested) and on test;
    the macro-F1 offsets say "maybe" where the scores lean away from it."""
    from research.cv_rules import compare_rules
    from tests.test_cross_validation import _leaning_scores

    loglik, truth = _leaning_scores(150)
    rows = [{"pmid": str(i), "final_decision": ("yes", "no", "maybe")[t], "loglik": list(s)}
            for i, (s, t) in enumerate(zip(loglik, truth))]
    probs = np.exp(loglik) / np.exp(loglik).sum(axis=1, keepdims=True)
    test_rows = [{"reference_decision": r["final_decision"], "choice_probs": dict(zip(("yes", "no", "maybe"), p))}
                 for r, p in zip(rows, probs)]
    tables = compare_rules(rows, {str(i): i % 3 for i in range(150)}, test_rows)
    assert [r["rule"] for r in tables["out_of_fold"]] == ["choice", "offsets for accuracy", "offsets for macro_f1"]
    plain, _, for_macro_f1 = tables["out_of_fold"]
    assert for_macro_f1["f1_maybe"] > plain["f1_maybe"] and for_macro_f1["macro_f1"] > plain["macro_f1"]
    assert tables["test"][0]["accuracy"] == pytest.approx(float(np.mean(probs.argmax(axis=1) == truth)))
    from research.cv_rules import one_against_rest_aucs

    aucs = one_against_rest_aucs(rows)
    assert aucs["yes"] > 0.7 and aucs["maybe"] > 0.55  # every decision's evidence ranks its questions
    noise = [dict(r, loglik=list(np.random.default_rng(i).normal(size=3))) for i, r in enumerate(rows)]
    assert abs(one_against_rest_aucs(noise)["maybe"] - 0.5) < 0.15


def test_levers_compared_out_of_fold_on_the_same_questions(tmp_path, capsys, monkeypatch):
    """research.cv_levers: each run's out-of-fold row from its data/cv layout, a run against itself differs
    by 0, a run that knows every answer scores 1 with AUC 1; runs with other folds are refused."""
    import sys

    from research import cv_levers
    from tests.test_cross_validation import _leaning_scores

    loglik, truth = _leaning_scores(90)
    names = ("yes", "no", "maybe")
    for run, scores in (("lean", loglik), ("oracle", np.eye(3)[truth] * 4.0)):
        folds = {str(i): i % 3 for i in range(90)}
        (tmp_path / run).mkdir()
        (tmp_path / run / "folds.json").write_text(json.dumps(folds))
        for fold in range(3):
            (tmp_path / run / f"fold-{fold}").mkdir()
            rows = [{"pmid": str(i), "final_decision": names[truth[i]], "loglik": list(map(float, scores[i]))}
                    for i in range(90) if folds[str(i)] == fold]
            (tmp_path / run / f"fold-{fold}" / "held_out_scores.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(sys, "argv", ["cv_levers", f"lean={tmp_path / 'lean'}", f"again={tmp_path / 'lean'}",
                                      f"oracle={tmp_path / 'oracle'}", f"twice={tmp_path / 'lean'},{tmp_path / 'lean'}",
                                      f"mixed={tmp_path / 'lean'},{tmp_path / 'oracle'}", "--bootstrap", "50"])
    cv_levers.main()
    lines = capsys.readouterr().out.splitlines()
    lean, again, oracle, twice, mixed = (line.split(" | ") for line in lines[2:7])
    assert lean[1:7] == again[1:7] and again[-1] == "+0.000 [+0.000, +0.000] / +0.000 [+0.000, +0.000] |"
    assert oracle[1].startswith("1.000") and oracle[5] == "1.000 · 1.000 · 1.000"
    assert twice[1:7] == lean[1:7]  # a run's ensemble with itself is the run
    assert float(lean[1].split()[0]) < float(mixed[1].split()[0])  # the two runs' probabilities averaged
    (tmp_path / "lean" / "folds.json").write_text(json.dumps({str(i): (i + 1) % 3 for i in range(90)}))
    with pytest.raises(SystemExit, match="an ensemble's runs must have the same questions in the same folds"):
        cv_levers.main()
    monkeypatch.setattr(sys, "argv", ["cv_levers", f"oracle={tmp_path / 'oracle'}", f"lean={tmp_path / 'lean'}"])
    with pytest.raises(SystemExit, match="lean: not the reference's questions and folds"):
        cv_levers.main()


# The synthetic questions' prompt: short, the decision after the long answer (as the `workdir` fixture's).
SHORT_PROMPT = PromptParams("Answer from the context.", None, "The answer is:", False)


def _formatted(tokenizer, n: int, decision: str | None = None, context_copies: tuple[int, ...] = (1,)) -> list[dict]:
    """`n` synthetic questions formatted with a short prompt (decision after the long answer), all with
    `decision` when given; question i's contexts repeated `context_copies[i % len(context_copies)]` times
    (longer prompts, or prompts of several lengths)."""
    from medqa.prompting.prompts import PromptFormat, format_record
    from tests.conftest import make_original

    return [format_record({"pmid": k, "question": v["QUESTION"],
                           "contexts": v["CONTEXTS"] * context_copies[i % len(context_copies)],
                           "long_answer": v["LONG_ANSWER"], "final_decision": decision or v["final_decision"]},
                          PromptFormat(tokenizer), SHORT_PROMPT)
            for i, (k, v) in enumerate(make_original(n).items())]


def test_the_heads_hidden_state_is_what_choice_scoring_reads(tokenizer, tiny_model):
    """research.decision_head: the LM head on the state it takes gives the options' log-likelihoods that
    choice scoring gives, so the head reads the same position as the choice, with the prompt cut alike."""
    import torch

    from medqa.decisions.answer_format import AnswerFormat
    from medqa.inference.decision_scorer import DecisionScorer
    from research.decision_head import decision_states

    answer_format = AnswerFormat.of(SHORT_PROMPT)
    examples = _formatted(tokenizer, 3, context_copies=(8,))
    states = decision_states(tiny_model, tokenizer, examples, answer_format, budget=64, desc=None)
    assert states.shape == (3, tiny_model.config.hidden_size)
    assert decision_states(tiny_model, tokenizer, [], answer_format, budget=64, desc=None).shape == (0, states.shape[1])
    options = [o[0] for o in answer_format.options(tokenizer)]
    with torch.no_grad():
        from_states = torch.log_softmax(tiny_model.lm_head(torch.tensor(states)), dim=-1)[:, options].numpy()
    scorer = DecisionScorer(tiny_model, tokenizer, answer_format, max_prompt_length=64, batch_size=2)
    assert np.allclose(from_states, scorer.after_examples(examples, desc=None), atol=1e-4)


def test_a_head_is_fitted_on_each_folds_training_questions_and_read_on_its_own():
    """research.decision_head: held-out rows per fold from a head that never saw them; states that carry the
    decision give it back out of fold (maybe included), states of noise give no better than chance."""
    from research.decision_head import held_out_head_scores

    rng = np.random.default_rng(0)
    names = ("yes", "no", "maybe")
    truth = rng.choice(3, size=150, p=[0.55, 0.34, 0.11])
    examples = [{"pmid": str(i), "final_decision": names[t]} for i, t in enumerate(truth)]
    folds = {ex["pmid"]: i % 3 for i, ex in enumerate(examples)}

    def parts(fold: int) -> tuple[list[dict], list[dict]]:
        return ([ex for ex in examples if folds[ex["pmid"]] != fold],
                [ex for ex in examples if folds[ex["pmid"]] == fold])

    for signal, lowest, highest in ((3.0, 0.9, 1.0), (0.0, 0.0, 0.75)):
        states_of = np.eye(3)[truth] * signal + rng.normal(size=(150, 3))
        seen: list[tuple[int, set]] = []

        def states(fold: int, rows: list[dict], seen: list = seen, states_of: np.ndarray = states_of) -> np.ndarray:
            seen.append((fold, {r["pmid"] for r in rows}))
            return states_of[[int(r["pmid"]) for r in rows]]

        scores = held_out_head_scores(folds, parts, states, seed=0)
        for fold in range(3):
            fitted_on, read_on = (ids for f, ids in seen if f == fold)
            assert read_on == {r["pmid"] for r in scores[fold]} == {p for p, f in folds.items() if f == fold}
            assert not fitted_on & read_on
        rows = [r for fold in scores.values() for r in fold]
        chosen = np.array([np.argmax(r["loglik"]) for r in rows])
        right = chosen == np.array([names.index(r["final_decision"]) for r in rows])
        assert lowest <= right.mean() <= highest
        assert all(np.isclose(np.exp(r["loglik"]).sum(), 1.0, atol=1e-4) for r in rows)
    assert (chosen == 2).sum() < 5  # noise: the head leans to the common decisions, never a confident "maybe"


def test_the_adapter_heads_classifier_starts_as_choice_scoring(tokenizer, tiny_model):
    """research.adapter_head: the classifier shares the causal model's decoder, reads the last prompt token
    of each right-padded row, and with the LM head's option rows as its head gives choice scoring's option
    probabilities; a random head does not."""
    from medqa.decisions.answer_format import AnswerFormat
    from medqa.decisions.protocols import choice_probabilities, reference_codes
    from medqa.inference.decision_scorer import DecisionScorer
    from medqa.training.examples import option_first_tokens
    from research.adapter_head import classifier, decision_dataset, head_log_probabilities

    answer_format = AnswerFormat.of(SHORT_PROMPT)
    examples = _formatted(tokenizer, 5, context_copies=(1, 2, 3))
    dataset = decision_dataset(examples, tokenizer, answer_format, budget=96)
    assert len({len(r) for r in dataset["input_ids"]}) > 1  # rows of several lengths: padding is exercised
    assert dataset["labels"] == list(reference_codes(examples))
    expected = choice_probabilities(DecisionScorer(tiny_model, tokenizer, answer_format, max_prompt_length=96,
                                                   batch_size=2).after_examples(examples, desc=None))
    model = classifier(tiny_model, tokenizer, list(option_first_tokens(answer_format, tokenizer)))
    assert model.model is tiny_model.model
    assert np.allclose(np.exp(head_log_probabilities(model, tokenizer, dataset, batch_size=3, desc=None)), expected, atol=1e-4)
    random_head = classifier(tiny_model, tokenizer, None)
    assert not np.allclose(np.exp(head_log_probabilities(random_head, tokenizer, dataset, batch_size=3, desc=None)), expected,
                           atol=1e-2)


def test_the_adapter_head_learns_its_folds_labels_and_scores_the_held_out(workdir, tmp_path):
    """research.adapter_head: a fold's classifier trained on questions all labelled "no" answers "no" on the
    held-out questions (labels reach the loss, and the trained head scores), one row per held-out question."""
    from medqa.io import read_jsonl, write_jsonl
    from medqa.params import params_from_dict
    from research.adapter_head import fold_head_scores
    from tests.conftest import train_params

    examples = read_jsonl(workdir / "train.jsonl") + read_jsonl(workdir / "val.jsonl")
    fold_dir = tmp_path / "fold-0"
    write_jsonl(fold_dir / "train.jsonl", [dict(ex, final_decision="no") for ex in examples[:16]])
    write_jsonl(fold_dir / "val.jsonl", [dict(ex, final_decision="no") for ex in examples[16:20]])
    write_jsonl(fold_dir / "held_out.jsonl", examples[20:])
    params = params_from_dict(train_params(max_steps=6, learning_rate=0.01, warmup_ratio=0.0))
    rows = fold_head_scores(params, workdir / "base", fold_dir, tmp_path / "checkpoints", "random")
    assert [r["pmid"] for r in rows] == [ex["pmid"] for ex in examples[20:]]
    assert [r["final_decision"] for r in rows] == [ex["final_decision"] for ex in examples[20:]]
    assert all(np.isclose(np.exp(r["loglik"]).sum(), 1.0, atol=1e-4) for r in rows)
    assert all(np.argmax(r["loglik"]) == 1 for r in rows)


def test_the_joint_head_starts_as_choice_scoring_and_learns_its_folds_labels(workdir, tokenizer, tmp_path):
    """research.joint_head: before training, the head on the final hidden state gives the LM's own option
    probabilities (the state is the normed one the LM head reads); trained with the answer loss on questions
    all answered "no", both the head and the plain choice say "no" on the held-out questions."""
    from medqa.decisions.answer_format import AnswerFormat
    from medqa.decisions.protocols import choice_probabilities
    from medqa.io import write_jsonl
    from medqa.modeling.hardware import resolve_hardware
    from medqa.params import params_from_dict
    from medqa.training.examples import option_first_tokens
    from research.decision_head import decision_prompts
    from research.joint_head import fold_joint_scores, joint_log_probabilities, setup_joint_model
    from tests.conftest import train_params

    params = params_from_dict(train_params(max_steps=6, learning_rate=0.01, warmup_ratio=0.0))
    answer_format = AnswerFormat.of(params.prompt)
    options = option_first_tokens(answer_format, tokenizer)
    held_out = _formatted(tokenizer, 24)[20:]
    prompts = decision_prompts(held_out, tokenizer, answer_format, budget=200)
    hardware = resolve_hardware(params.model.quantization, params.model.dtype)
    head, choice = joint_log_probabilities(setup_joint_model(workdir / "base", params, hardware, options), prompts,
                                           options)
    assert head.shape == choice.shape == (4, 3)
    assert np.allclose(np.exp(head), choice_probabilities(choice), atol=1e-4)

    said_no = _formatted(tokenizer, 20, decision="no")
    fold_dir = tmp_path / "fold-0"
    write_jsonl(fold_dir / "train.jsonl", said_no[:16])
    write_jsonl(fold_dir / "val.jsonl", said_no[16:])
    write_jsonl(fold_dir / "held_out.jsonl", held_out)
    head_rows, choice_rows = fold_joint_scores(params, workdir / "base", fold_dir, tmp_path / "checkpoints", 1.0)
    for rows in (head_rows, choice_rows):
        assert [r["pmid"] for r in rows] == [ex["pmid"] for ex in held_out]
        assert all(np.argmax(r["loglik"]) == 1 for r in rows)
    assert all(np.isclose(np.exp(r["loglik"]).sum(), 1.0, atol=1e-4) for r in head_rows)
    # The head learnt on its own loss: no longer the LM's option probabilities.
    trained_head, trained_choice = (np.array([r["loglik"] for r in rows]) for rows in (head_rows, choice_rows))
    assert not np.allclose(np.exp(trained_head), choice_probabilities(trained_choice), atol=1e-2)
