"""Cross-validation over the non-test questions: the folds, and the out-of-fold estimate and decision rule."""
