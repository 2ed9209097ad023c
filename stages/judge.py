"""Stage judge: an LLM rates the base and fine-tuned answers per criterion and compares them head to head."""
from medqa import paths
from medqa.errors import stage_main
from medqa.evaluation.judge import judge_model_dir, run_judge
from medqa.evaluation.progress import stage_progress
from medqa.io import read_jsonl, write_json, write_jsonl
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    answers = [paths.eval_outputs(label)["predictions_path"] for label in ("baseline", "finetuned")]
    judge_dir = judge_model_dir(params.judge.model, params.model.name, paths.BASE_MODEL, paths.JUDGE_MODEL)
    # A killed run goes on from its judged questions (data/progress/judge/, or MEDQA_CHECKPOINT_DIR).
    progress = stage_progress("judge", params, ("judge", "model", "eval"), [paths.TEST, *answers], [judge_dir])
    rows, result = run_judge(
        params.judge, params.model, params.eval, base_rows=read_jsonl(answers[0]), tuned_rows=read_jsonl(answers[1]),
        examples=read_jsonl(paths.TEST), judge_dir=judge_dir, progress=progress,
    )
    write_jsonl(paths.JUDGE_PREDICTIONS, rows)
    write_json(paths.JUDGE_METRICS, result)
    progress.finish()
    pairs = result["head_to_head"]
    print(f"judge: fine-tuned vs base, win {pairs['win']['mean']:.2f} tie {pairs['tie']['mean']:.2f} "
          f"loss {pairs['loss']['mean']:.2f}; position consistency {pairs['position_consistency']['mean']:.2f}")


if __name__ == "__main__":
    main()
