"""The yes/no/maybe decision: how an answer states it (`answer_format.AnswerFormat`: the decision sentence
written into the targets and read back out of generations), and the decision protocols that read it from
the options' log-likelihoods or the generated text (a registry: choice, after_answer, calibrated,
offsets, generated), with what each fits once per model."""
