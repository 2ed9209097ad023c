"""k-fold cross-validation over the non-test questions: which fold each question is in, and what a
fold trains on, takes its validation loss on and scores (its held-out questions)."""
from __future__ import annotations

from medqa.data.splits import Record, _labels, training_sample, validation_loss_examples
from medqa.errors import PipelineError
from medqa.params import CvParams, TrainParams


def assign_folds(pool: list[Record], cv: CvParams) -> dict[str, int]:
    """Each question's fold (pmid -> fold id), stratified by decision and seeded with `cv.seed`, in
    `len(cv.folds)` folds of as equal a size as the questions allow. The same questions and params
    give the same folds, whatever their order in `pool`."""
    from sklearn.model_selection import StratifiedKFold

    k = len(cv.folds)
    rows = sorted(pool, key=lambda r: r["pmid"])
    labels = _labels(rows)
    if min(labels.count(label) for label in set(labels)) < k:
        raise PipelineError(f"cv.folds asks for {k} folds, but a decision has fewer questions than that among the "
                            f"{len(rows)} non-test questions: use fewer folds")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=cv.seed)
    folds: dict[str, int] = {}
    for fold, (_, held_out) in enumerate(splitter.split(rows, labels)):
        folds.update({rows[i]["pmid"]: fold for i in held_out})
    return folds


def fold_parts(pool: list[Record], folds: dict[str, int], fold: int, train: TrainParams,
               seed: int) -> dict[str, list[Record]]:
    """Fold `fold`'s questions: `held_out` (its own, scored out of fold), and from the other folds a
    seeded `train.max_val_samples` for the validation loss (`val`) and the rest to train on, capped and
    drawn as `train.max_samples` and `train.sampling` say (`train`), as the split stage draws the
    pipeline's own training questions."""
    held_out = [r for r in pool if folds[r["pmid"]] == fold]
    others = [r for r in pool if folds[r["pmid"]] != fold]
    val = validation_loss_examples(others, train, seed)
    chosen = {r["pmid"] for r in val}
    rest = [r for r in others if r["pmid"] not in chosen]
    # The other folds may hold fewer questions than the cap: then all of them.
    wanted = None if train.max_samples is None else min(train.max_samples, len(rest))
    return {"train": training_sample(rest, wanted, train.sampling, seed), "val": val, "held_out": held_out}
