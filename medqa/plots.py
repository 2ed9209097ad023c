"""Loss curves rendered to PNG for the report (`dvc plots show` draws the same DVCLive files interactively)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def live_metric_file(live_dir: Path, name: str) -> Path:
    """Where DVCLive writes the history of metric `name` (e.g. "eval/loss")."""
    return live_dir / "plots" / "metrics" / f"{name}.tsv"


def plot_losses(live_dir: Path, out_png: Path) -> None:
    """Train and validation loss against the optimiser step, from the finetune stage's DVCLive logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, label, style in (("train/loss", "train", "-"), ("eval/loss", "validation", "o-")):
        path = live_metric_file(live_dir, name)
        if path.exists():  # no validation curve when training ended before the first evaluation
            frame = pd.read_csv(path, sep="\t")
            ax.plot(frame["step"], frame["loss"], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
