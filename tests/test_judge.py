"""The judge: expected ratings, the two-order head to head, the shared-prefix scoring, the summary and report."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medqa.evaluation import judge as judging
from medqa.evaluation.judge import head_to_head, judge_all, judge_subset, summarize_judgements
from medqa.rubric import CRITERIA as CRITERIA_ALL
from medqa.rubric import Case

CRITERIA = ["helpfulness", "correctness"]


def _cases(n: int) -> list[Case]:
    return [Case(str(100 + i), f"Does treatment {i} work?", f"A trial of treatment {i}.", "It did.", "yes")
            for i in range(n)]


class AlwaysFirst:
    """A judge with total position bias: answer A is always better; every rating is a 3."""

    def rate(self, case, answer, criterion):
        return [-9.0, -9.0, 0.0, -9.0]

    def compare(self, case, first, second):
        return [0.0, -5.0]


class PreferLonger:
    """A judge that prefers the longer answer wherever it stands, and rates longer answers higher."""

    def rate(self, case, answer, criterion):
        return [-9.0, -9.0, -9.0, 0.0] if len(answer) > 20 else [-9.0, 0.0, -9.0, -9.0]

    def compare(self, case, first, second):
        return [0.0, -5.0] if len(first) > len(second) else [-5.0, 0.0]


def test_expected_rating_weights_the_rating_tokens_probabilities():
    # Probabilities 0.1, 0.2, 0.3, 0.4 (log-likelihoods shifted by a constant: only their ratios count).
    score, probs = judging.expected_rating(np.log([0.1, 0.2, 0.3, 0.4]) - 3.0)
    assert score == pytest.approx(1 * 0.1 + 2 * 0.2 + 3 * 0.3 + 4 * 0.4)
    assert probs == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert judging.expected_rating([0.0, 0.0, 0.0, 0.0])[0] == pytest.approx(2.5)
    assert judging.expected_rating([-50.0, -50.0, -50.0, 0.0])[0] == pytest.approx(4.0)
    assert judging.prefer_first([math.log(0.8), math.log(0.2)]) == pytest.approx(0.8)


def test_head_to_head_needs_both_orders_to_agree():
    assert head_to_head(0.2, 0.9) == ("win", True)  # fine-tuned picked as second, then as first
    assert head_to_head(0.9, 0.1) == ("loss", True)
    assert head_to_head(0.9, 0.9) == ("tie", False)  # the first-shown answer both times
    assert head_to_head(0.5, 0.9) == ("tie", False)  # no preference in one order


def test_a_judge_that_always_prefers_position_a_gives_all_ties_and_no_consistency():
    cases = _cases(6)
    rows = judge_all(AlwaysFirst(), cases, ["short"] * 6, ["a much longer answer than that"] * 6, CRITERIA, desc=None)
    result = summarize_judgements(rows, CRITERIA, n_resamples=50, seed=0)
    pairs = result["head_to_head"]
    assert [r["head_to_head"]["outcome"] for r in rows] == ["tie"] * 6
    assert pairs["tie"]["mean"] == 1.0 and pairs["win"]["mean"] == 0.0 and pairs["loss"]["mean"] == 0.0
    assert pairs["position_consistency"]["mean"] == 0.0
    assert pairs["first_shown_picked"] == 1.0
    assert result["criteria"]["helpfulness"]["baseline"]["mean"] == pytest.approx(3.0, abs=1e-3)


@pytest.mark.parametrize("longer", ["finetuned", "baseline"])
def test_a_judge_that_prefers_the_longer_answer_makes_it_win_in_both_orders(longer):
    short, long = "short", "a much longer answer than that"
    base, tuned = ([short] * 5, [long] * 5) if longer == "finetuned" else ([long] * 5, [short] * 5)
    rows = judge_all(PreferLonger(), _cases(5), base, tuned, CRITERIA, desc=None)
    result = summarize_judgements(rows, CRITERIA, n_resamples=50, seed=0)
    pairs = result["head_to_head"]
    assert pairs["win" if longer == "finetuned" else "loss"]["mean"] == 1.0
    assert pairs["position_consistency"]["mean"] == 1.0
    assert pairs["first_shown_picked"] == 0.5
    change = result["criteria"]["helpfulness"]["change"]
    assert change["mean"] == pytest.approx(2.0 if longer == "finetuned" else -2.0, abs=1e-3)
    assert change["ci_low"] <= change["mean"] <= change["ci_high"]


def test_judge_rows_hold_both_ratings_per_criterion_and_both_orders():
    row = judge_all(PreferLonger(), _cases(1), ["short"], ["a much longer answer than that"], CRITERIA, desc=None)[0]
    assert set(row["ratings"]) == {"baseline", "finetuned"}
    for model in row["ratings"].values():
        assert set(model) == set(CRITERIA)
        assert sum(model["helpfulness"]["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert row["head_to_head"]["baseline_first"]["p_first"] < 0.5 < row["head_to_head"]["finetuned_first"]["p_first"]


def test_judge_subset_is_seeded_sorted_and_capped():
    chosen = judge_subset(48, 12, seed=42)
    assert len(chosen) == 12 and chosen == sorted(chosen) and len(set(chosen)) == 12
    assert chosen == judge_subset(48, 12, seed=42) and chosen != judge_subset(48, 12, seed=7)
    assert judge_subset(5, None, 0) == judge_subset(5, 9, 0) == [0, 1, 2, 3, 4]


def test_shared_prefix_scorer_equals_scoring_each_prompt_from_scratch(tiny_model):
    from medqa.inference.scoring import SharedPrefixScorer, score_choices

    rng = np.random.default_rng(0)
    case = rng.integers(5, 1000, 40).tolist()
    answer = rng.integers(5, 1000, 12).tolist()
    prompts = [case + answer + [7, 8, 9], case + answer + [7, 8, 10, 11], case + [3] + answer, case + answer + [7, 8, 9],
               case[:10], [5]]
    # single tokens; a shared first token (" 1".." 4" as a space, then the digit); different lengths
    for options in ([[21], [22], [23]], [[216, 33], [216, 34], [216, 35]], [[40], [41, 42], [41, 43, 44]]):
        scorer = SharedPrefixScorer(tiny_model)
        got = [scorer.option_logliks(p, options) for p in prompts]
        want = score_choices(tiny_model, prompts, options, pad_id=0, batch_size=1, desc=None)
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert scorer.tokens_read < scorer.tokens_asked  # the shared prefixes were read once


def test_model_judge_reads_ratings_and_preferences_off_a_real_tokenizer(tiny_model, tokenizer):
    from medqa.prompting.prompts import PromptFormat

    judge = judging.ModelJudge(tiny_model, tokenizer, PromptFormat(tokenizer))
    case = Case("1", "Does treatment 1 work?", " ".join(f"Finding {i}: the outcome improved." for i in range(40)),
                "It did.", "yes")
    rows = judge_all(judge, [case], ["It works."], ["Yes: the trial found it works."], CRITERIA_ALL, desc=None)
    ratings = rows[0]["ratings"]["finetuned"]
    assert set(ratings) == set(CRITERIA_ALL)
    assert all(1.0 <= r["score"] <= 4.0 and 0.0 < r["mass"] <= 1.0 for r in ratings.values())
    # One question: 8 ratings and 2 comparisons; the case (system, question, context, reference) is read once.
    assert judge.scorer.tokens_read < judge.scorer.tokens_asked / 3


def _result(judge_params: float, consistency: float) -> dict:
    estimate = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    return {
        "judge": "some-judge", "judge_params": judge_params, "n_questions": 2, "n_test_questions": 10,
        "criteria": {"helpfulness": {"baseline": estimate, "finetuned": estimate, "change": estimate}},
        "rating_mass": {"baseline": 0.9, "finetuned": 0.9},
        "head_to_head": {"win": estimate, "tie": estimate, "loss": estimate, "first_shown_picked": 0.5,
                         "position_consistency": {"mean": consistency, "ci_low": 0.0, "ci_high": 1.0}},
    }


def test_the_report_calls_a_small_or_position_bound_judge_unreliable():
    from medqa.report.render import STRONG_JUDGE_PARAMS, judge_section

    rows = judge_all(PreferLonger(), _cases(3), ["short"] * 3, ["a much longer answer than that"] * 3, ["helpfulness"],
                     desc=None)
    weak = judge_section(_result(135e6, 0.1), rows, "judge.png", 2, STRONG_JUDGE_PARAMS)
    assert "A weak judge" in weak and "135M parameters" in weak and "Position-bound" in weak
    assert weak.count("#### PMID") == 2 and "![head to head](judge.png)" in weak
    strong = judge_section(_result(7.2e9, 0.9), rows, "judge.png", 2, STRONG_JUDGE_PARAMS)
    assert "A weak judge" not in strong and "Position-bound" not in strong
    assert "| helpfulness | 0.50 [0.40, 0.60] |" in strong


def test_an_unknown_judge_criterion_is_one_clear_error():
    import yaml

    from medqa.errors import PipelineError
    from medqa.params import validate

    params = yaml.safe_load(open("params.yaml"))
    params["judge"]["criteria"] = ["helpfulness", "fluency"]
    with pytest.raises(PipelineError, match="judge.criteria .* expected a list of distinct criteria from helpfulness"):
        validate(params)


def test_a_judge_other_than_the_base_model_is_prepared_once_then_reused(tmp_path, tokenizer, monkeypatch):
    from medqa.evaluation.judge import judge_model_dir
    from medqa.modeling import loading
    from tests.conftest import save_tiny_base

    base, scratch, other = tmp_path / "base", tmp_path / "judge", tmp_path / "other-model"
    assert judge_model_dir("smollm2-135m-instruct", "smollm2-135m-instruct", base, scratch) == base
    save_tiny_base(other, tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    prepared = []
    real = loading.prepare_base_model
    monkeypatch.setattr(loading, "prepare_base_model", lambda *a: prepared.append(a) or real(*a))
    assert judge_model_dir(str(other), "smollm2-135m-instruct", base, scratch) == scratch
    assert loading.read_source(scratch)["path"] == str(other.resolve())  # referenced, not copied
    assert judge_model_dir(str(other), "smollm2-135m-instruct", base, scratch) == scratch
    assert len(prepared) == 1
