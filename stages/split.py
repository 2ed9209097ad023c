"""Stage split: train/val/test by PubMedQA's official test PMIDs or a seeded stratified split."""
from medqa import paths
from medqa.data.splits import make_splits, split_stats
from medqa.errors import stage_main
from medqa.io import read_json, read_jsonl, write_json, write_jsonl
from medqa.modeling.loading import load_tokenizer
from medqa.params import load_params
from medqa.preflight import check_token_budgets


@stage_main
def main() -> None:
    params = load_params()
    splits = make_splits(read_jsonl(paths.FORMATTED), read_json(paths.TEST_LABELS), params.split, params.train,
                         params.eval)
    # The token budgets on the data as downloaded, before the first long stage (check_params could
    # check them only for a local source).
    check_token_budgets(splits, load_tokenizer(paths.BASE_MODEL), params)
    for name, path in (("train", paths.TRAIN), ("val", paths.VAL), ("test", paths.TEST)):
        write_jsonl(path, splits[name])
    stats = split_stats(splits)
    write_json(paths.SPLIT_METRICS, stats)
    print("split: " + ", ".join(f"{k} {v['n']}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
