"""The base model read once (the download stage: embedded GGUF, hub, local directory with its content
fingerprint), then loaded for training or inference on the hardware at hand, with an adapter."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa.errors import PipelineError
from medqa.io import atomic_dir, read_json, write_json
from medqa.modeling.hardware import Hardware, fsdp_enabled
from medqa.modeling.profiles import ModelProfile, from_model_files, get_profile, package_dir, require_model_config

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
TRAINED_ON = "trained_on.json"  # beside an adapter: the base as it saw it (the export merges accordingly)


def holds_model(folder: str | Path, profile: ModelProfile) -> bool:
    """Whether a folder the download stage (or the judge's preparation) wrote holds this model already."""
    return Path(folder, SOURCE_FILE).is_file() and read_source(folder).get("hub_id") == profile.hub_id


def tokenizer_before_download(profile: ModelProfile, downloaded: str | Path) -> Any | None:
    """The model's tokenizer before the download stage has run for it: the download stage's copy when it
    holds this model already, else from the model's own files (`from_model_files`); None where none can be
    read (the later stages then check what needs it)."""
    if holds_model(downloaded, profile):
        return load_tokenizer(downloaded)
    from transformers import AutoTokenizer

    return from_model_files(profile, AutoTokenizer, "token budgets")


def config_before_download(name: str, key: str, downloaded: Sequence[str | Path]) -> Any:
    """The config of the model `key` names: from a folder of `downloaded` that holds it already (no
    GGUF parsed again on every experiment), else `require_model_config` (one line where it cannot be read)."""
    from transformers import AutoConfig

    folder = next((f for f in downloaded if holds_model(f, get_profile(name)) and Path(f, "config.json").is_file()),
                  None)
    return AutoConfig.from_pretrained(folder) if folder is not None else require_model_config(name, key)


def prepare_base_model(profile: ModelProfile, out_dir: str | Path) -> dict:
    """Materialise the base model into `out_dir` and return its source record.

    An embedded GGUF copy is de-quantised once into a normal safetensors directory, so later
    stages load it in under a second. A hub model is downloaded into the Hugging Face cache (not
    copied into DVC's), and `out_dir` holds its tokenizer and the resolved revision.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    embedded = package_dir(profile.gguf[0]) if profile.gguf else None
    with atomic_dir(out_dir) as tmp:
        if profile.local_dir is not None:
            source = _reference_dir(profile.local_dir, tmp)
        elif embedded is not None:
            gguf_file = profile.gguf[1]
            log.info("converting the embedded %s (%s) to safetensors", gguf_file, profile.gguf[0])
            tokenizer = AutoTokenizer.from_pretrained(embedded, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(embedded, gguf_file=gguf_file)
            # save_pretrained refuses a GGUF-loaded model; the weights are de-quantised already.
            model.hf_quantizer = None
            model.is_quantized = False
            model.quantization_method = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = {"hub_id": profile.hub_id, "weights": "local", "origin": f"{profile.gguf[0]}/{gguf_file}"}
        else:
            source = _prefetch_hub(profile.hub_id, tmp)
        write_json(Path(tmp) / SOURCE_FILE, source)
    return source


def _reference_dir(model_dir: Path, tokenizer_dir: Path) -> dict:
    """A local model directory is used where it is (a 7B model is not copied into DVC's cache):
    save its tokenizer and record its path and a fingerprint of its files."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"model.name {model_dir}: no usable tokenizer in it: {exc}") from exc
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if not any(p.suffix == ".safetensors" for p in files):
        raise PipelineError(f"model.name {model_dir}: no .safetensors weights in it")
    return {"hub_id": str(model_dir), "weights": "dir", "path": str(model_dir),
            "fingerprint": content_fingerprint(model_dir, files)}


WHOLE_FILE_BYTES = 10_000_000  # files below this are read whole (configs, tokenizer, a small model's weights)
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 65_536


def content_fingerprint(model_dir: Path, files: list[Path]) -> str:
    """What the model's files hold, wherever they lie: names and sizes, the bytes of the small files,
    and of each large one 64 blocks of 64 KiB spread from its start (the safetensors header) to its
    end. Changed weights of the same shapes (a model merged after fine-tuning) differ in nearly every
    block; reading 4 MiB of each weights file takes a moment where hashing 14 GB takes minutes."""
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(model_dir)}:{size}".encode())
        with f.open("rb") as stream:
            if size < WHOLE_FILE_BYTES:
                digest.update(stream.read())
                continue
            for i in range(SAMPLED_BLOCKS):
                stream.seek((size - BLOCK_BYTES) * i // (SAMPLED_BLOCKS - 1))
                digest.update(stream.read(BLOCK_BYTES))
    return digest.hexdigest()


def _prefetch_hub(hub_id: str, tokenizer_dir: Path) -> dict:
    """Download a hub model into the HF cache; save its tokenizer; record the exact revision."""
    from huggingface_hub import snapshot_download
    from transformers import AutoTokenizer

    try:
        path = snapshot_download(
            hub_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "tokenizer*"],
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise PipelineError(
            f"could not download {hub_id} from the Hugging Face hub: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
            "Gated models (Mistral, Llama) need an accepted licence and a token in the HF_TOKEN "
            "environment variable (or `hf auth login`); offline, use the default embedded model."
        ) from exc
    tokenizer.save_pretrained(tokenizer_dir)
    return {"hub_id": hub_id, "weights": "hub", "revision": Path(path).name}


def read_source(base_dir: str | Path) -> dict:
    path = Path(base_dir) / SOURCE_FILE
    if not path.exists():
        raise PipelineError(f"{path} is missing: run the download stage (`dvc repro download`)")
    return read_json(path)  # type: ignore[return-value]


def load_tokenizer(base_dir: str | Path, padding_side: str = "right") -> Any:
    """The base model's tokenizer, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(base_dir: str | Path, hardware: Hardware, adapter_dir: str | Path | None = None) -> Any:
    """Load the base model (4-bit nf4 when `hardware` says so), optionally with a trained LoRA adapter."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = read_source(base_dir)
    # Weights only from safetensors (pickle checkpoints can run code), and never the hub's custom code.
    kwargs: dict[str, Any] = {"dtype": hardware.dtype, "use_safetensors": True, "trust_remote_code": False}
    if hardware.quantize_4bit:
        fsdp = fsdp_enabled()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=hardware.dtype,
            # FSDP-QLoRA: 4-bit weights stored in the compute dtype, so FSDP can shard them.
            bnb_4bit_quant_storage=hardware.dtype if fsdp else torch.uint8,
        )
        if hardware.device == "cpu":
            kwargs["device_map"] = {"": "cpu"}
        elif not fsdp:  # FSDP places the shards itself
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}  # one GPU per process
    if source["weights"] == "local":
        name = str(base_dir)
    elif source["weights"] == "dir":
        name = source["path"]
    else:
        name, kwargs["revision"] = source["hub_id"], source.get("revision")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"could not load the base model {name}: {exc}") from exc
    if not hardware.quantize_4bit and not fsdp_enabled():
        model.to(hardware.device)
    if adapter_dir is not None:
        from peft import PeftModel

        require_adapter(adapter_dir)
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model


