"""Stage split: train/val/test by PubMedQA's official test PMIDs or a seeded stratified split."""
from medqa import paths
from medqa.data import assert_disjoint, balanced_cap, cap, split_records, split_stats
from medqa.errors import stage_main
from medqa.io import read_json, read_jsonl, write_json, write_jsonl
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    split = params.split
    splits = split_records(
        read_jsonl(paths.FORMATTED), split.strategy, read_json(paths.TEST_LABELS),
        split.test_size, split.val_size, split.seed,
    )
    # Size caps for CPU runs: split -> the param that caps it. The validation split stays whole: the
    # eval stages fit their decision offsets on all of it (finetune caps its validation loss).
    caps = {"train": ("train.max_samples", params.train.max_samples),
            "test": ("eval.max_samples", params.eval.max_samples)}
    for name, (key, limit) in caps.items():
        pick = balanced_cap if name == "train" and params.train.sampling == "balanced" else cap
        splits[name] = pick(splits[name], limit, split.seed, key)
    assert_disjoint(splits)
    for name, path in (("train", paths.TRAIN), ("val", paths.VAL), ("test", paths.TEST)):
        write_jsonl(path, splits[name])
    stats = split_stats(splits)
    write_json(paths.SPLIT_METRICS, stats)
    print("split: " + ", ".join(f"{k} {v['n']}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
