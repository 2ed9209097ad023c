"""Stage cv_rule: the decision rule fitted on the folds' out-of-fold scores of every non-test question,
its out-of-fold estimate, and the fine-tuned model's test decisions under it (metrics/cv.json)."""
from medqa import paths
from medqa.crossval.estimate import cv_summary
from medqa.errors import stage_main
from medqa.io import read_json, read_jsonl, write_json
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    rows = [row for fold in params.cv.folds for row in read_jsonl(paths.cv_fold_dir(fold) / "held_out_scores.jsonl")]
    test_rows = read_jsonl(paths.eval_outputs("finetuned")["predictions_path"])
    summary = cv_summary(params.cv, rows, read_json(paths.CV_FOLDS), test_rows, params.eval)
    write_json(paths.CV_METRICS, summary)
    if summary["folds"]:
        print(f"cv_rule: out of fold, choice + rule: accuracy {summary['choice_with_rule']['accuracy']:.3f}, "
              f"macro-F1 {summary['choice_with_rule']['macro_f1']:.3f} -> {paths.CV_METRICS}")
    else:
        print("cv_rule: cross-validation off (cv.folds: [])")


if __name__ == "__main__":
    main()
