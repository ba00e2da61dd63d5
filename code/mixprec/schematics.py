"""Schematic figures of the book's central ideas, drawn from code so they build with the book.

Each function returns a matplotlib ``Figure``. What a schematic states about the numerics (a
tensor's dtype, which elements share a scale) is read from the library or from a run, not typed
in by hand, so a schematic cannot drift from the code it explains; ``tests/test_schematics.py``
holds each one to that.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from mixprec import plots

__all__ = ["box", "arrow", "canvas"]


def canvas(width: float, height: float):
    """A blank figure with data coordinates in inches (0..width, 0..height), no axes drawn."""
    plots.setup()
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    return fig, ax


def box(ax, x: float, y: float, w: float, h: float, text: str, color: str = "#dddddd", **text_kw):
    """A rounded box with its lower-left corner at (x, y) and centred text; returns its centre."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                                facecolor=color, edgecolor="#333333", linewidth=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=text_kw.pop("fontsize", 8), **text_kw)
    return x + w / 2, y + h / 2


def arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str = "", color: str = "#333333"):
    """An arrow from start to end, with an optional label at its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, color=color, linewidth=0.9))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, text, fontsize=7, ha="center", va="bottom", color=color)
