"""PNG figures of a training run: loss/metric curves and the classifier's confusion matrix.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot global state, no display
needed) and returned as PNG bytes, so the caller decides where and how atomically to write them.
"""
from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def curves_png(title: str, train_loss: list[float], held_out: list[float], metric_name: str) -> bytes:
    """Two panels over epochs: mean training loss (left) and the held-out ``metric_name`` (right)."""
    epochs = list(range(1, len(train_loss) + 1))
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, train_loss, marker="o")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="mean loss per sample")
    metric_ax.plot(epochs, held_out, marker="o", color="tab:green")
    metric_ax.set(title=f"held-out {metric_name}", xlabel="epoch", ylabel=metric_name)
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)  # show 0.9926, not "+9.926e-1" offsets
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    fig.suptitle(title)
    return _png_bytes(fig)


def confusion_png(title: str, matrix: list[list[int]]) -> bytes:
    """A square confusion matrix (rows: true class, columns: predicted), every cell annotated."""
    size = len(matrix)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    peak = max(max(row) for row in matrix) or 1
    for true in range(size):
        for pred in range(size):
            count = matrix[true][pred]
            ax.text(pred, true, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > peak / 2 else "black")
    ax.set(xticks=range(size), yticks=range(size), xlabel="predicted class", ylabel="true class",
           title=title)
    return _png_bytes(fig)
