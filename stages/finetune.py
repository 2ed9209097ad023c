"""Stage finetune: a LoRA adapter (QLoRA on CUDA) trained on the train split."""
from medqa import paths
from medqa.errors import stage_main
from medqa.params import load_params
from medqa.training import train_adapter


@stage_main
def main() -> None:
    summary = train_adapter(
        load_params(), paths.BASE_MODEL, paths.TRAIN, paths.VAL, paths.ADAPTER, paths.CHECKPOINTS,
        paths.TRAIN_LOSS, paths.VAL_LOSS, paths.TRAIN_METRICS,
    )
    print(f"finetune: best step {summary['best_step']} (val loss {summary['best_val_loss']}) -> {paths.ADAPTER}")


if __name__ == "__main__":
    main()
