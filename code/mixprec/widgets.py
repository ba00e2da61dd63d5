"""Interactive explorers that work on the static page (no kernel, no network) and in Jupyter/Colab.

Each explorer is one HTML output with its JavaScript inlined, so the built book, a downloaded
notebook and Colab all show the same working widget.
"""

from __future__ import annotations

import html
import json
import math
import re
import uuid
from importlib import resources

from .formats import ZONES, FloatFormat, get_format, torch_overflow_convention, zone_edges, zone_index
from .notebook import markdown_table

DEFAULT_FORMATS = ("fp32", "tf32", "fp16", "bf16", "e4m3fn", "e5m2")

_STYLE = """
#{id} {{ font-family: system-ui, sans-serif; margin: 0.5em 0 1em; }}
#{id} input {{ font: 1.05em monospace; padding: 4px 8px; width: 16em; }}
#{id} .mp-scroll {{ overflow-x: auto; max-width: 100%; }}
#{id} table {{ border-collapse: collapse; margin-top: 0.5em; font-size: 0.85em; }}
#{id} th, #{id} td {{ padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; white-space: nowrap; }}
#{id} .mp-bits span {{ cursor: pointer; font-family: monospace; font-size: 1em; padding: 0; }}
#{id} .mp-bits span:hover {{ outline: 1px solid #333; }}
#{id} .mp-s {{ color: #c0392b; }} #{id} .mp-e {{ color: #1f5fbf; }} #{id} .mp-m {{ color: #2e8b3a; }}
#{id} .mp-status {{ color: #555; font-size: 0.9em; margin-left: 0.8em; }}
#{id} .mp-name {{ font-weight: 600; }}
"""


_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character: CommonMark lets each be escaped


def escape_markdown(text: str) -> str:
    """``text`` shown literally in Markdown: every ASCII punctuation backslash-escaped (no markup, HTML or
    entity survives) and line breaks made spaces (no new block starts)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def script_json(data) -> str:
    """``data`` as JSON that is safe inside an inline ``<script>``: no ``</script>``, ``<!--`` or line separators can
    end the script early or start markup, whatever strings (format names...) the data holds. Non-finite numbers are refused."""
    text = json.dumps(data, allow_nan=False, ensure_ascii=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def _script(filename: str) -> str:
    """One of the explorers' JavaScript files, as shipped in the package."""
    return resources.files("mixprec").joinpath(filename).read_text(encoding="utf-8")


def explorer_script() -> str:
    """The format explorer's JavaScript."""
    return _script("format_explorer.js")


def format_spec(fmt: FloatFormat) -> dict:
    """What the JavaScript needs to know about a format; overflow follows the installed torch's CPU cast."""
    return {
        "name": fmt.name,
        "E": fmt.exponent_bits,
        "M": fmt.mantissa_bits,
        "bias": fmt.bias,
        "emin": fmt.emin,
        "special": fmt.special,
        "max": fmt.max,
        "minNormal": fmt.min_normal,
        "overflow": "saturate" if not fmt.has_nan else torch_overflow_convention(fmt, "cpu"),
    }


