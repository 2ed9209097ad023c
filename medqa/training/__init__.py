"""Training: the LoRA/QLoRA recipe (the finetune stage), the Trainer with the project's loss and callbacks,
checkpoints that resume, and launching on several processes or machines (DDP, FSDP)."""
