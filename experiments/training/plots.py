"""The training curves of a run directory: DIR/curves.png, rewritten after every epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drm.checkpoint import atomic_write


def plot_curves(path: Path, metrics: list[dict[str, Any]]) -> None:
    """Loss and accuracy against epoch and against wall time, as a PNG (atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    minutes = metrics[-1]["elapsed"] >= 120
    elapsed = [m["elapsed"] / (60 if minutes else 1) for m in metrics]
    time_label = f"wall time ({'min' if minutes else 's'})"
    fig = Figure(figsize=(10, 7))
    # fixed margins: a layout engine would double the cost of a plot written every epoch
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.08, top=0.97, hspace=0.25, wspace=0.22)
    axes = fig.subplots(2, 2)
    for col, (xs, label) in enumerate(((epochs, "epoch"), (elapsed, time_label))):
        ax = axes[0, col]
        ax.plot(xs, [m["train_loss"] for m in metrics], "o-", label="train loss")
        if all("test_loss" in m for m in metrics):
            ax.plot(xs, [m["test_loss"] for m in metrics], "s--", label="test loss")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        ax = axes[1, col]
        ax.plot(xs, [m["test_accuracy"] for m in metrics], "o-", color="C2")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
