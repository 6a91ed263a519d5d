"""PNG charts of a run: training curves and per-class F1 (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log (see `engine.JSONLinesTracker`)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curves(log_path: str | Path, out_png: str | Path) -> None:
    """Training loss terms against steps and validation samples-F1 of each output against steps."""
    records = read_log(log_path)
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in records if "train/loss" in r]
    for key in sorted({k for r in train for k in r if k.startswith("train/") and k.endswith("loss")}):
        pts = [(r["step"], r[key]) for r in train if key in r]
        ax_loss.plot(*zip(*pts), label=key.removeprefix("train/"))
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    val = [r for r in records if any(k.startswith("val/") for k in r)]
    for key in sorted({k for r in val for k in r if k.startswith("val/") and k.endswith("/samples_f1")}):
        pts = [(r["step"], r[key]) for r in val if key in r]
        ax_f1.plot(*zip(*pts), marker="o", label=key.split("/")[1])
    ax_f1.set(xlabel="step", ylabel="samples F1", title="validation samples F1")
    for ax in (ax_loss, ax_f1):
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


MAX_BAR_SERIES = 6  # more bars per class than this cannot be told apart: a heat map instead


def _per_class_heatmap(per_output: dict[str, Sequence[float]], class_names: Sequence[str], out_png: str | Path,
                       title: str) -> None:
    names = list(per_output)
    values = np.array([list(per_output[n]) for n in names], dtype=float)  # [series, classes]
    fig, ax = plt.subplots(figsize=(3 + 0.75 * len(class_names), 1.5 + 0.38 * len(names)))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(np.arange(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(names)), names)
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="black" if value > 0.6 else "white")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="F1", fraction=0.02, pad=0.01)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_per_class_f1(per_output: dict[str, Sequence[float]], class_names: Sequence[str],
                      out_png: str | Path, title: str = "per-class F1 (validation)") -> None:
    """Grouped bars (one group per class, one bar per output or configuration), or, for more than
    `MAX_BAR_SERIES` of them, a table-like heat map with one row per configuration and each cell's F1 written in it."""
    names = list(per_output)
    if len(names) > MAX_BAR_SERIES:
        _per_class_heatmap(per_output, class_names, out_png, title)
        return
    x = np.arange(len(class_names))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(class_names) * max(1, len(names)) / 2), 4.5))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, per_output[name], width, label=name)
    ax.set_xticks(x, class_names, rotation=45, ha="right")
    ax.set(ylabel="F1", ylim=(0, 1.05), title=title)
    ax.legend(fontsize=8, ncol=min(4, len(names)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
