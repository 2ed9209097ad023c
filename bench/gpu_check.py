"""A first run on a new GPU machine: the QLoRA stand-in through the stages in a few minutes, each
stage's time and peak GPU memory, and the fine-tuning step time.

    make gpu-check [DATA=dir]            (python -m bench.gpu_check [--data DIR] [--steps 20] [--questions 32])

In a scratch copy of this checkout (its tracked files; the checkout itself is not touched), the
default model — SmolLM2-135M from the embedded GGUF, 4-bit nf4 with bf16 compute on CUDA — goes
through the stages up to `finetuned_eval` under `dvc repro`, with small caps: `--steps` optimiser
steps, `--questions` test questions. `--data` reads a local PubMedQA copy (for machines without the
hub). GPU memory is nvidia-smi's `memory.used` of the whole card, sampled every 0.5 s: run it alone.
On a machine without a GPU it runs too, on the CPU, without the memory column.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("check_params", "download", "format", "split", "baseline_eval", "finetune", "finetuned_eval")


class GpuMemory:
    """The peak of nvidia-smi's memory.used (MiB, all GPUs summed) since the last `reset`."""

    def __init__(self, every_s: float = 0.5):
        self.available = shutil.which("nvidia-smi") is not None
        self.peak, self._every = 0, every_s
        if self.available:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            self.peak = max(self.peak, sum(int(v) for v in out.split() if v.strip().isdigit()))
            time.sleep(self._every)

    def reset(self) -> int:
        peak, self.peak = self.peak, 0
        return peak


def environment() -> list[str]:
    """What this machine offers the pipeline: torch, the GPU, bf16, bitsandbytes."""
    import torch

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {props.major}.{props.minor}")
        lines.append(f"CUDA {torch.version.cuda}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        lines.append("no CUDA device: the stages run on the CPU")
    try:
        import bitsandbytes

        lines.append(f"bitsandbytes {bitsandbytes.__version__}")
    except ImportError:
        lines.append("bitsandbytes not installed: no 4-bit")
    return lines


def scratch_copy(dest: Path, data: Path | None, steps: int, questions: int) -> Path:
    """This checkout's tracked files in `dest`, a git repo of its own, with the small caps in params.yaml."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    train = params["train"]
    train.update(max_steps=steps, eval_steps=steps, save_steps=steps,
                 max_samples=steps * train["batch_size"] * train["grad_accum"], max_val_samples=16)
    params["eval"].update(max_samples=questions, bootstrap=100)
    if data is not None:
        params["data"]["source"] = str(data.resolve())
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a local PubMedQA copy (default: params.yaml's data.source)")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps (default 20)")
    parser.add_argument("--questions", type=int, default=32, help="test questions per eval stage (default 32)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args()

    print("\n".join(environment()), flush=True)
    memory = GpuMemory()
    work = Path(tempfile.mkdtemp(prefix="medqa-gpu-check-"))
    rows = []
    try:
        repo = scratch_copy(work, args.data, args.steps, args.questions)
        log = (work / "gpu-check.log").open("w")
        for stage in STAGES:
            memory.reset()
            start = time.perf_counter()
            done = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=repo, stdout=log,
                                  stderr=subprocess.STDOUT)
            rows.append((stage, time.perf_counter() - start, memory.reset() if memory.available else None))
            print(f"{stage}: {rows[-1][1]:.1f} s", flush=True)
            if done.returncode:
                log.close()
                sys.exit(f"{stage} failed:\n{(work / 'gpu-check.log').read_text()[-4000:]}")
        log.close()
        trained = json.loads((repo / "metrics/train.json").read_text())
        adapter = json.loads((repo / "models/adapter/trained_on.json").read_text())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| stage | wall s | peak GPU MiB |\n|---|---|---|")
    for stage, seconds, peak in rows:
        print(f"| {stage} | {seconds:.1f} | {'-' if peak is None else peak} |")
    steps = trained["steps"] or 1
    print(f"\nfinetune: {trained['steps']} steps in {trained['train_runtime_s']} s of training "
          f"({trained['train_runtime_s'] / steps:.2f} s/step), val loss {trained['base_val_loss']} -> "
          f"{trained['best_val_loss']}; trained on {json.dumps(adapter)}")
    if args.keep:
        print(f"scratch copy kept in {work}")


if __name__ == "__main__":
    main()
