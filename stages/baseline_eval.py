"""Stage baseline_eval: the base model on the test split."""
from medqa import paths
from medqa.errors import stage_main
from medqa.evaluation.evaluate import EVAL_SECTIONS, EvalFiles, run_evaluation
from medqa.evaluation.progress import stage_progress
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    # A killed run goes on from its finished questions (data/progress/baseline_eval/, or MEDQA_CHECKPOINT_DIR).
    progress = stage_progress("baseline_eval", params, EVAL_SECTIONS, [paths.TEST], [paths.BASE_MODEL])
    run_evaluation(params.model, params.prompt, params.generation, params.eval, EvalFiles.of_stage("baseline", None),
                   label="baseline", progress=progress)


if __name__ == "__main__":
    main()
