"""Stage download: PubMedQA (hub or local copy) and the base model, from the outside world."""
from medqa import paths
from medqa.data.sources import load_source
from medqa.errors import stage_main
from medqa.io import write_json, write_jsonl
from medqa.modeling.loading import prepare_base_model
from medqa.modeling.profiles import get_profile
from medqa.params import load_params


@stage_main
def main() -> None:
    params = load_params()
    data = params.data
    records, labels = load_source(data.source, data.test_ids)
    write_jsonl(paths.RAW_DATA, records)
    write_json(paths.TEST_LABELS, labels)
    print(f"download: {len(records)} records -> {paths.RAW_DATA}")
    source = prepare_base_model(get_profile(params.model.name), paths.BASE_MODEL)
    print(f"download: base model {source['hub_id']} ({source['weights']}) -> {paths.BASE_MODEL}")


if __name__ == "__main__":
    main()
