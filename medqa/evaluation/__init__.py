"""Evaluation: running the eval stages (answers, decisions, metrics, resumable progress), the text and decision
metrics with bootstrap intervals, the lm-eval task rows, and the LLM judge (its rubric: medqa/rubric.py)."""
