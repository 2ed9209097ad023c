"""Inference: batched greedy/sampled generation with the prompt's KV cache reused, and scoring the decision
options, for the eval stages, the chat app and the judge."""
