import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from mixprec import plots  # noqa: E402


def test_chinese_labels_render_without_missing_glyphs():
    font = plots.setup()
    if font is None:
        pytest.skip("no CJK font installed (CI installs fonts-noto-cjk)")
    fig, ax = plt.subplots()
    ax.set_title(plots.label("次正规数与尾数", "subnormals"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.canvas.draw()
    plt.close(fig)


def test_english_fallback_and_missing_glyph_is_an_error():
    plots.setup(force_english=True)
    assert plots.label("中文", "English") == "English"
    fig, ax = plt.subplots()
    ax.set_title("次正规数")  # a label that bypassed label(): must fail loudly, not draw boxes
    with pytest.raises(UserWarning, match="Glyph"):
        fig.canvas.draw()
    plt.close(fig)
    plots.setup()
