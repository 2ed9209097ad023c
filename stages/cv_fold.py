"""Stage cv_fold@<id>: one fold of the cross-validation: an adapter trained as the train params say on
the other folds' questions, then its own (held-out) questions' decisions scored."""
import sys

from medqa import paths
from medqa.crossval.folds import fold_parts
from medqa.crossval.scoring import score_held_out
from medqa.errors import stage_main
from medqa.io import read_json, read_jsonl, write_jsonl
from medqa.params import load_params
from medqa.training.recipe import TrainFiles, train_adapter


@stage_main
def main() -> None:
    params = load_params()
    fold = int(sys.argv[1])
    out, models = paths.cv_fold_dir(fold), paths.cv_fold_models(fold)
    parts = fold_parts(read_jsonl(paths.TRAIN) + read_jsonl(paths.VAL), read_json(paths.CV_FOLDS), fold,
                       params.train, params.split.seed)
    for name, rows in parts.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    files = TrainFiles(paths.BASE_MODEL, out / "train.jsonl", out / "val.jsonl", models / "adapter",
                       models / "checkpoints", out / "live", out / "train.json")
    train_adapter(params, files)
    scores = score_held_out(paths.BASE_MODEL, files.adapter, parts["held_out"], model=params.model,
                            prompt=params.prompt, evaluation=params.eval)
    write_jsonl(out / "held_out_scores.jsonl", scores)
    print(f"cv_fold@{fold}: trained on {len(parts['train'])} questions, scored {len(scores)} held out -> {out}")


if __name__ == "__main__":
    main()
