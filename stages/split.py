"""Stage split: train/val/test by PubMedQA's official test PMIDs or a seeded stratified split."""
from medqa import paths
from medqa.data import assert_disjoint, cap, split_records, split_stats
from medqa.errors import stage_main
from medqa.io import read_json, read_jsonl, write_json, write_jsonl
from medqa.params import load_params


# Size caps for CPU runs: split -> the params key that caps it.
CAPS = {"train": ("train", "max_samples"), "val": ("train", "max_val_samples"), "test": ("eval", "max_samples")}


@stage_main
def main() -> None:
    params = load_params()
    sp = params["split"]
    splits = split_records(
        read_jsonl(paths.FORMATTED), sp["strategy"], read_json(paths.TEST_LABELS),
        sp["test_size"], sp["val_size"], sp["seed"],
    )
    for name, (section, key) in CAPS.items():
        splits[name] = cap(splits[name], params[section][key], sp["seed"], f"{section}.{key}")
    assert_disjoint(splits)
    for name, path in (("train", paths.TRAIN), ("val", paths.VAL), ("test", paths.TEST)):
        write_jsonl(path, splits[name])
    stats = split_stats(splits)
    write_json(paths.SPLIT_METRICS, stats)
    print("split: " + ", ".join(f"{k} {v['n']}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
