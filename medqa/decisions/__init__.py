"""The yes/no/maybe decision: the answer protocols (a registry: choice, generated, after_answer, calibrated,
offsets), reading a decision from options' log-likelihoods or generated text, and fitting the offsets and
calibration."""
