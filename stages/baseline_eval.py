"""Stage baseline_eval: the base model on the test split."""
from medqa import paths
from medqa.errors import stage_main
from medqa.evaluation import run_evaluation
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    run_evaluation(params.model, params.prompt, params.generation, params.eval, paths.BASE_MODEL, paths.TEST,
                   None, label="baseline", **paths.eval_outputs("baseline"))


if __name__ == "__main__":
    main()
