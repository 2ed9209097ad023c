"""Stage finetuned_eval: the base model with the trained adapter, on the same test questions."""
from medqa import paths
from medqa.errors import stage_main
from medqa.evaluation.evaluate import EVAL_SECTIONS, EvalFiles, run_evaluation
from medqa.evaluation.progress import stage_progress
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    # A killed run goes on from its finished questions (data/progress/finetuned_eval/, or MEDQA_CHECKPOINT_DIR).
    progress = stage_progress("finetuned_eval", params, EVAL_SECTIONS, [paths.TEST, paths.ADAPTER], [paths.BASE_MODEL])
    run_evaluation(params.model, params.prompt, params.generation, params.eval,
                   EvalFiles.of_stage("finetuned", paths.ADAPTER), label="finetuned", progress=progress)


if __name__ == "__main__":
    main()
