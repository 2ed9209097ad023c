"""Merge the trained LoRA adapter into the base model and save it, for serving without peft.

    python -m medqa.export [--out models/merged]

The base model is loaded unquantised (a 4-bit model cannot be merged), in bf16 on CUDA and fp32 on
the CPU, or in `--dtype`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from medqa import paths
from medqa.errors import command_main
from medqa.io import atomic_dir
from medqa.models import load_model, load_tokenizer, resolve_hardware


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = "auto") -> None:
    """Save base + adapter merged into plain weights (safetensors) with the tokenizer."""
    model = load_model(base_dir, resolve_hardware("none", dtype), adapter_dir)
    merged = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(base_dir).save_pretrained(tmp)


@command_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/merged"))
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args()
    merge_adapter(paths.BASE_MODEL, paths.ADAPTER, args.out, args.dtype)
    print(f"export: {paths.BASE_MODEL} + {paths.ADAPTER} -> {args.out}")


if __name__ == "__main__":
    main()
