"""Stage format: each record as the model's prompt (system + question + context) and target."""
from medqa import paths
from medqa.errors import stage_main
from medqa.io import read_jsonl, write_jsonl
from medqa.modeling.loading import load_tokenizer
from medqa.params import load_params
from medqa.prompting.prompts import format_record, prompt_format


@stage_main
def main() -> None:
    params = load_params()
    fmt = prompt_format(load_tokenizer(paths.BASE_MODEL), params.prompt, params.model.name)
    examples = [format_record(r, fmt, params.prompt) for r in read_jsonl(paths.RAW_DATA)]
    write_jsonl(paths.FORMATTED, examples)
    print(f"format: {len(examples)} examples -> {paths.FORMATTED}")


if __name__ == "__main__":
    main()