class FormatExplorer:
    """Type a number; see its bits, rounded value and error in every format; click bits to flip them."""

    def __init__(self, value: str = "0.1", formats: tuple[str, ...] = DEFAULT_FORMATS):
        if not formats:
            raise ValueError("formats must name at least one format")
        self.formats = [get_format(f) for f in formats]
        for f in self.formats:
            if not f.signed or not f.subnormals:
                raise ValueError(f"the explorer shows signed formats with subnormals; {f.name} is not one (E8M0, UE4M3 are scale formats)")
        self.value = str(value)
        self.id = "mp-" + uuid.uuid4().hex[:10]

    def _repr_markdown_(self) -> str:  # print editions (PDF): no JavaScript there
        names = ", ".join(escape_markdown(f.name) for f in self.formats)
        return f"*（交互式格式浏览器，比较 {names}：请在网页版或 Colab 中使用。）*"

    def _repr_html_(self) -> str:
        specs = script_json([format_spec(f) for f in self.formats])
        header = "".join(f"<th>{h}</th>" for h in ("格式", "位（符号 指数 尾数）", "存储的值", "类别", "绝对误差", "相对误差"))
        return (
            f'<div id="{self.id}" class="mixprec-explorer">'
            f"<style>{_STYLE.format(id=self.id)}</style>"
            f'<label>输入一个数：<input type="text" value="{html.escape(self.value)}" spellcheck="false"></label>'
            '<span class="mp-status"></span>'
            f'<div class="mp-scroll"><table><thead><tr>{header}</tr></thead><tbody></tbody></table></div>'
            f"<script>{explorer_script()}\n"
            f'MixprecFloat.mount(document.getElementById("{self.id}"), {specs});</script>'
            "</div>"
        )


def format_explorer(value: str = "0.1", formats: tuple[str, ...] = DEFAULT_FORMATS) -> FormatExplorer:
    """The float-format explorer, ready to be displayed as a cell's output."""
    return FormatExplorer(value, formats)


# --- loss-scale explorer --------------------------------------------------------------------------


def scale_explorer_script() -> str:
    """The loss-scale explorer's JavaScript."""
    return _script("scale_explorer.js")


SLIDER_LOG2 = (-8, 32)  # the loss-scale explorer's slider: log2(S) from -8 to 32
ZONE_NAMES = {"zero": "本来就是 0", "flushed": "下溢为零", "subnormal": "次正规数（有效位减少）", "normal": "正规数", "overflow": "上溢（inf/NaN）"}


def exact_zones_at_powers_of_two(values, fmt, log2_scales) -> list[dict[str, float]]:
    """``zone_fractions(values, 2**k, fmt)`` for every k, exact on the zones' edges (2**-25 ties to 0,
    65520 overflows in FP16), without rounding every value once per k.

    A value's zone never goes down as its magnitude grows, so after one sort each zone boundary is
    found by bisection, classifying one value per step with ``zone_index`` itself.
    """
    import torch

    v = torch.as_tensor(values).detach().flatten()
    v = v if v.dtype == torch.float64 else v.float()
    finite = torch.isfinite(v)
    a = v[finite].abs().sort().values
    scales = torch.tensor([2.0**k for k in log2_scales], dtype=a.dtype)[:, None].expand(-1, len(ZONES) - 1)
    rank = torch.arange(1, len(ZONES))[None, :].expand_as(scales)  # boundary r: the first value of zone >= r
    lo, hi = torch.zeros_like(rank), torch.full_like(rank, a.numel())
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        below = zone_index(a[mid.clamp(max=max(a.numel() - 1, 0))], scales, fmt) < rank
        open_ = lo < hi
        lo = torch.where(open_ & below, mid + 1, lo)
        hi = torch.where(open_ & ~below, mid, hi)
    n, nonfinite = max(v.numel(), 1), int((~finite).sum())  # inf and NaN overflow at every scale
    out = []
    for first in lo.tolist():
        counts = [b - a_ for a_, b in zip([0] + first, first + [a.numel()])]
        counts[-1] += nonfinite
        out.append({name: c / n for name, c in zip(ZONES, counts)})
    return out


