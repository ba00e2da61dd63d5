"""One plotting style for the whole book, with Chinese labels when a CJK font exists.

Call ``setup()`` once per chapter. Write every label as ``label("中文", "English")``: with a CJK
font installed (CI and Colab install Noto Sans CJK) it gives the Chinese text, otherwise the English
one, so a figure never shows missing-glyph boxes. A "Glyph ... missing" warning is turned into an
error, so a label that slips through fails the build instead of rendering as boxes.
"""

from __future__ import annotations

import warnings

import matplotlib
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
    """Name of an installed font with Chinese glyphs, or None."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


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
