"""Stage cv_folds: the fold of each non-test question for cross-validation (none with cv.folds: [])."""
from medqa import paths
from medqa.crossval.folds import assign_folds
from medqa.errors import stage_main
from medqa.io import read_jsonl, write_json
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    pool = read_jsonl(paths.TRAIN) + read_jsonl(paths.VAL)
    folds = assign_folds(pool, params.cv) if params.cv.folds else {}
    write_json(paths.CV_FOLDS, folds)
    print(f"cv_folds: {len(params.cv.folds)} folds over {len(folds)} non-test questions" if folds
          else "cv_folds: cross-validation off (cv.folds: [])")


if __name__ == "__main__":
    main()
