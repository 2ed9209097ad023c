"""Published results on PubMedQA's 500 official test questions in the reasoning-required setting (the
question and its abstract, no long answer), which a run is placed among when it scored the same 500:
the report's and the model card's "where this run stands". Sources: docs/evaluation.md."""
from __future__ import annotations

from dataclasses import dataclass

OFFICIAL_TEST_QUESTIONS = 500


@dataclass(frozen=True)
class Published:
    """One published result: who, how big, how it was trained, accuracy and macro-F1 in percent (None
    where not published), and where it was published."""

    system: str
    params: str
    how: str
    accuracy: float
    macro_f1: float | None
    source: str


PUBLISHED: tuple[Published, ...] = (
    Published('always "yes" (the majority class)', "-", "276 yes / 169 no / 55 maybe", 55.2, 23.7,
              "PubMedQA paper (Jin et al., 2019)"),
    Published("PubMedBERT", "110M", "fine-tuned, classification head", 55.8, None, "BLURB (Gu et al., 2021)"),
    Published("BioELECTRA", "110M", "fine-tuned, classification head", 64.0, None,
              "BioELECTRA (Kanakarajan et al., 2021)"),
    Published("BioBERT, multi-phase", "110M", "211k auto-labelled questions, then the 450", 68.1, 52.7,
              "PubMedQA paper (Jin et al., 2019)"),
    Published("BioLinkBERT-base", "110M", "fine-tuned, classification head", 70.2, None,
              "LinkBERT (Yasunaga et al., 2022)"),
    Published("Mistral-7B-v0.1", "7B", "zero-shot, options by log-likelihood", 75.4, None,
              "the PubMedQA leaderboard"),
    Published("a single human annotator", "-", "-", 78.0, 72.2, "PubMedQA paper (Jin et al., 2019)"),
)


def comparable(split_strategy: str, n_questions: int) -> bool:
    """Whether a run scored the published results' questions: the official split, all 500 of them."""
    return split_strategy == "official" and n_questions == OFFICIAL_TEST_QUESTIONS
