"""The hardware at hand and what it implies: device, weights' dtype, 4-bit, bf16 autocast on the CPU."""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from typing import Any

from medqa.errors import PipelineError

log = logging.getLogger(__name__)

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


