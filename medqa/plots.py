"""Loss curves rendered to PNG for the report (`dvc plots show` draws the same CSVs interactively)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_losses(train_csv: Path, val_csv: Path, out_png: Path) -> None:
    """Train and validation loss against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for path, label, style in ((train_csv, "train", "-"), (val_csv, "validation", "o-")):
        frame = pd.read_csv(path)
        if not frame.empty:
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
