"""Curves to PNG with matplotlib's object API (a `Figure`, no pyplot: no GUI backend, no global state).

    plot_panels(path, [Panel("reward", "step", "mean reward", [Series(steps, rewards, "train")])])

writes one panel; the run folder's reward_curve.png has three side by side, SFT's loss.png one on a log scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure


@dataclass
class Series:
    """One line of a panel: y over x, in a matplotlib format string ("-", "o-") at a line width."""

    x: Sequence[float]
    y: Sequence[float]
    label: str | None = None
    fmt: str = "-"
    lw: float = 0.8
    alpha: float = 1.0


@dataclass
class Panel:
    """One set of axes; a legend is drawn when any series has a label."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    yscale: str = "linear"


def moving_average(values: Sequence[float], window: int) -> Series:
    """The trailing `window`-point mean of `values` (indexed 0, 1, ...), from the first full window on."""
    means = [sum(values[i - window : i]) / window for i in range(window, len(values) + 1)]
    return Series(range(window - 1, len(values)), means, f"train ({window}-step mean)", lw=1.5)


def plot_panels(path: Path | str, panels: Sequence[Panel], size: tuple[float, float] = (6, 3.5)) -> None:
    """Writes the panels side by side into one PNG at `path`, `size` inches (width, height) in all."""
    fig = Figure(figsize=size)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for s in panel.series:
            ax.plot(s.x, s.y, s.fmt, lw=s.lw, alpha=s.alpha, label=s.label)
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel, title=panel.title, yscale=panel.yscale)
        if any(s.label for s in panel.series):
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
