"""Several training processes: the `accelerate launch` command the finetune stage turns into, and
saving an adapter that FSDP has sharded across them."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
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


MACHINE_RANK_ENV, MAIN_ADDRESS_ENV, MAIN_PORT_ENV = "MEDQA_MACHINE_RANK", "MEDQA_MAIN_ADDRESS", "MEDQA_MAIN_PORT"


@dataclass(frozen=True)
class Machines:
    """The machines that train together: how many, this one's rank (0: the main one, which writes
    the outputs), and the main machine's address and port, where the others meet it."""

    count: int = 1
    rank: int = 0
    main_address: str = "127.0.0.1"
    main_port: int = 29500


def machines_from_env(count: int, environ: Mapping[str, str]) -> Machines:
    """`train.num_machines` machines; this one's rank and the main machine's address from
    MEDQA_MACHINE_RANK / MEDQA_MAIN_ADDRESS (MEDQA_MAIN_PORT, default 29500), or from what SkyPilot
    sets on each node of a multi-node task (SKYPILOT_NODE_RANK, the first of SKYPILOT_NODE_IPS)."""
    if count == 1:
        return Machines()
    rank = environ.get(MACHINE_RANK_ENV, environ.get("SKYPILOT_NODE_RANK"))
    address = environ.get(MAIN_ADDRESS_ENV) or (environ.get("SKYPILOT_NODE_IPS") or "").split("\n")[0].strip()
    if rank is None or not address:
        raise PipelineError(f"train.num_machines={count}: set {MACHINE_RANK_ENV} (0 on the main machine, 1 to {count - 1} "
                            f"on the others) and {MAIN_ADDRESS_ENV} (the main machine's address) on every machine")
    if not rank.isdigit() or int(rank) >= count:
        raise PipelineError(f"{MACHINE_RANK_ENV}={rank}: expected 0 to {count - 1} (train.num_machines={count})")
    port = environ.get(MAIN_PORT_ENV, "29500")
    if not port.isdigit():
        raise PipelineError(f"{MAIN_PORT_ENV}={port}: expected a port number")
    return Machines(count, int(rank), address, int(port))


def accelerate_command(num_processes: int, strategy: str = "ddp", machines: Machines = Machines(),
                       module: str = "stages.finetune") -> list[str]:
    """The command that re-runs `module` as `num_processes` processes on each machine (one per
    GPU), DDP or FSDP. Several machines meet at the main one by a static rendezvous: each keeps the
    rank it is given, so rank 0 — the process that writes the adapter — is on the main machine."""
    command = ["accelerate", "launch", "--config_file", str(ACCELERATE_CONFIGS[strategy]),
               "--num_processes", str(num_processes * machines.count)]
    if machines.count > 1:
        command += ["--num_machines", str(machines.count), "--machine_rank", str(machines.rank),
                    "--main_process_ip", machines.main_address, "--main_process_port", str(machines.main_port)]
    return [*command, "-m", module]


def save_fsdp_adapter(model: Any, adapter_dir: Path, trained_on: dict, record_name: str) -> None:
    """Gather the adapter that FSDP2 has sharded across the processes (a collective: every rank calls
    it) and let rank 0 write it, with `trained_on` written as `record_name` beside it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # The whole model's unsharded state, gathered one unit at a time into CPU memory (4-bit base
    # weights included: ~4 GB for a 7B model); peft keeps its adapter's entries of it.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        with atomic_dir(adapter_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            write_json(tmp / record_name, trained_on)
