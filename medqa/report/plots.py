"""Loss curves rendered to PNG for the report (`dvc plots show` draws the same DVCLive files interactively)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medqa.decisions.answer_format import DECISIONS


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
    """Train and validation loss against the optimiser step, from the finetune stage's DVCLive logs;
    the validation loss at step 0 is the base model's (the untrained adapter)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, label, style in (("train/loss", "train", "-"), ("eval/loss", "validation", "o-")):
        path = live_metric_file(live_dir, name)
        if path.exists():  # no validation curve when training ended before the first evaluation
            frame = pd.read_csv(path, sep="\t")
            if label == "train":
                # Per-step losses are noisy (a few questions a step): faint, with their moving average over it.
                line, = ax.plot(frame["step"], frame["loss"], style, alpha=0.3, linewidth=1, label="train (per step)")
                smooth = frame["loss"].ewm(span=max(5, len(frame) // 20)).mean()
                ax.plot(frame["step"], smooth, "-", color=line.get_color(), linewidth=2,
                        label="train (moving average)")
                continue
            ax.plot(frame["step"], frame["loss"], style, label=label)
            if label == "validation" and frame["step"].iloc[0] == 0:
                ax.annotate("base model", (0, frame["loss"].iloc[0]), textcoords="offset points", xytext=(6, 4),
                            fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out_png)


def plot_confusions(confusions: dict[str, dict[str, dict[str, int]]], labels: dict[str, int], protocol: str,
                    out_png: Path) -> None:
    """Each model's confusion matrix of decisions (`metrics.json`'s decision.<protocol>.confusion:
    truth -> decision -> count) side by side, with the test labels' distribution: a model that says
    one answer to everything fills one column."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(confusions), figsize=(3.6 * len(confusions), 3.6), dpi=120, squeeze=False)
    for ax, (model, confusion) in zip(axes[0], confusions.items()):
        matrix = [[confusion[truth][said] for said in DECISIONS] for truth in DECISIONS]
        ConfusionMatrixDisplay(np.array(matrix), display_labels=list(DECISIONS)).plot(ax=ax, colorbar=False, cmap="Blues")
        said = {d: sum(confusion[t][d] for t in DECISIONS) for d in DECISIONS}
        ax.set_title(f"{model}: said " + " / ".join(f"{d} {n}" for d, n in said.items()), fontsize=9)
        ax.set_xlabel(f"decision ({protocol})")
        ax.set_ylabel("reference")
    fig.suptitle("Test labels: " + " / ".join(f"{d} {labels.get(d, 0)}" for d in DECISIONS), fontsize=10)
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
