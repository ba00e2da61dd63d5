"""One plotting style for the whole book, with Chinese labels when a CJK font exists.

Call ``setup()`` once per chapter. Write every label as ``label("中文", "English")``: with a CJK
font installed (CI and Colab install Noto Sans CJK) it gives the Chinese text, otherwise the English
one, so a figure never shows missing-glyph boxes. A "Glyph ... missing" warning is turned into an
error, so a label that slips through fails the build instead of rendering as boxes.
"""

from __future__ import annotations

import warnings

import matplotlib
import torch
from matplotlib import font_manager

CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
)
# One colour per format, used by every figure in the book.
FORMAT_COLORS = {
    "fp64": "#6b6b6b",
    "fp32": "#1f77b4",
    "tf32": "#17becf",
    "fp16": "#d62728",
    "bf16": "#2ca02c",
    "e4m3fn": "#9467bd",
    "e5m2": "#ff7f0e",
}

_cjk_font: str | None = None
_ready = False


def find_cjk_font() -> str | None:
    """Name of an installed font with Chinese glyphs, or None.

    A font installed after matplotlib built its font list (a notebook's setup cell installing
    fonts-noto-cjk, say) is not in that list yet: look for its file and add it.
    """
    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in CJK_FONTS if name in installed), None)
    if found is None:
        for path in font_manager.findSystemFonts():
            if any(key in path for key in ("NotoSansCJK", "SourceHanSans", "wqy-")):
                font_manager.fontManager.addfont(path)
        installed = {f.name for f in font_manager.fontManager.ttflist}
        found = next((name for name in CJK_FONTS if name in installed), None)
    return found


def setup(force_english: bool = False) -> str | None:
    """Apply the book's style; return the CJK font in use (None: labels fall back to English)."""
    global _cjk_font, _ready
    _cjk_font = None if force_english else find_cjk_font()
    matplotlib.rcParams.update(
        {
            "figure.figsize": (7.0, 3.6),
            "figure.dpi": 110,
            "savefig.dpi": 110,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
            # DejaVu draws Latin, digits and math; the CJK font is the per-glyph fallback.
            "font.family": ["DejaVu Sans"] + ([_cjk_font] if _cjk_font else []),
            "axes.unicode_minus": True,
        }
    )
    warnings.filterwarnings("error", message=r"Glyph .* missing from")
    _ready = True
    return _cjk_font


def has_cjk() -> bool:
    if not _ready:
        setup()
    return _cjk_font is not None


def label(zh: str, en: str) -> str:
    """The Chinese text when a CJK font is available, otherwise the English text."""
    return zh if has_cjk() else en


def color(fmt_name: str) -> str:
    return FORMAT_COLORS.get(fmt_name, "#333333")


# --- figures of formats, reused by several chapters ------------------------------------------------

def bit_layout(formats, ax=None):
    """Sign, exponent and mantissa fields of each format as coloured boxes, one row per format."""
    import matplotlib.pyplot as plt

    from .formats import get_format

    formats = [get_format(f) for f in formats]
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.5 * len(formats) + 0.8))
    colours = {"s": "#e6a0a0", "e": "#9fbbe6", "m": "#a8d8a0"}
    for row, f in enumerate(formats):
        y = len(formats) - 1 - row
        fields = [("s", 1), ("e", f.exponent_bits), ("m", f.mantissa_bits)]
        x = 0
        for key, width in fields:
            if width == 0:
                continue
            ax.add_patch(plt.Rectangle((x, y + 0.1), width, 0.8, facecolor=colours[key], edgecolor="white", linewidth=0.6))
            if width >= 2:
                ax.text(x + width / 2, y + 0.5, str(width), ha="center", va="center", fontsize=9)
            x += width
        ax.text(-0.8, y + 0.5, f.name, ha="right", va="center", fontsize=10, fontweight="bold")
    ax.set_xlim(-7, max(f.bits for f in formats) + 1)
    ax.set_ylim(0, len(formats))
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[k]) for k in "sem"]
    ax.legend(handles, [label("符号", "sign"), label("指数", "exponent"), label("尾数", "mantissa")],
              loc="lower right", ncol=3, fontsize=9, bbox_to_anchor=(1.0, -0.15))
    return ax


