"""Stage judge: an LLM rates the base and fine-tuned answers per criterion and compares them head to head."""
from medqa import paths
from medqa.errors import stage_main
from medqa.io import read_jsonl, write_json, write_jsonl
from medqa.judge import judge_model_dir, run_judge
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    rows, result = run_judge(
        params.judge, params.model, read_jsonl(paths.eval_outputs("baseline")["predictions_path"]),
        read_jsonl(paths.eval_outputs("finetuned")["predictions_path"]), read_jsonl(paths.TEST),
        judge_model_dir(params.judge.model, params.model.name, paths.BASE_MODEL, paths.JUDGE_MODEL),
        params.eval.bootstrap, params.eval.seed,
    )
    write_jsonl(paths.JUDGE_PREDICTIONS, rows)
    write_json(paths.JUDGE_METRICS, result)
    pairs = result["head_to_head"]
    print(f"judge: fine-tuned vs base, win {pairs['win']['mean']:.2f} tie {pairs['tie']['mean']:.2f} "
          f"loss {pairs['loss']['mean']:.2f}; position consistency {pairs['position_consistency']['mean']:.2f}")


if __name__ == "__main__":
    main()