def scale_histogram(values, fmt: str | FloatFormat = "fp16", width: float = 0.25) -> dict:
    """What the loss-scale explorer needs: a histogram of log2|values| with bins aligned to powers of
    two (to draw), and the exact zone fractions at every power-of-two scale of the slider (to count)."""

    import torch

    fmt = get_format(fmt)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (width > 0 and math.isfinite(width) and (1 / width).is_integer()):
        raise ValueError(f"width must be 1/k for a whole number k (so bins align with powers of two), got {width!r}")
    edges = zone_edges(fmt)
    try:
        v = torch.as_tensor(values).detach().flatten()
    except (TypeError, RuntimeError, ValueError) as error:
        raise TypeError(f"values must be numbers (a tensor, an array or a list of floats): {error}") from None
    if v.is_complex() or not (v.is_floating_point() or v.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"values must be real numbers, got a {v.dtype} tensor")
    v = (v if v.dtype == torch.float64 else v.float()).abs()
    if v.numel() == 0:
        raise ValueError("values is empty: the loss-scale explorer needs at least one recorded value")
    finite = torch.isfinite(v)
    nonzero = v[finite & (v > 0)]
    bins = torch.floor(torch.log2(nonzero) / width).long()
    first = int(bins.min()) if bins.numel() else 0
    counts = torch.bincount(bins - first).tolist() if bins.numel() else []
    zones = exact_zones_at_powers_of_two(v, fmt, range(SLIDER_LOG2[0], SLIDER_LOG2[1] + 1))
    return {
        "zonesFrom": SLIDER_LOG2[0], "zones": zones, "names": ZONE_NAMES,
        "lo": first * width, "width": width, "counts": counts, "zeros": int((v == 0).sum()), "total": int(v.numel()),
        "nonfinite": int((~finite).sum()),  # inf or NaN already: they overflow at every scale, as zone_fractions counts them
        "fmt": {"name": fmt.name, "flushBelow": edges["flushed_below"], "minNormal": edges["normal_from"],
                "overflowAt": edges["overflow_from"]},
    }


class LossScaleExplorer:
    """Slide the loss scale; watch a recorded gradient histogram move through the format's zones."""

    def __init__(self, values, fmt: str | FloatFormat = "fp16", initial_log2_scale: int = 0):
        self.data = scale_histogram(values, fmt)
        if isinstance(initial_log2_scale, bool) or not isinstance(initial_log2_scale, int) or not SLIDER_LOG2[0] <= initial_log2_scale <= SLIDER_LOG2[1]:
            raise ValueError(f"initial_log2_scale must be an integer in {SLIDER_LOG2[0]}..{SLIDER_LOG2[1]} (the slider's range), got {initial_log2_scale!r}")
        self.initial = initial_log2_scale
        self.id = "ms-" + uuid.uuid4().hex[:10]

    def _repr_markdown_(self) -> str:  # print editions (PDF): no JavaScript there, so the table at the first scale
        zones = self.data["zones"][self.initial - self.data["zonesFrom"]]
        table = markdown_table(["区域", "比例"], [[ZONE_NAMES[k], f"{100 * v:.2f}%"] for k, v in zones.items()])
        return (f"*交互式损失缩放浏览器（格式 {escape_markdown(self.data['fmt']['name'])}）在网页版和 Colab 中可以拖动 S；"
                f"印刷版给出 S = 2^{self.initial} 时的结果：*\n\n{table}")

    def _repr_html_(self) -> str:
        style = (f"#{self.id} {{ font-family: system-ui, sans-serif; margin: 0.5em 0 1em; }} "
                 f"#{self.id} input {{ width: 22em; vertical-align: middle; }} "
                 f"#{self.id} table {{ border-collapse: collapse; font-size: 0.9em; }} "
                 f"#{self.id} td {{ padding: 2px 12px; border-bottom: 1px solid #ddd; }}")
        return (
            f'<div id="{self.id}" class="mixprec-explorer"><style>{style}</style>'
            f'<label>损失缩放因子 log₂(S)：<input type="range" min="{SLIDER_LOG2[0]}" max="{SLIDER_LOG2[1]}" step="1"></label> '
            '<span class="ms-scale" style="font-family: monospace"></span>'
            f'<div class="ms-plot"></div><table><tbody></tbody></table>'
            f"<script>{scale_explorer_script()}\n"
            f'MixprecScale.mount(document.getElementById("{self.id}"), {script_json(self.data)}, {self.initial});</script>'
            "</div>"
        )


# --- memory calculator ----------------------------------------------------------------------------


