"""The prompt: the model's prompt format (chat template, a profile's template or prompt.template), the prompt
and target of a record, and cutting the context to fit a token budget."""
