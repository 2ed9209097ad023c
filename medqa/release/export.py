"""Merge the trained LoRA adapter into the base model and save it, for serving without peft: as
safetensors (transformers, vLLM, TGI) or as one GGUF file with an Ollama Modelfile (llama.cpp,
Ollama, LM Studio).

    python -m medqa.release.export [--adapter models/release] [--out models/merged] [--dtype auto] [--merge-into original|dequantized]
    python -m medqa.release.export --format gguf [--gguf-type f16|q8_0] [--out models/gguf]

An adapter trained on a 4-bit base (QLoRA; the finetune stage records it in the adapter's
trained_on.json) learned corrections to the de-quantised nf4 weights, not to the original ones: it
is merged into those (the base loaded in 4-bit as in training, then de-quantised), which is the
model that was trained and evaluated. An adapter trained on an unquantised base is merged into the
original weights. `--merge-into` overrides the choice. The merge runs on the CPU (a 4-bit base is
loaded on the GPU as in training, then de-quantised on the CPU), so a 24 GB card exports a 7B
model. Safetensors are saved unquantised, in bf16 where CUDA is present and fp32 otherwise, or in
`--dtype`.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from medqa import paths
from medqa.errors import PipelineError, command_main
from medqa.io import atomic_dir, read_json
from medqa.modeling.hardware import resolve_hardware
from medqa.modeling.loading import TRAINED_ON, load_for_inference, load_tokenizer, require_adapter
from medqa.params import PromptParams, load_params

MERGE_TARGETS = ("original", "dequantized")


def trained_merge_target(adapter_dir: Path) -> str:
    """The weights the adapter learned against: "dequantized" after 4-bit training, else "original"."""
    record = Path(adapter_dir) / TRAINED_ON
    if not record.exists():  # an adapter from before the record was written: assume unquantised
        return "original"
    return "original" if read_json(record).get("quantization", "none") == "none" else "dequantized"


def _dequantized_base(base_dir: Path, dtype: Any) -> Any:
    """The base model as a 4-bit-trained adapter saw it: loaded in 4-bit nf4 where the finetune stage
    loads it (the GPU, or the CPU), then moved to the CPU and de-quantised there by bitsandbytes into
    plain `dtype` weights: the GPU holds only the 4-bit copy (~4 GB for a 7B model), never the
    de-quantised one (14.5 GB in bf16, 29 GB in fp32)."""
    return load_for_inference(base_dir, resolve_hardware("4bit", "auto")).model.to("cpu").dequantize(dtype=dtype)


def merged_model(base_dir: Path, adapter_dir: Path, dtype: str = "auto", merge_into: str | None = None) -> Any:
    """Base + adapter as one plain model (no peft layers), merged into `merge_into`'s weights
    (default: the ones it was trained against, `trained_merge_target`)."""
    from peft import PeftModel

    merge_into = merge_into or trained_merge_target(adapter_dir)
    if merge_into not in MERGE_TARGETS:
        raise PipelineError(f"--merge-into is {merge_into!r}, expected one of {', '.join(MERGE_TARGETS)}")
    # Merging is a sum per adapted layer: done on the CPU, where a 7B model's unquantised weights fit.
    hardware = dataclasses.replace(resolve_hardware("none", dtype), device="cpu")
    if merge_into == "original":
        model = load_for_inference(base_dir, hardware, adapter_dir).model
    else:
        require_adapter(adapter_dir)
        model = PeftModel.from_pretrained(_dequantized_base(base_dir, hardware.dtype), str(adapter_dir))
    return model.merge_and_unload().eval()


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = "auto",
                  merge_into: str | None = None) -> None:
    """Save base + adapter merged (`merged_model`) as safetensors, with the tokenizer."""
    merged = merged_model(base_dir, adapter_dir, dtype, merge_into)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(base_dir).save_pretrained(tmp)


def export_gguf(base_dir: Path, adapter_dir: Path, out_dir: Path, prompt: PromptParams, model_name: str, *,
                gguf_type: str = "f16", merge_into: str | None = None) -> Path:
    """The merged model as `model-<gguf_type>.gguf` in `out_dir`, with an Ollama `Modelfile` that
    prompts it as the pipeline does (params.yaml's prompt section). Returns the GGUF file."""
    import tempfile

    from medqa.prompting.prompts import prompt_format
    from medqa.release.gguf import ollama_modelfile, write_gguf

    tokenizer = load_tokenizer(base_dir)
    fmt = prompt_format(tokenizer, prompt, model_name)
    merged = merged_model(base_dir, adapter_dir, "float32", merge_into)
    name = f"model-{gguf_type}.gguf"
    with tempfile.TemporaryDirectory() as tokenizer_dir, atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tokenizer_dir)  # the files the gguf package's vocabulary readers read
        write_gguf(merged, Path(tokenizer_dir), Path(tmp) / name, gguf_type)
        (Path(tmp) / "Modelfile").write_text(ollama_modelfile(fmt, prompt.system, name))
    return out_dir / name


@command_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors")
    parser.add_argument("--adapter", type=Path, default=paths.RELEASE,
                        help="default: models/release (the release stage's adapter with its card)")
    parser.add_argument("--out", type=Path, default=None, help="default: models/merged, or models/gguf")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="safetensors only (GGUF: --gguf-type)")
    parser.add_argument("--gguf-type", choices=["f16", "q8_0"], default="f16")
    parser.add_argument("--merge-into", choices=MERGE_TARGETS, default=None,
                        help="default: the weights the adapter was trained against (its trained_on.json)")
    args = parser.parse_args()
    target = args.merge_into or trained_merge_target(args.adapter)
    if args.format == "gguf":
        params = load_params()
        out = export_gguf(paths.BASE_MODEL, args.adapter, args.out or paths.GGUF, params.prompt,
                          params.model.name, gguf_type=args.gguf_type, merge_into=target)
        print(f"export: {paths.BASE_MODEL} + {args.adapter} merged into the {target} weights -> {out} "
              f"(`ollama create pubmedqa -f {out.parent / 'Modelfile'}`)")
        return
    out = args.out or paths.MERGED
    merge_adapter(paths.BASE_MODEL, args.adapter, out, args.dtype, target)
    print(f"export: {paths.BASE_MODEL} + {args.adapter} merged into the {target} weights -> {out}")


if __name__ == "__main__":
    main()
