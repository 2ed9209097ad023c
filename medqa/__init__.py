"""Shared library behind the DVC stages: data, prompts, models, training, evaluation, reports."""
