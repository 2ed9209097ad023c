"""Several training processes: the `accelerate launch` command the finetune stage turns into, and
saving an adapter that FSDP has sharded across them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from medqa.errors import PipelineError
from medqa.io import atomic_dir, write_json

ACCELERATE_CONFIGS = {"ddp": Path("configs/accelerate/ddp.yaml"), "fsdp": Path("configs/accelerate/fsdp.yaml")}


def launched_by_accelerate() -> bool:
    """True inside a process started by `accelerate launch` / torchrun."""
    return "LOCAL_RANK" in os.environ


def check_distributed(strategy: str) -> None:
    """FSDP needs GPUs (accelerate's FSDP plugin has no CPU device): one clear line instead of a
    traceback from every process. DDP runs anywhere (NCCL on GPUs, gloo on the CPU)."""
    import torch

    if strategy == "fsdp" and not torch.cuda.is_available():
        raise PipelineError("train.distributed=fsdp needs GPUs (accelerate's FSDP has no CPU device): use "
                            "train.distributed=ddp, which runs several CPU processes over gloo")


def accelerate_command(num_processes: int, strategy: str = "ddp", module: str = "stages.finetune") -> list[str]:
    """The command that re-runs `module` as `num_processes` processes (one per GPU), DDP or FSDP."""
    return ["accelerate", "launch", "--config_file", str(ACCELERATE_CONFIGS[strategy]),
            "--num_processes", str(num_processes), "-m", module]


def save_fsdp_adapter(trainer: Any, adapter_dir: Path, trained_on: dict, record_name: str) -> None:
    """Gather the sharded adapter (every rank must take part) and let rank 0 move it into place, with
    `trained_on` written as `record_name` beside it."""
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    staging = adapter_dir.parent / f".{adapter_dir.name}.fsdp"
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        with atomic_dir(adapter_dir) as tmp:
            for name in ("adapter_config.json", "adapter_model.safetensors"):  # not the pickled training args
                shutil.move(str(staging / name), tmp / name)
            write_json(tmp / record_name, trained_on)
        shutil.rmtree(staging, ignore_errors=True)
