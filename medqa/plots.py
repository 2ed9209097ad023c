"""Loss curves rendered to PNG for the report (`dvc plots show` draws the same DVCLive files interactively)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def live_metric_file(live_dir: Path, name: str) -> Path:
    """Where DVCLive writes the history of metric `name` (e.g. "eval/loss")."""
    return live_dir / "plots" / "metrics" / f"{name}.tsv"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: Path) -> None:
    """Write the figure to a temporary sibling, then rename it into place."""
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    tmp.replace(out_png)


def plot_losses(live_dir: Path, out_png: Path) -> None:
    """Train and validation loss against the optimiser step, from the finetune stage's DVCLive logs."""
    plt = _pyplot()
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
    _save(fig, out_png)


def plot_head_to_head(rates: dict[str, float], judge: str, out_png: Path) -> None:
    """One stacked bar: the fine-tuned model's win, tie and loss rates against the base model, in the
    order of `rates`."""
    colours = {"win": "tab:green", "tie": "tab:gray", "loss": "tab:red"}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.9), dpi=120)
    left = 0.0
    for outcome, rate in rates.items():
        ax.barh([0], [rate], left=left, color=colours.get(outcome))
        if rate >= 0.1:  # narrower segments are named in the title only
            ax.text(left + rate / 2, 0, f"{outcome} {rate:.0%}", ha="center", va="center", color="white", fontsize=9)
        left += rate
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("share of judged questions")
    summary = " · ".join(f"{o} {r:.0%}" for o, r in rates.items())
    ax.set_title(f"Fine-tuned vs base, judged by {judge} in both orders: {summary}", fontsize=9)
    _save(fig, out_png)
