"""Stage release: the trained adapter with a model card written from this run's params and metrics."""
from medqa import paths
from medqa.errors import stage_main
from medqa.evaluation.metrics import paired_differences, tables_from_rows
from medqa.io import read_json, read_jsonl
from medqa.modeling.loading import TRAINED_ON, read_source
from medqa.params import load_params
from medqa.release.card import RunOutcome, card_text, hub_base_model, write_release


@stage_main
def main() -> None:
    params = load_params()
    base, tuned = paths.eval_outputs("baseline"), paths.eval_outputs("finetuned")
    outcome = RunOutcome(
        source=read_source(paths.BASE_MODEL),
        trained_on=read_json(paths.ADAPTER / TRAINED_ON),
        baseline=read_json(base["metrics_path"]),
        finetuned=read_json(tuned["metrics_path"]),
        differences=paired_differences(tables_from_rows(read_jsonl(base["predictions_path"])),
                                       tables_from_rows(read_jsonl(tuned["predictions_path"])),
                                       params.eval.bootstrap, params.eval.seed),
        train=read_json(paths.TRAIN_METRICS),
        split=read_json(paths.SPLIT_METRICS),
    )
    card = card_text(outcome, params.model, params.prompt, params.lora, params.train,
                     split_strategy=params.split.strategy)
    write_release(paths.ADAPTER, paths.RELEASE, card, hub_base_model(outcome.source))
    print(f"release: {paths.RELEASE} (adapter and model card)")


if __name__ == "__main__":
    main()