MAX_MILLIONS = 1e9  # 10**15 parameters: far beyond any model, and still exact in the page's arithmetic
AMP_CHAPTER_POLICIES = ("fp32", "fp16-amp", "bf16-amp", "fp16-master", "bf16-master", "bf16-pure")  # those chapter 3 introduces
MEMORY_LIMIT_GIB = 80  # one A100 or H100 80GB


class MemoryCalculator:
    """Type a parameter count, a batch size and a sequence length; see weights, gradients, optimizer state,
    autocast's weight cache and the saved activations per policy, against an 80 GB card.

    ``policies``: the rows (default: the policies chapter 3 introduces). ``activations=False`` leaves the
    activations out (model state only, no batch or sequence inputs). Activation bytes per token come from
    ``mixprec.amp.activation_coefficients`` (measured on small GPT-2s when the calculator is built) and are scaled
    to a GPT-2 of the typed size with GPT-2 small's proportions (``mixprec.amp.gpt2_shape``).
    """

    def __init__(self, millions: float = 124.4, batch: int = 8, seq: int = 1024, policies: tuple[str, ...] = AMP_CHAPTER_POLICIES,
                 activations: bool = True):
        from .amp import BYTES_PER_PARAMETER, get_policy
        from .amp_schematics import activation_coefficients

        if isinstance(millions, bool) or not isinstance(millions, (int, float)) or not (math.isfinite(millions) and 0 <= millions <= MAX_MILLIONS):
            raise ValueError(f"millions must be a number of millions of parameters in 0..{MAX_MILLIONS:g}, got {millions!r}")
        for name, value in (("batch", batch), ("seq", seq)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        unknown = [p for p in policies if p not in BYTES_PER_PARAMETER]
        if not policies or unknown:
            raise ValueError(f"policies must name memory policies ({', '.join(BYTES_PER_PARAMETER)}); unknown: {unknown}")
        self.table = {p: BYTES_PER_PARAMETER[p] for p in policies}
        self.activations = {p: activation_coefficients(get_policy(p)) for p in policies} if activations else None
        self.millions, self.batch, self.seq = float(millions), batch, seq
        self.id = "mm-" + uuid.uuid4().hex[:10]

    def _repr_markdown_(self) -> str:  # print editions (PDF): no JavaScript there
        return f"*（交互式显存计算器，{self.millions:g} M 参数：请在网页版或 Colab 中使用。）*"

    def _repr_html_(self) -> str:
        script = _script("memory_calculator.js")
        parts = (("#1f5fbf", "权重"), ("#e67e22", "梯度"), ("#7d3c98", "优化器状态"), ("#95a5a6", "autocast 权重缓存"))
        legend = " ".join(f'<span style="color:{c}">■</span> {n}' for c, n in parts + ((("#2e8b3a", "激活"),) if self.activations else ()))
        legend += f' <span style="color:#c0392b">┆</span> {MEMORY_LIMIT_GIB} GB 显存' if self.activations else ""
        i = f"#{self.id}"
        style = (f"{i} {{ font-family: system-ui, sans-serif; margin: 0.5em 0 1em; }} {i} input {{ width: 7em; margin-right: 0.8em; }} "
                 f"{i} .mp-scroll {{ overflow-x: auto; max-width: 100%; }} "
                 f"{i} table {{ border-collapse: collapse; width: 100%; font-size: 0.9em; margin-top: 0.5em; }} "
                 f"{i} td, {i} th {{ padding: 3px 8px; border-bottom: 1px solid #ddd; white-space: nowrap; text-align: left; }} "
                 f"{i} .mm-shape {{ color: #666; font-size: 0.85em; }} "
                 f"html[data-theme=dark] {i} code {{ color: #e6e6e6; background: transparent; }} "
                 f"html[data-theme=dark] {i} td, html[data-theme=dark] {i} th {{ border-bottom-color: #555; }} "
                 f"html[data-theme=dark] {i} .mm-shape {{ color: #aaa; }}")
        inputs = '<label>参数量（百万）：<input type="number" min="0" step="any"></label>'
        if self.activations:
            inputs += ('<label>批大小：<input class="mm-batch" type="number" min="1" step="1"></label>'
                       '<label>序列长度：<input class="mm-seq" type="number" min="1" step="1"></label>'
                       '<div class="mm-shape"></div>')
        header = "".join(f"<th>{h}</th>" for h in ("策略", "权重+梯度+状态", "激活", "合计", ""))
        return (
            f'<div id="{self.id}" class="mixprec-explorer"><style>{style}</style>{inputs}'
            f'<div style="font-size:0.85em;margin-top:0.3em">{legend}</div>'
            f'<div class="mp-scroll"><table><thead><tr>{header}</tr></thead><tbody></tbody></table></div>'
            f"<script>{script}\nMixprecMemory.mount(document.getElementById(\"{self.id}\"), {script_json(self.table)}, "
            f"{script_json(self.millions)}, {script_json(MAX_MILLIONS)}, {script_json(self.activations)}, {self.batch}, {self.seq}, "
            f"{MEMORY_LIMIT_GIB});</script>"
            "</div>"
        )


# --- FP8 scaling explorer -------------------------------------------------------------------------


def _fp8_schemes() -> dict:
    from . import fp8

    return {  # label → (quantizer(t, fmt), values per scale for a tensor t): chapter 5's granularities, coarse to fine
        "按张量": (lambda t, f: fp8.quantize_tensorwise(t, f), lambda t: t.numel()),
        "128×128 块": (lambda t, f: fp8.quantize_blockwise(t, (128, 128), f), lambda t: 128 * 128),
        "按行": (lambda t, f: fp8.quantize_rowwise(t, f), lambda t: t.shape[-1]),
        "1×32 块": (lambda t, f: fp8.quantize_blockwise(t, (1, 32), f), lambda t: 32),
        "MX（32 个一块，2 的幂）": (lambda t, f: fp8.quantize_mx(t, f), lambda t: 32),
    }


FP8_EXPLORER_FORMATS = ("e4m3fn", "e5m2")
OUTLIER_FACTORS = (1, 10, 100, 1000, 10000)


def fp8_scaling_outcomes(x, channel: int = 0, width: float = 0.25) -> dict:
    """What the FP8 scaling explorer shows, computed exactly with ``mixprec.fp8``: for every scheme, format
    and outlier factor (column ``channel`` of the 2-D tensor ``x`` multiplied by it), a histogram of
    log2|x·s| over the nonzero values, the number of scales, the relative error of the whole tensor and of
    the other columns, and the shares of nonzero values flushed to zero, stored as subnormals, and clipped."""
    import torch

    from .debug import relative_error

    x = torch.as_tensor(x).detach().float()
    if x.dim() != 2 or x.shape[0] % 128 or x.shape[1] % 128 or not bool(torch.isfinite(x).all()) or not bool((x != 0).any()):
        raise ValueError(f"x must be a finite 2-D tensor with a nonzero value, its rows and columns multiples of 128, got shape {tuple(x.shape)}")
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < x.shape[1]:
        raise ValueError(f"channel must be a column index in 0..{x.shape[1] - 1}, got {channel!r}")
    rest = torch.ones(x.shape[1], dtype=torch.bool)
    rest[channel] = False
    results, logs = [], []
    for quantize, group in _fp8_schemes().values():
        per_format = []
        for name in FP8_EXPLORER_FORMATS:
            fmt = get_format(name)
            per_factor = []
            for factor in OUTLIER_FACTORS:
                t = x.clone()
                t[:, channel] *= factor
                q = quantize(t, fmt)
                nonzero = t != 0
                zone = zone_index(t, q.scale, fmt)[nonzero]
                n = int(nonzero.sum())
                logs.append(torch.log2((t * q.scale).abs()[nonzero]))
                per_factor.append({
                    "scales": t.numel() // group(t),
                    "error": relative_error(q.dequantize(), t), "errorRest": relative_error(q.dequantize()[:, rest], t[:, rest]),
                    "flushed": int((zone == ZONES.index("flushed")).sum()) / n,
                    "subnormal": int((zone == ZONES.index("subnormal")).sum()) / n,
                    "clipped": int((zone == ZONES.index("overflow")).sum()) / n,
                })
            per_format.append(per_factor)
        results.append(per_format)
    lo = math.floor(min(float(v.min()) for v in logs) / width) * width
    bins = math.ceil((max(float(v.max()) for v in logs) + 2 - lo) / width)
    counts = iter(torch.bincount(((v - lo) / width).floor().long(), minlength=bins).tolist() for v in logs)
    for per_format in results:
        for per_factor in per_format:
            for outcome in per_factor:
                outcome["counts"] = next(counts)
    formats = [{"name": get_format(n).name, "flushBelow": zone_edges(n)["flushed_below"], "minNormal": zone_edges(n)["normal_from"],
                "maxLog2": math.log2(get_format(n).max)} for n in FP8_EXPLORER_FORMATS]
    return {"schemes": list(_fp8_schemes()), "formats": formats, "factors": list(OUTLIER_FACTORS), "lo": lo, "width": width,
            "bins": bins, "outcomes": results}


class Fp8ScalingExplorer:
    """Choose a scaling scheme, an FP8 format and an outlier channel's size; see where the scaled values
    land in the format and what quantization costs (all outcomes precomputed in Python, exactly)."""

    def __init__(self, x, channel: int = 0, initial: tuple[int, int, int] = (0, 0, 3)):
        self.data = fp8_scaling_outcomes(x, channel)
        sizes = (len(self.data["schemes"]), len(self.data["formats"]), len(self.data["factors"]))
        if (not isinstance(initial, tuple) or len(initial) != 3
                or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i, n in zip(initial, sizes))):
            raise ValueError(f"initial must be (scheme, format, factor) indices below {sizes}, got {initial!r}")
        self.initial = initial
        self.id = "mf-" + uuid.uuid4().hex[:10]

    def _repr_markdown_(self) -> str:  # print editions (PDF): the table for every scheme at the initial format and factor
        _, f, k = self.initial
        d = self.data
        rows = [[name, f"{o['error']:.2%}", f"{o['errorRest']:.2%}", f"{o['flushed']:.2%}", f"{o['clipped']:.2%}"]
                for name, o in zip(d["schemes"], (per_format[f][k] for per_format in d["outcomes"]))]
        table = markdown_table(["方案", "相对误差", "异常通道以外的相对误差", "下溢为零", "被截断"], rows)
        return (f"*交互式 FP8 缩放浏览器在网页版和 Colab 中可以切换方案、格式和异常值大小；印刷版给出 "
                f"{escape_markdown(d['formats'][f]['name'])}、异常通道放大 {d['factors'][k]} 倍时的结果：*\n\n{table}")

    def _repr_html_(self) -> str:
        i = f"#{self.id}"
        style = (f"{i} {{ font-family: system-ui, sans-serif; margin: 0.5em 0 1em; }} {i} select {{ margin: 0 1em 0.3em 0.3em; }} "
                 f"{i} table {{ border-collapse: collapse; font-size: 0.9em; }} "
                 f"{i} td {{ padding: 2px 12px; border-bottom: 1px solid #ddd; white-space: nowrap; }}")
        controls = "".join(f"<label>{label}<select></select></label>" for label in ("缩放方案：", "格式：", "异常通道放大："))
        return (
            f'<div id="{self.id}" class="mixprec-explorer"><style>{style}</style>{controls}'
            '<div class="mf-plot"></div><table><tbody></tbody></table>'
            f"<script>{_script('fp8_explorer.js')}\n"
            f'MixprecFp8.mount(document.getElementById("{self.id}"), {script_json(self.data)}, {script_json(list(self.initial))});</script>'
            "</div>"
        )
