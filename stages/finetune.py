"""Stage finetune: a LoRA adapter (QLoRA on CUDA) trained on the train split."""
import os

from medqa.errors import stage_main
from medqa.params import load_params
from medqa.training.checkpoints import claim_checkpoints
from medqa.training.launch import accelerate_command, check_distributed, launched_by_accelerate, machines_from_env
from medqa.training.recipe import TrainFiles, shaping_params, train_adapter


@stage_main
def main() -> None:
    params = load_params()
    files = TrainFiles.of_stage()
    n = params.train.num_processes
    machines = machines_from_env(params.train.num_machines, os.environ)
    if (n > 1 or machines.count > 1) and not launched_by_accelerate():
        check_distributed(params.train.distributed)
        # Settle resume/clean-up once, before the processes start; then become the launcher.
        claim_checkpoints(shaping_params(params), files.base_dir, files.train, files.val, files.checkpoints)
        command = accelerate_command(n, params.train.distributed, machines)
        print("finetune: " + " ".join(command))
        os.execvp(command[0], command)
    summary = train_adapter(params, files)
    if summary:
        print(f"finetune: best step {summary['best_step']} (val loss {summary['best_val_loss']}) -> {files.adapter}")


if __name__ == "__main__":
    main()
