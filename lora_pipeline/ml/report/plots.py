"""Small PNG plots for the UI and the report. Dagster-free; matplotlib without a display."""

from __future__ import annotations

import base64
import io


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(6, 3.2), dpi=100)


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def loss_curve_png(history: list[tuple[int, float]], title: str = "training loss",
                   held_out: list[tuple[int, float]] | None = None, published_step: int | None = None) -> bytes:
    """Line plot of (step, loss) pairs; with held_out, the held-out loss on the same axes and the step whose
    weights were published marked."""
    plt, (fig, ax) = _figure()
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, marker="o", markersize=3, label="training (logged mean)")
    if held_out:
        steps, losses = zip(*held_out)
        ax.plot(steps, losses, marker="s", markersize=4, color="#d8893b", label="held-out (per-example mean)")
        if published_step is not None and published_step in steps:
            ax.axvline(published_step, color="#2a9d5c", linestyle="--", linewidth=1,
                       label=f"published: step {published_step}")
        ax.legend()
        title = "training and held-out loss" if title == "training loss" else title
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def bar_chart_png(values: dict[str, float], ylabel: str, title: str) -> bytes:
    """Bar chart of named values (e.g. held-out loss per model)."""
    plt, (fig, ax) = _figure()
    names = list(values)
    palette = ["#999999", "#3b7dd8", "#2a9d5c", "#d8893b"]
    colors = palette[: len(names)] if len(names) <= len(palette) else "#3b7dd8"
    bars = ax.bar(names, [values[n] for n in names], color=colors)
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(plt, fig)


def markdown_image(png: bytes, alt: str) -> str:
    """A Markdown image with the PNG inlined, which the Dagster UI renders."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def length_histogram_png(lengths, max_length: int, bins: int = 40) -> bytes:
    """Histogram of tokens per example, with training.max_length marked (what lies right of it is cut)."""
    import numpy as np

    plt, (fig, ax) = _figure()
    # Binned here, in one NumPy pass: ax.hist on a million lengths takes seconds.
    counts, edges = np.histogram(np.asarray(lengths), bins=bins)
    ax.stairs(counts, edges, fill=True, color="#3b7dd8")
    ax.axvline(max_length, color="#d8893b", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title("token lengths")
    ax.legend()
    return _png(plt, fig)


def curves_png(curves: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    """One small panel per named curve of (step, value) pairs, side by side (preference training: loss, reward
    margin, reward accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(curves), 1), figsize=(3.2 * max(len(curves), 1), 3.0), dpi=100, squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _png(plt, fig)
