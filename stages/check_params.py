"""Stage check_params: every param checked before any other stage runs, so a typo in
`dvc exp run -S ...` fails in a second and before DVC has deleted any other stage's outputs."""
from medqa import paths
from medqa.data.sources import check_source
from medqa.errors import stage_main
from medqa.evaluation.text_metrics import check_bertscore_model
from medqa.io import write_text
from medqa.modeling.profiles import check_lora_targets, get_profile
from medqa.params import load_params
from medqa.preflight import check_against_data_and_model, check_models_and_windows, check_optimizer


@stage_main
def main() -> None:
    params = load_params()
    check_source(params.data.source)
    # What the params name in the model, against the model's own config (no weights read).
    check_lora_targets(get_profile(params.model.name), params.lora.target_modules)
    # Both models readable here, and every token budget within their context windows (configs only).
    check_models_and_windows(params)
    # Sizes and token budgets, against the data and the model's tokenizer (a local source; seconds).
    check_against_data_and_model(params)
    check_bertscore_model(params.eval.bertscore_model, params.eval.bertscore_num_layers)
    check_optimizer(params.train.optim)
    # Always the same bytes: the download stage depends on this file only to run after the check,
    # so a param change re-runs nothing else through it.
    write_text(paths.PARAMS_CHECKED, "params.yaml passed medqa.params.validate\n")
    print("check_params: params.yaml is valid")


if __name__ == "__main__":
    main()
