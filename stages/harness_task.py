"""Stage harness_task: the test questions as lm-evaluation-harness reads them (lm_eval_tasks/)."""
from medqa import paths
from medqa.decisions.answer_format import AnswerFormat
from medqa.errors import stage_main
from medqa.evaluation.harness import harness_rows
from medqa.io import read_jsonl, write_jsonl
from medqa.modeling.loading import load_tokenizer
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    rows = harness_rows(read_jsonl(paths.TEST), load_tokenizer(paths.BASE_MODEL), AnswerFormat.of(params.prompt),
                        params.eval.max_prompt_length)
    write_jsonl(paths.HARNESS_TEST, rows)
    print(f"harness_task: {len(rows)} questions in {paths.HARNESS_TEST}")


if __name__ == "__main__":
    main()