def value_grid(fmt, ax=None, flush_subnormals: bool = False, y: float = 0.0, color: str = "#1f5fbf"):
    """Every non-negative finite value of a small format on a number line; subnormals in orange."""
    import matplotlib.pyplot as plt

    from .formats import decode_all, get_format

    fmt = get_format(fmt)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 1.6))
    v = decode_all(fmt)
    v = v[torch.isfinite(v) & (v >= 0)].unique()
    sub = (v > 0) & (v < fmt.min_normal)
    if flush_subnormals:
        v, sub = v[~sub], sub[~sub]
    ax.plot(v[~sub], [y] * int((~sub).sum()), "|", markersize=14, color=color)
    ax.plot(v[sub], [y] * int(sub.sum()), "|", markersize=14, color="#e67e22")
    return ax



def triage_chart(steps: list[tuple[str, str]], ax=None, no_label: str = "否", yes_label: str = "是"):
    """A decision chain as a flow chart: each (question, action) is a box; "yes" goes right to the
    action, "no" goes down to the next question."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    n = len(steps)
    if ax is None:
        _, ax = plt.subplots(figsize=(9.5, 1.05 * n + 0.3))
    box = dict(boxstyle="round,pad=0.02,rounding_size=0.12", linewidth=1.0)
    for i, (question, action) in enumerate(steps):
        y = n - 1 - i
        ax.add_patch(FancyBboxPatch((0.0, y + 0.15), 4.4, 0.6, facecolor="#e8f0fb", edgecolor="#1f5fbf", **box))
        ax.text(2.2, y + 0.45, question, ha="center", va="center", fontsize=9.5)
        ax.add_patch(FancyBboxPatch((5.6, y + 0.15), 4.6, 0.6, facecolor="#eaf6ea", edgecolor="#2ca02c", **box))
        ax.text(7.9, y + 0.45, action, ha="center", va="center", fontsize=9.5)
        ax.annotate("", xy=(5.45, y + 0.45), xytext=(4.55, y + 0.45), arrowprops=dict(arrowstyle="->", color="#2ca02c"))
        ax.text(5.0, y + 0.55, yes_label, ha="center", fontsize=8.5, color="#2ca02c")
        if i < n - 1:
            ax.annotate("", xy=(2.2, y - 0.23), xytext=(2.2, y + 0.13), arrowprops=dict(arrowstyle="->", color="#1f5fbf"))
            ax.text(2.35, y - 0.05, no_label, fontsize=8.5, color="#1f5fbf", va="center")
    ax.set_xlim(-0.3, 10.5)
    ax.set_ylim(-0.2, n)
    ax.axis("off")
    return ax


ZONE_COLORS = {"flushed": "#c0392b", "subnormal": "#e67e22", "normal": "#2e8b3a", "overflow": "#7d3c98"}


def shade_zones(ax, fmt="fp16", left: float = -48.0, right: float = 20.0, normal: bool = True):
    """Shade a log2|x| axis with the format's zones (``mixprec.formats.zone_edges``): flushed to zero,
    subnormal, normal (optional), overflow."""
    from .formats import get_format, zone_edges

    fmt = get_format(fmt)
    edges = zone_edges(fmt)
    spans = {
        "flushed": (left, edges["flushed_below"], label(f"{fmt.name} 中下溢为零", f"underflows to 0 in {fmt.name}")),
        "subnormal": (edges["flushed_below"], edges["normal_from"], label("次正规数", "subnormal")),
        "normal": (edges["normal_from"], edges["overflow_from"], label("正规数", "normal")),
        "overflow": (edges["overflow_from"], right, label("上溢", "overflow")),
    }
    for name, (lo, hi, text) in spans.items():
        if (name != "normal" or normal) and hi > lo:
            ax.axvspan(lo, hi, color=ZONE_COLORS[name], alpha=0.12, label=text)
    return ax


def training_curves(histories: dict, ax=None, smooth: int = 1, field: str = "loss", title: str | None = None):
    """One line per run (``{label: TrainHistory}``) of a per-step field, optionally a ``smooth``-step running mean."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.4))
    for name, h in histories.items():
        values = torch.tensor(getattr(h, field), dtype=torch.float64)
        if smooth > 1 and values.numel() >= smooth:
            kernel = torch.ones(smooth, dtype=torch.float64) / smooth
            values = torch.nn.functional.conv1d(values.view(1, 1, -1), kernel.view(1, 1, -1)).flatten()
            steps = range(smooth - 1, smooth - 1 + values.numel())
        else:
            steps = range(values.numel())
        ax.plot(list(steps), values.tolist(), lw=1, label=name)
    default = label(f"训练损失（{smooth} 步滑动平均）", f"training loss ({smooth}-step mean)") if smooth > 1 else label("训练损失", "training loss")
    ax.set(xlabel=label("步", "step"), title=default if title is None else title)
    ax.legend(fontsize=8)
    return ax
