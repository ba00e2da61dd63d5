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


# --- chapter 5 (FP8): scaling granularity and the operands of an FP8 linear layer ---------------------

GRANULARITY_SCALE_DOWN = 16  # the granularity grid draws 1×128 as 1×8, 128×128 as 8×8 and MX-32 as 1×2


def _granularity_schemes(scale_down: int = GRANULARITY_SCALE_DOWN):
    """(title, CastConfig) for each scheme the grid shows, the block ones read from the recipes and scaled down."""
    import dataclasses

    from .fp8 import CastConfig, Float8LinearConfig

    block = Float8LinearConfig.from_recipe_name("blockwise")
    mx = Float8LinearConfig.from_recipe_name("mxfp8").cast_config_input
    row = Float8LinearConfig.from_recipe_name("rowwise").cast_config_input
    tensor = Float8LinearConfig.from_recipe_name("tensorwise").cast_config_input

    def shrink(config: CastConfig) -> CastConfig:
        r, k = config.block
        return dataclasses.replace(config, block=(max(r // scale_down, 1), max(k // scale_down, 1)))

    act, weight, mx_small = shrink(block.cast_config_input), shrink(block.cast_config_weight), shrink(mx)
    return [
        (plots.label("按张量（tensorwise）", "tensorwise"), tensor),
        (plots.label("按行（rowwise）", "rowwise"), row),
        (plots.label(f"1×{block.cast_config_input.block[1]} 块（画作 1×{act.block[1]}）",
                     f"1×{block.cast_config_input.block[1]} blocks (drawn 1×{act.block[1]})"), act),
        (plots.label(f"{weight.block[0] * scale_down}×{weight.block[1] * scale_down} 块（画作 {weight.block[0]}×{weight.block[1]}）",
                     f"{weight.block[0] * scale_down}×{weight.block[1] * scale_down} blocks (drawn {weight.block[0]}×{weight.block[1]})"), weight),
        (plots.label(f"MX：{mx.block[1]} 个一块，2 的幂（画作 1×{mx_small.block[1]}）",
                     f"MX: {mx.block[1]} per block, power of two (drawn 1×{mx_small.block[1]})"), mx_small),
    ]


def scale_groups(config, x):
    """Which elements of ``x`` (2-D, K along the last dimension) share one scale under ``config``, read from
    the library's own scale computation: element j belongs to element i's group when making x[i] a thousand
    times larger changes the scale x[j] is quantized with. Returns a tensor of group ids (0, 1, ... in
    reading order), one per element."""
    import torch

    def scales(t):
        q = config.quantize(t, 1)
        return q.scale.expand_as(t)

    base = scales(x)
    ids = torch.full(x.shape, -1, dtype=torch.long)
    next_id = 0
    for flat in range(x.numel()):
        i, j = divmod(flat, x.shape[1])
        if ids[i, j] >= 0:
            continue
        bumped = x.clone()
        bumped[i, j] *= 1000.0
        changed = scales(bumped) != base
        if (ids[changed] >= 0).any():
            raise AssertionError("scale groups overlap: the scale computation is not a partition")
        ids[changed] = next_id
        next_id += 1
    if (ids < 0).any():
        raise AssertionError("some elements' scale never changed: they belong to no group")
    return ids


def fp8_granularity(rows: int = 8, cols: int = 32, seed: int = 0):
    """A small matrix under each scaling scheme, every group of elements that share one scale in one colour.

    The groups are computed from ``mixprec.fp8``'s scales (``scale_groups``), the block shapes read from the
    ``blockwise`` and ``mxfp8`` recipes and drawn ``GRANULARITY_SCALE_DOWN`` times smaller. The figure's
    ``schematic_data`` maps each panel title to the group-id grid it drew and to the config it used.
    """
    import numpy as np
    import torch
    from matplotlib.patches import Rectangle

    plots.setup()
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(rows, cols, generator=g) + 0.5) * torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    schemes = _granularity_schemes()
    palette = ["#8dd3c7", "#fdb462", "#bebada", "#fb8072", "#80b1d3", "#b3de69", "#fccde5"]  # 7: a row of 16 or 4 groups never repeats a colour vertically
    fig, axes = plt.subplots(3, 2, figsize=(7.4, 4.6))
    data = {}
    for ax, (title, config) in zip(axes.flat, schemes):
        ids = scale_groups(config, x)
        grid = ids.numpy()
        data[title] = {"groups": grid, "config": config}
        for i in range(rows):
            for j in range(cols):
                colour = palette[int(grid[i, j]) % len(palette)]
                ax.add_patch(Rectangle((j, rows - 1 - i), 1, 1, facecolor=colour, edgecolor="white", linewidth=0.3))
        for i in range(rows):  # a dark line wherever two neighbours use different scales
            for j in range(cols):
                y = rows - 1 - i
                if j + 1 < cols and grid[i, j] != grid[i, j + 1]:
                    ax.plot([j + 1, j + 1], [y, y + 1], color="#222222", linewidth=1.1)
                if i + 1 < rows and grid[i, j] != grid[i + 1, j]:
                    ax.plot([j, j + 1], [y, y], color="#222222", linewidth=1.1)
        ax.add_patch(Rectangle((0, 0), cols, rows, fill=False, edgecolor="#222222", linewidth=1.1))
        n = len(np.unique(grid))
        ax.set_title(title + plots.label(f"：{n} 个缩放因子", f": {n} scales"), fontsize=8.5)
        ax.set_xlim(-0.2, cols + 0.2)
        ax.set_ylim(-0.2, rows + 0.2)
        ax.set_aspect("equal")
        ax.set_axis_off()
    legend_ax = axes.flat[-1]
    legend_ax.set_axis_off()
    legend_ax.text(0.02, 0.85, plots.label(f"一个 {rows}×{cols} 的矩阵，每行一个词元，\n内维 K（特征）向右。",
                                            f"a {rows}×{cols} matrix, one token per row,\nreduction dimension K to the right."),
                   fontsize=8, va="top", transform=legend_ax.transAxes)
    legend_ax.text(0.02, 0.45, plots.label(f"同色、由粗线围起的格子共用一个缩放因子；\n块的尺寸缩小了 {GRANULARITY_SCALE_DOWN} 倍。",
                                            f"cells inside one thick outline share one scale;\nblocks drawn {GRANULARITY_SCALE_DOWN}× smaller."),
                   fontsize=8, va="top", transform=legend_ax.transAxes)
    legend_ax.annotate("", xy=(0.75, 0.08), xytext=(0.05, 0.08), xycoords="axes fraction",
                       arrowprops={"arrowstyle": "-|>", "color": "#333333"})
    legend_ax.text(0.4, 0.12, plots.label("内维 K", "K"), fontsize=8, ha="center", transform=legend_ax.transAxes)
    fig.tight_layout()
    fig.schematic_data = data
    return fig


FORMAT_LABELS = {"e4m3fn": "E4M3", "e5m2": "E5M2", None: "BF16"}  # None: the operand stays in high precision (autocast's BF16)
FORMAT_FILL = {"E4M3": "#c7b8e6", "E5M2": "#ffc98f", "BF16": "#b9e3b0"}


def operand_granularity(config) -> str:
    """A CastConfig's granularity and scale rule in a few characters: 张量, 行, 1×128, 128×128, MX32; 2ᵏ for powers of two."""
    if config.fmt is None:
        return plots.label("高精度", "high prec.")
    what = {"tensorwise": plots.label("张量", "tensor"), "axiswise": plots.label("行", "row"),
            "blockwise": f"{config.block[0]}×{config.block[1]}", "mx": f"MX{config.block[1]}"}[config.granularity]
    return what + (", 2ᵏ" if config.scale_mode != "real" else "")


LINEAR_PRODUCTS = (  # (product, its two operands as Float8LinearConfig fields, what each operand is)
    ("output", ("cast_config_input", "cast_config_weight"), ("x", "W")),
    ("grad_input", ("cast_config_grad_output", "cast_config_weight_for_grad_input"), ("∂y", "W")),
    ("grad_weight", ("cast_config_grad_output_for_grad_weight", "cast_config_input_for_grad_weight"), ("∂y", "x")),
)


def fp8_linear_operands(recipes=None):
    """The three matrix products of an FP8 linear layer and the format and scale granularity of each of their
    six operands, per recipe, read from ``mixprec.fp8.Float8LinearConfig.from_recipe_name``.

    The figure's ``schematic_data`` maps (recipe, product, operand index) to the (format, granularity) text drawn.
    """
    from .fp8 import RECIPES, Float8LinearConfig

    recipes = list(recipes or RECIPES)
    name_w, col_w, row_h, head_h = 1.55, 0.97, 0.42, 0.95
    width, height = name_w + 6 * col_w + 0.1, head_h + row_h * len(recipes) + 0.45
    fig, ax = canvas(width, height)
    fig.subplots_adjust(0, 0, 1, 1)
    top = height - 0.05
    titles = {"output": plots.label("前向  y = x·Wᵀ", "forward  y = x·Wᵀ"),
              "grad_input": plots.label("输入梯度  ∂x = ∂y·W", "input grad  ∂x = ∂y·W"),
              "grad_weight": plots.label("权重梯度  ∂W = ∂yᵀ·x", "weight grad  ∂W = ∂yᵀ·x")}
    for p, (product, _, operands) in enumerate(LINEAR_PRODUCTS):
        x0 = name_w + 2 * p * col_w
        box(ax, x0 + 0.04, top - 0.45, 2 * col_w - 0.08, 0.4, titles[product], color="#eeeeee", fontsize=8)
        for o, operand in enumerate(operands):
            ax.text(x0 + (o + 0.5) * col_w, top - 0.68, operand, ha="center", va="center", fontsize=9)
    data = {}
    for r, recipe in enumerate(recipes):
        config = Float8LinearConfig.from_recipe_name(recipe)
        y = top - head_h - (r + 1) * row_h
        ax.text(name_w - 0.08, y + row_h / 2, recipe, ha="right", va="center", fontsize=8, family="monospace")
        for p, (product, fields, _) in enumerate(LINEAR_PRODUCTS):
            for o, field in enumerate(fields):
                cast = getattr(config, field)
                fmt, gran = FORMAT_LABELS[cast.fmt], operand_granularity(cast)
                data[recipe, product, o] = (fmt, gran)
                x0 = name_w + (2 * p + o) * col_w
                box(ax, x0 + 0.04, y + 0.04, col_w - 0.08, row_h - 0.08, f"{fmt}\n{gran}", color=FORMAT_FILL[fmt], fontsize=6.5)
    ax.text(0.05, 0.12, plots.label("每格：元素格式 / 缩放粒度（沿这次乘法的内维 K；2ᵏ：2 的幂缩放因子）。BF16：留在高精度。",
                                    "each cell: element format / scale granularity along the product's K; 2ᵏ: power-of-two scale; BF16: high precision."),
            fontsize=7, va="bottom")
    fig.schematic_data = data
    return fig


# --- chapter 6 (debugging): the clinic model and where each case fails ----------------------------------

CLINIC_STAGES = (  # (module name in clinic.ClinicModel, or "" for the model's own ops, or debug.OUTSIDE; label)
    ("embed", ("词嵌入", "embedding")),
    ("norm", ("手写\nLayerNorm", "hand-written\nLayerNorm")),
    ("attn", ("自注意力\n掩码、softmax", "attention\nmask, softmax")),
    ("", ("平均池化", "mean pool")),
    ("proj", ("线性层", "linear")),
    ("head_norm", ("L2 归一化\n自定义算子", "L2 norm\ncustom op")),
    ("(模型之外)", ("损失", "loss")),
)


def clinic_stage(module: str) -> str:
    """The stage of the clinic model a tracer's module name belongs to ("attn.q" → "attn")."""
    names = [name for name, _ in CLINIC_STAGES]
    if module in names:
        return module
    head = module.split(".")[0]
    if head in names:
        return head
    raise ValueError(f"module {module!r} is in no stage of the clinic model ({', '.join(n or '(model)' for n in names)})")


def clinic_model(failures: dict, titles: dict | None = None):
    """The clinic model as a row of boxes, each case written under the stage where the tracer found its first
    inf or NaN. ``failures`` maps a case name to its ``debug.NonFinite`` (from ``clinic.run_case``);
    ``titles`` maps it to the label drawn (default: the case name). The figure's ``schematic_data`` maps each
    case to the stage it was drawn under."""
    n = len(CLINIC_STAGES)
    width, box_w, gap = 7.4, 0.86, (7.4 - 0.1 - len(CLINIC_STAGES) * 0.86) / (len(CLINIC_STAGES) - 1)
    below = {name: [] for name, _ in CLINIC_STAGES}
    data = {}
    for case, found in failures.items():
        stage = clinic_stage(found.module)
        below[stage].append((case, found))
        data[case] = stage
    rows = max(len(v) for v in below.values()) or 1
    height = 1.2 + 0.62 * rows
    fig, ax = canvas(width, height)
    fig.subplots_adjust(0, 0, 1, 1)
    y = height - 0.95
    for k, (name, (zh, en)) in enumerate(CLINIC_STAGES):
        x = 0.05 + k * (box_w + gap)
        colour = "#f4cccc" if below[name] else "#dde6f3"
        box(ax, x, y, box_w, 0.62, plots.label(zh, en), color=colour, fontsize=7.5)
        if k + 1 < n:
            arrow(ax, (x + box_w, y + 0.31), (x + box_w + gap, y + 0.31))
        for r, (case, found) in enumerate(below[name]):
            cy = y - 0.2 - 0.62 * r
            label = (titles or {}).get(case, case)
            ax.plot([x + box_w / 2], [cy], marker="v", color="#c0392b", markersize=6)
            ax.text(x + box_w / 2, cy - 0.09, f"{label}\n{found.op} → {found.kind}", ha="center", va="top", fontsize=6.5,
                    color="#7b241c")
    ax.text(0.05, height - 0.12, plots.label("红色：追踪器找到第一个 inf 或 NaN 的地方（去掉损失缩放）",
                                             "red: where the tracer found the first inf or NaN (no loss scaling)"),
            fontsize=7.5, va="top")
    fig.schematic_data = data
    return fig


# --- the distributed chapter: who holds what, and what is communicated in which dtype -------------------

_STATE_ZH = {"weights = master": "权重 = 主权重", "weights": "权重", "master": "主权重", "gradients": "梯度", "Adam m, v": "Adam 的 m、v",
             "gathered unit": "计算时聚合的一块", "all": "全量", "1 block": "一个块"}
_COLLECTIVE_ZH = {"all_reduce": ("all-reduce", "梯度", "gradients"), "all_gather": ("all-gather", "权重", "weights"),
                  "reduce_scatter": ("reduce-scatter", "梯度", "gradients")}


def data_parallel(settings=("ddp,fp32", "ddp,fp32,hook=bf16", "fsdp2,bf16-master"), world_size: int = 2):
    """Each setting as a column: what every rank keeps between steps (``distributed.per_rank_state``) and which
    collectives move what, in which dtype (``Setting.communicated_dtypes``), both read from the library.

    ``fig.schematic_data`` maps each setting to {"state": rows, "collectives": {name: dtype}} (for tests)."""
    from .distributed import Setting, per_rank_state

    parsed = [Setting.parse(s) if isinstance(s, str) else s for s in settings]
    if not parsed:
        raise ValueError("settings must name at least one data-parallel setting, e.g. 'ddp,fp32'")
    zh = plots.has_cjk()
    short = {"float32": "FP32", "bfloat16": "BF16", "float16": "FP16"}
    col_w = 2.45
    fig, ax = canvas(col_w * len(parsed) + 0.1, 3.6)
    data = {}
    for i, setting in enumerate(parsed):
        x = 0.1 + i * col_w
        state = per_rank_state(setting, world_size)
        collectives = {k: short[str(v).removeprefix("torch.")] for k, v in setting.communicated_dtypes().items()}
        data[setting.spec] = {"state": state, "collectives": collectives}
        ax.text(x + (col_w - 0.2) / 2, 3.45, setting.spec.replace(",", " · "), ha="center", va="center", fontsize=8.5, fontweight="bold")
        lines = "\n".join(f"{_STATE_ZH.get(what, what) if zh else what}: {dtype}, {_STATE_ZH.get(share, share) if zh else share}"
                          for what, dtype, share in state)
        for rank, y in ((0, 2.2), (1, 0.1)):
            box(ax, x, y, col_w - 0.2, 1.05, f"rank {rank}\n{lines}", color="#eef3fb", fontsize=6.8)
        arrow_x = x + 0.35
        ax.annotate("", xy=(arrow_x, 2.2), xytext=(arrow_x, 1.15), arrowprops={"arrowstyle": "<|-|>", "color": "#333333", "lw": 0.9})
        for j, (kind, dtype) in enumerate(collectives.items()):  # one line per collective, in its dtype's colour
            name, zh_what, en_what = _COLLECTIVE_ZH[kind]
            ax.text(arrow_x + 0.12, 1.675 + 0.11 * (len(collectives) - 1) - 0.22 * j, f"{name} {zh_what if zh else en_what}: {dtype}",
                    ha="left", va="center", fontsize=7, color=plots.color({"BF16": "bf16", "FP16": "fp16"}.get(dtype, "fp32")))
    fig.schematic_data = data
    return fig


# --- FP4 (NVFP4, MXFP4): two-level scaling against one power-of-two scale -------------------------

def fp4_scaling(seed: int = 0):
    """One row of 32 values as NVFP4 (an FP32 tensor scale × one E4M3 scale per 16 × E2M1 values) and as
    MXFP4 (one E8M0 scale per 32 × E2M1 values). Every number drawn is read from ``mixprec.fp4``'s
    quantizers on that row; each cell shows the stored E2M1 value, shaded by its magnitude."""
    import torch

    from .fp4 import quantize_mxfp4, quantize_nvfp4

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 32, generator=g) * torch.cat([torch.full((16,), 0.2), torch.full((16,), 3.0)])  # a quiet and a loud half
    nv, mx = quantize_nvfp4(x), quantize_mxfp4(x)
    fig, ax = canvas(7.4, 3.3)
    cell, left = 0.2, 0.8
    rows = [(plots.label("NVFP4", "NVFP4"), nv, 2.05, 16, "#cfe3f7",
             lambda b: plots.label(f"E4M3 块缩放 {b:g}", f"E4M3 block scale {b:g}")),
            (plots.label("MXFP4", "MXFP4"), mx, 0.45, 32, "#f7dccf",
             lambda b: plots.label(f"E8M0 块缩放 2^{int(torch.log2(torch.tensor(b)).item())}",
                                   f"E8M0 block scale 2^{int(torch.log2(torch.tensor(b)).item())}"))]
    for title, q, y, block, color, scale_text in rows:
        ax.text(0.05, y + cell / 2, title, fontsize=9, fontweight="bold", va="center")
        for j in range(32):
            v = float(q.values[0, j])
            shade = 0.25 + 0.75 * abs(v) / 6
            ax.add_patch(plt.Rectangle((left + j * cell, y), cell, cell, facecolor=plt.cm.Greys(shade * 0.6),
                                       edgecolor="#555555", linewidth=0.4))
            ax.text(left + j * cell + cell / 2, y + cell / 2, f"{v:g}", fontsize=4.2, ha="center", va="center",
                    color="black")
        for start in range(0, 32, block):
            b = float(q.block_scale[0, start])
            box(ax, left + start * cell + 0.05, y + 0.35, block * cell - 0.1, 0.3, scale_text(b), color=color, fontsize=7)
        sqnr = 10 * torch.log10(x.pow(2).sum() / (x - q.dequantize()).pow(2).sum()).item()
        ax.text(left + 32 * cell + 0.1, y + cell / 2, plots.label(f"SQNR {sqnr:.1f} dB", f"SQNR {sqnr:.1f} dB"), fontsize=7, va="center")
    box(ax, left, 3.0 - 0.05, 32 * cell, 0.28,
        plots.label(f"FP32 张量缩放 = amax / (448 × 6) = {float(nv.tensor_scale):.4g}",
                    f"FP32 tensor scale = amax / (448 × 6) = {float(nv.tensor_scale):.4g}"), color="#e8e8e8", fontsize=7)
    ax.text(left, 1.75, plots.label("每格：存储的 E2M1 值（4 位）；数值 = 张量缩放 × 块缩放 × E2M1",
                                    "each cell: the stored E2M1 value (4 bits); number = tensor scale × block scale × E2M1"),
            fontsize=7, color="#333333")
    ax.text(left, 0.15, plots.label("数值 = 块缩放（2 的幂）× E2M1；32 个数共用一个缩放因子",
                                    "number = block scale (a power of two) × E2M1; 32 values share one scale"),
            fontsize=7, color="#333333")
    fig.schematic_data = {"x": x, "nvfp4": nv, "mxfp4": mx}
    return fig
