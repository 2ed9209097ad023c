"""Stage finetuned_eval: the base model with the trained adapter, on the same test questions."""
from medqa import paths
from medqa.errors import stage_main
from medqa.evaluation import run_evaluation
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    run_evaluation(params.model, params.prompt, params.generation, params.eval, paths.BASE_MODEL, paths.TEST,
                   paths.ADAPTER, label="finetuned", **paths.eval_outputs("finetuned"))


if __name__ == "__main__":
    main()