def require_adapter(adapter_dir: str | Path) -> None:
    """Raise one clear PipelineError when `adapter_dir` holds no trained adapter."""
    if not (Path(adapter_dir) / "adapter_model.safetensors").exists():
        raise PipelineError(
            f"no fine-tuned adapter in {adapter_dir}: run `dvc repro` to train it or `dvc pull finetune` "
            "to fetch it from the DVC remote"
        )


@dataclass
class InferenceModel:
    """A model ready to answer: the weights (with the adapter when asked), its tokenizer, the hardware."""

    model: Any
    tokenizer: Any
    hardware: Hardware


def load_for_inference(base_dir: str | Path, hardware: Hardware, adapter_dir: str | Path | None = None,
                       padding_side: str = "left", merge: bool = False) -> InferenceModel:
    """The one way the eval stages, the judge, the chat app, the export and the benchmarks load a
    model: the base (4-bit nf4 when `hardware` says so), optionally with the trained LoRA adapter,
    in eval mode, and its tokenizer (left padding for batched generation). With `merge`, the adapter is
    folded into the base weights (peft's `merge_and_unload`): the same model without the adapter's
    extra matrix products on every forward pass (tested equal within float rounding), where the weights
    are not 4-bit (merging into nf4 weights would re-quantise them)."""
    read_source(base_dir)  # says to run the download stage when the base model is missing
    if adapter_dir is not None:
        require_adapter(adapter_dir)  # before the base model's weights are loaded
    model = load_model(base_dir, hardware, adapter_dir)
    if merge and adapter_dir is not None and not hardware.quantize_4bit:
        model = model.merge_and_unload()
    return InferenceModel(model, load_tokenizer(base_dir, padding_side), hardware)
