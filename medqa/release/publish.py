"""Upload the release to the Hugging Face hub as one commit: the adapter with its model card (the
release stage's `models/release`), or the merged or GGUF export (`python -m medqa.release.export`) with the
same card adapted to it.

    python -m medqa.release.publish --repo-id org/name [--private] [--what adapter|merged|gguf] [--dry-run]

The token is read from the HF_TOKEN environment variable only (never a param or an argument, which
shell history keeps). Every file goes in one `create_commit`, so a failed upload leaves the
repository as it was. `--dry-run` lists what the commit would send and contacts nobody.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from medqa import paths
from medqa.errors import PipelineError, command_main
from medqa.modeling.loading import require_adapter
from medqa.release.card import CARD, REPO_PLACEHOLDER

EXPORTS = {"merged": paths.MERGED, "gguf": paths.GGUF}  # medqa.release.export's default outputs
# How each export changes the card: its library, its relation to the base, a tag, and a note.
EXPORT_CARDS = {
    "merged": ("transformers", "merge", "merged",
               "The adapter merged into its base model's weights (`python -m medqa.release.export`): load this "
               "repository with `AutoModelForCausalLM.from_pretrained` alone, no peft."),
    "gguf": ("gguf", "quantized", "gguf",
             "The adapter merged into its base model and saved as one GGUF file with an Ollama `Modelfile` "
             "that prompts it as the pipeline does (`python -m medqa.release.export --format gguf`), for llama.cpp, "
             "Ollama and LM Studio."),
}


def folder_for(what: str) -> Path:
    """The folder `what` uploads, which must exist."""
    if what == "adapter":
        require_adapter(paths.RELEASE)
        return paths.RELEASE
    folder = EXPORTS[what]
    if not folder.is_dir():
        flag = " --format gguf" if what == "gguf" else ""
        raise PipelineError(f"{folder} does not exist: run `python -m medqa.release.export{flag}` first")
    return folder


def card_for(what: str, repo_id: str) -> str:
    """The release's model card for the upload of `what`, with `repo_id` in its usage snippet."""
    from huggingface_hub import ModelCard

    card = ModelCard((paths.RELEASE / CARD).read_text(encoding="utf-8").replace(REPO_PLACEHOLDER, repo_id))
    if what in EXPORT_CARDS:
        library, relation, tag, note = EXPORT_CARDS[what]
        card.data.library_name = library
        card.data.base_model_relation = relation
        card.data.tags = [*card.data.tags, tag]
        title, _, rest = card.text.partition("\n\n")
        card.text = f"{title}\n\n{note}\n\n{rest}"
    return str(card)


def upload_operations(folder: Path, card: str) -> list[Any]:
    """The commit's operations: every file under `folder` (a card there is replaced by `card`), then the card."""
    from huggingface_hub import CommitOperationAdd

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != CARD)
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files] + [
        CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode("utf-8"))
    ]


def hub_token() -> str:
    """HF_TOKEN from the environment, or one line saying how to set it."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise PipelineError("publishing needs a Hugging Face token with write access in the HF_TOKEN environment "
                            "variable (https://huggingface.co/settings/tokens)")
    return token


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises when the hub cannot be reached: offline mode, or a transport error of
    the HTTP client it is built on (httpx2 from huggingface_hub 2, httpx before)."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # (OfflineModeIsEnabled is one)
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except ImportError:
            pass
    return tuple(errors)


def upload(repo_id: str, operations: list[Any], private: bool, token: str, message: str) -> str:
    """Create the model repository if needed and send `operations` as one commit; the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, repo_type="model").commit_url
    except _unreachable_errors() as exc:
        raise PipelineError(f"the Hugging Face hub cannot be reached ({type(exc).__name__}): nothing was "
                            "uploaded; try again when online") from exc
    except HfHubHTTPError as exc:
        raise PipelineError(f"the hub refused the upload to {repo_id}: {str(exc).splitlines()[0]}") from exc


@command_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo-id", required=True, help="the hub repository, e.g. your-name/pubmedqa-lora")
    parser.add_argument("--what", choices=["adapter", *EXPORTS], default="adapter")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry-run", action="store_true", help="list the commit's files; upload nothing")
    args = parser.parse_args()
    folder = folder_for(args.what)
    operations = upload_operations(folder, card_for(args.what, args.repo_id))
    if args.dry_run:
        for op in operations:
            print(op.path_in_repo)
        print(f"publish: {len(operations)} files from {folder} would go to {args.repo_id} in one commit")
        return
    url = upload(args.repo_id, operations, args.private, hub_token(),
                 f"Upload the PubMedQA {args.what} with its model card")
    print(f"publish: {folder} -> {url}")


if __name__ == "__main__":
    main()
