"""The loss curve as a PNG, from a run folder's curve (RunFolder.curve)."""

from __future__ import annotations

from pathlib import Path

from midfill.files import atomic_path


def plot_losses(curve: tuple[list, list], png_path: Path, title: str = "loss") -> None:
    import matplotlib  # imported here: plotting is the only user

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = curve
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="held-out", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
