"""Stage format: each record as the model's prompt (system + question + context) and target."""
from medqa import paths
from medqa.errors import stage_main
from medqa.io import read_jsonl, write_jsonl
from medqa.models import get_profile, load_tokenizer
from medqa.params import load_params
from medqa.prompts import PromptFormat, format_record


@stage_main
def main() -> None:
    params = load_params()
    prompt = params["prompt"]
    template = prompt["template"] or get_profile(params["model"]["name"]).template
    fmt = PromptFormat(load_tokenizer(paths.BASE_MODEL), template)
    examples = [
        format_record(r, fmt, prompt["system"], prompt["answer_prefix"], prompt["decision_first"])
        for r in read_jsonl(paths.RAW_DATA)
    ]
    write_jsonl(paths.FORMATTED, examples)
    print(f"format: {len(examples)} examples -> {paths.FORMATTED}")


if __name__ == "__main__":
    main()
