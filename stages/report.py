"""Stage report: metrics table (base vs fine-tuned, with the change), decisions and loss plots, example answers."""
from medqa import paths
from medqa.decisions.protocols import PRIMARY
from medqa.errors import stage_main
from medqa.evaluation.metrics import paired_differences, tables_from_rows
from medqa.io import read_json, read_jsonl, write_text
from medqa.params import load_params
from medqa.report.plots import plot_confusions, plot_head_to_head, plot_losses
from medqa.report.render import (
    cv_section,
    decisions_csv_text,
    describe_run,
    judge_section,
    render_report,
    standing_section,
)
from medqa.rubric import OUTCOMES


@stage_main
def main() -> None:
    params = load_params()
    base, tuned = paths.eval_outputs("baseline"), paths.eval_outputs("finetuned")
    base_rows, tuned_rows = read_jsonl(base["predictions_path"]), read_jsonl(tuned["predictions_path"])
    differences = paired_differences(
        tables_from_rows(base_rows), tables_from_rows(tuned_rows), params.eval.bootstrap, params.eval.seed
    )
    plot_losses(paths.LIVE_DIR, paths.LOSS_PNG)
    base_metrics, tuned_metrics = read_json(base["metrics_path"]), read_json(tuned["metrics_path"])
    plot_confusions({"base": base_metrics["decision"][PRIMARY.name]["confusion"],
                     "fine-tuned": tuned_metrics["decision"][PRIMARY.name]["confusion"]},
                    base_metrics["decision"]["labels"], PRIMARY.label, paths.DECISIONS_PNG)
    for label, rows in (("baseline", base_rows), ("finetuned", tuned_rows)):
        write_text(paths.decisions_csv(label), decisions_csv_text(rows))
    judged = read_json(paths.JUDGE_METRICS)
    plot_head_to_head({o: judged["head_to_head"][o]["mean"] for o in OUTCOMES}, judged["judge"],
                      paths.JUDGE_PNG)
    judge = judge_section(judged, read_jsonl(paths.JUDGE_PREDICTIONS), paths.JUDGE_PNG.name,
                          n_examples=2)
    text = render_report(
        base_metrics, tuned_metrics, differences, read_json(paths.TRAIN_METRICS), baseline_rows=base_rows,
        finetuned_rows=tuned_rows, run=describe_run(params.model.name, params.lora, params.split.strategy), n_examples=params.report.n_examples,
        loss_png=paths.LOSS_PNG.name, decisions_png=paths.DECISIONS_PNG.name,
        standing=standing_section(base_metrics, tuned_metrics, params.split.strategy),
        cross_validation=cv_section(read_json(paths.CV_METRICS)), judge=judge,
    )
    write_text(paths.REPORT, text)
    print(f"report: {paths.REPORT}")


if __name__ == "__main__":
    main()
