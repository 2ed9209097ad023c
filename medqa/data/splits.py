"""Train/validation/test splits (PubMedQA's official test PMIDs or a seeded stratified split) and the
seeded size caps of CPU runs."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterable

from medqa.data.sources import Record
from medqa.decisions.answer_format import DECISIONS
from medqa.errors import PipelineError

if TYPE_CHECKING:
    from medqa.params import EvalParams, SplitParams, TrainParams


def _labels(rows: list[Record]) -> list[str]:
    return [r["final_decision"] for r in rows]


def _stratify_ok(labels: list[str], n_small: int) -> bool:
    counts = Counter(labels)
    return min(counts.values()) >= 2 and n_small >= len(counts)


def split_off(rows: list[Record], size: float | int, seed: int) -> tuple[list[Record], list[Record]]:
    """Split `rows` into (rest, part) with `part` of `size` (fraction or count), stratified by decision."""
    from sklearn.model_selection import train_test_split

    n_part = size if isinstance(size, int) else round(len(rows) * size)
    if n_part <= 0:
        return list(rows), []
    if n_part >= len(rows):
        return [], list(rows)
    labels = _labels(rows)
    stratify = labels if _stratify_ok(labels, min(n_part, len(rows) - n_part)) else None
    rest, part = train_test_split(rows, test_size=n_part, random_state=seed, stratify=stratify)
    return rest, part


def _require_at_most(rows: list[Record], max_samples: int, name: str) -> None:
    """Asking for more rows than the split has is an error, not a silent shortfall."""
    if max_samples > len(rows):
        raise PipelineError(
            f"{name} asks for {max_samples} questions but the split has only {len(rows)}: lower it or set it to null"
        )


def cap(rows: list[Record], max_samples: int | None, seed: int, name: str = "split") -> list[Record]:
    """A seeded, stratified subset of `max_samples` rows (never simply the first N).

    Asking for more rows than the split has is an error, not a silent shortfall.
    """
    if not max_samples or max_samples == len(rows):
        return rows
    _require_at_most(rows, max_samples, name)
    _, subset = split_off(rows, int(max_samples), seed)
    return subset


def balanced_cap(rows: list[Record], max_samples: int | None, seed: int, name: str = "split") -> list[Record]:
    """A seeded subset of `max_samples` rows with as equal a number of each decision as `rows` has:
    a decision with fewer rows than its share gives all it has, the others share the rest. The rows
    keep their order in `rows`."""
    import random

    if not max_samples:
        raise PipelineError(f"balanced sampling needs a number of questions: set {name} (it is null)")
    _require_at_most(rows, max_samples, name)
    by_decision: dict[str, list[int]] = {}
    for i, label in enumerate(_labels(rows)):
        by_decision.setdefault(label, []).append(i)
    quota, left = {}, max_samples
    # Water-filling, smallest decision first: each takes its fair share of what is left, or all it has.
    for k, (label, idx) in enumerate(sorted(by_decision.items(), key=lambda item: (len(item[1]), item[0]))):
        quota[label] = min(len(idx), left // (len(by_decision) - k))
        left -= quota[label]
    rng = random.Random(seed)
    chosen = {i for label in sorted(by_decision) for i in rng.sample(by_decision[label], quota[label])}
    return [r for i, r in enumerate(rows) if i in chosen]


def training_sample(rows: list[Record], max_samples: int | None, sampling: str, seed: int) -> list[Record]:
    """`max_samples` of `rows` (all where null), drawn as `train.sampling` says: `balanced_cap` or `cap`."""
    pick = balanced_cap if sampling == "balanced" else cap
    return pick(rows, max_samples, seed, "train.max_samples")


def validation_loss_examples(val: list[Record], train: TrainParams, seed: int) -> list[Record]:
    """The validation questions the finetune stage takes its validation loss on: a seeded, stratified
    `train.max_val_samples` of them (its passes cost as much as training steps), all of them when null."""
    return cap(val, train.max_val_samples, seed, "train.max_val_samples")


def long_answer_sample(test: list[Record], evaluation: EvalParams) -> list[int]:
    """The indices (in `test`'s order) of the test questions whose long answers the eval stages generate:
    a seeded, stratified `eval.long_answer_samples` of them, or all of them when that is null or at least
    their number. Both eval stages draw the same sample; every test question's decisions are scored."""
    wanted = evaluation.long_answer_samples
    if wanted is None or wanted >= len(test):
        return list(range(len(test)))
    chosen = {r["pmid"] for r in cap(test, wanted, evaluation.seed, "eval.long_answer_samples")}
    return [i for i, r in enumerate(test) if r["pmid"] in chosen]


def split_records(rows: list[Record], split: SplitParams,
                  test_labels: dict[str, str] | None) -> dict[str, list[Record]]:
    """Split into train/val/test by the official test PMIDs (`test_labels`) or a seeded stratified random
    split, as the `split` params say."""
    if split.strategy == "official":
        if not test_labels:
            raise PipelineError(
                "split.strategy 'official' needs PubMedQA's test_ground_truth.json, which the download "
                "stage could not get: point data.source at the official data/ directory, set "
                "data.test_ids to a local copy, or use split.strategy=random"
            )
        by_id = {r["pmid"]: r for r in rows}
        missing = [p for p in test_labels if p not in by_id]
        if missing:
            raise PipelineError(
                f"{len(missing)} official test PMIDs are not in the data (e.g. {missing[0]}): "
                "is data.source the pqa_labeled set?"
            )
        test = [r for r in rows if r["pmid"] in test_labels]
        train_val = [r for r in rows if r["pmid"] not in test_labels]
    else:  # "random", the one other strategy SplitParams allows
        train_val, test = split_off(rows, split.test_size, split.seed)
    train, val = split_off(train_val, split.val_size, split.seed)
    splits = {"train": train, "val": val, "test": test}
    for name, part in splits.items():
        if not part:
            raise PipelineError(f"the {name} split is empty: check split.test_size / split.val_size")
    assert_disjoint(splits)
    return splits


def make_splits(rows: list[Record], test_labels: dict[str, str] | None, split: SplitParams, train: TrainParams,
                evaluation: EvalParams) -> dict[str, list[Record]]:
    """The split stage's train/val/test: `split_records`, then the size caps for CPU runs (train.max_samples,
    drawn as train.sampling says, and eval.max_samples). The validation split stays whole: the eval
    stages fit their decision offsets on all of it (finetune caps its validation loss)."""
    splits = split_records(rows, split, test_labels)
    splits["train"] = training_sample(splits["train"], train.max_samples, train.sampling, split.seed)
    splits["test"] = cap(splits["test"], evaluation.max_samples, split.seed, "eval.max_samples")
    assert_disjoint(splits)
    return splits


def assert_disjoint(splits: dict[str, Iterable[Record]]) -> None:
    """Fail if any pmid appears in two splits."""
    owner: dict[str, str] = {}
    for name, part in splits.items():
        for r in part:
            if r["pmid"] in owner:
                raise PipelineError(f"pmid {r['pmid']} is in both the {owner[r['pmid']]} and {name} splits")
            owner[r["pmid"]] = name


def split_stats(splits: dict[str, list[Record]]) -> dict[str, dict[str, int]]:
    """Per-split counts and decision distribution, for metrics/split.json."""
    return {
        name: {"n": len(rows), **{d: _labels(rows).count(d) for d in DECISIONS}}
        for name, rows in splits.items()
    }
