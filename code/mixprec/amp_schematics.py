"""Chapter 3's schematics (one mixed-precision step, memory as batch × sequence grow) and the memory model behind them.

Presentation only (``mixprec.cache.PRESENTATION_ONLY``): nothing here changes a trained artifact. What a figure states
about numerics is read from a run (``trace_step``) or from the library (``memory_breakdown``, measured activations);
tests/test_schematics.py and tests/test_widgets.py hold them to it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from . import plots
from .amp import Policy, get_policy, memory_breakdown, saved_activation_bytes
from .schematics import arrow, box, canvas

# --- activations as batch × sequence grow (chapter 3's memory figure and calculator) --------------------------------

GPT2_VOCAB, GPT2_POSITIONS, GPT2_HEAD_DIM = 50257, 1024, 64


def gpt2_parameters(n_layer: float, n_embd: float, vocab_size: int = GPT2_VOCAB, n_positions: int = GPT2_POSITIONS) -> float:
    """Parameters of a GPT-2 with tied embeddings: 12h² + 13h per block, token and position embeddings, the final LayerNorm."""
    return n_layer * (12 * (n_embd * n_embd) + 13 * n_embd) + (vocab_size + n_positions) * n_embd + 2 * n_embd


def gpt2_shape(n_params: float) -> tuple[float, float]:
    """(layers, width) of the GPT-2-shaped model with ``n_params`` parameters and GPT-2 small's proportions
    (width = 64 × layers; 124.4 M gives 12 × 768). Continuous: an estimate of the shape, not a real model."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gpt2_parameters(mid, GPT2_HEAD_DIM * mid) < n_params else (lo, mid)
    return lo, GPT2_HEAD_DIM * lo


_ACTIVATION_SHAPES = ((1, 64, 64), (2, 64, 64), (1, 128, 64), (1, 64, 128))  # (layers, width, vocabulary)


def activation_coefficients(precision: str | Policy) -> dict[str, float]:
    """Bytes saved for the backward per token of a GPT-2 under ``precision``: ``layer`` per block per unit of width,
    ``width`` per unit of width outside the blocks, ``vocab`` per vocabulary entry (logits and loss), ``token`` a constant.

    Measured with ``saved_activation_bytes`` on four small GPT-2s (heads of 64, as GPT-2's), as the difference of
    a batch of 4 and of 2 sequences of 64 tokens, so that what does not grow with the batch (autocast's weight
    copies, counted in ``bytes_per_parameter``) drops out. ``activation_bytes`` scales them to any GPT-2 shape.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    policy = get_policy(precision)
    if policy.fp8 or policy.round_all is not None or policy.inference_only:
        raise ValueError(f"no activation model for {policy.name!r}: it covers AMP, master-weight and pure policies")
    per_token = []
    for n_layer, width, vocab in _ACTIVATION_SHAPES:
        config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=width, n_layer=n_layer, n_head=width // GPT2_HEAD_DIM,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(policy.param_dtype)
            ids = torch.randint(0, vocab, (4, 64))
        per_token.append((saved_activation_bytes(model, ids, policy) - saved_activation_bytes(model, ids[:2], policy)) / 128)
    (_, h1, v1), base = _ACTIVATION_SHAPES[0], per_token[0]
    layer = (per_token[1] - base) / h1  # one more block of width 64
    vocab = (per_token[3] - base) / v1  # 64 more vocabulary entries
    width = (per_token[2] - base - layer * h1) / h1  # 64 more units of width, in one block and outside it
    return {"layer": layer, "width": width, "vocab": vocab, "token": base - layer * h1 - width * h1 - vocab * v1}


def activation_bytes(coefficients: dict[str, float], n_layer: float, n_embd: float, tokens: int, vocab_size: int = GPT2_VOCAB) -> float:
    """Bytes of saved activations for ``tokens`` tokens (batch × sequence) of a GPT-2 shape, from ``activation_coefficients``."""
    c = coefficients
    return tokens * (c["layer"] * n_layer * n_embd + c["width"] * n_embd + c["vocab"] * vocab_size + c["token"])


# --- chapter 3 (ch-amp): one mixed-precision training step, and memory as batch × sequence grows -------------------

STEP_STAGES = ("master", "working_weight", "input", "activation", "logits", "loss", "scaled_loss", "activation_grad", "grad",
               "unscaled_grad", "clipped_grad", "optimizer_state", "updated")


def _dtype_name(t) -> str:
    from .emulate import held_in

    return str(held_in(t)).removeprefix("torch.")


class _RecordingScaler:
    """A loss scaler that passes every call to ``inner`` (a GradScaler or NoLossScaler) and records dtypes on the way."""

    def __init__(self, inner, seen: dict, params):
        self.inner, self.seen, self.params = inner, seen, params

    def scale(self, loss):
        self.seen["loss"] = _dtype_name(loss)
        self.seen["scale"] = float(self.inner.get_scale()) if self.is_enabled() else None
        out = self.inner.scale(loss)
        self.seen["scaled_loss"] = _dtype_name(out)
        return out

    def unscale_(self, optimizer):
        self.inner.unscale_(optimizer)
        self.seen["unscaled_grad"] = _dtype_name(optimizer.param_groups[0]["params"][0].grad)

    def step(self, optimizer, *args, **kwargs):
        first = optimizer.param_groups[0]["params"][0]
        self.seen["clipped_grad"] = _dtype_name(first.grad)
        out = self.inner.step(optimizer, *args, **kwargs)
        self.seen["updated"] = _dtype_name(first)
        state = optimizer.state.get(first, {})
        self.seen["optimizer_state"] = _dtype_name(state["exp_avg"]) if "exp_avg" in state else "-"
        self.seen["stepped"] = bool(state)
        return out

    def update(self, *args, **kwargs):
        self.inner.update(*args, **kwargs)

    def get_scale(self):
        return self.inner.get_scale()

    def is_enabled(self):
        return getattr(self.inner, "is_enabled", lambda: True)()


def trace_step(precision: str = "fp16-amp:native", device: str = "cpu", seed: int = 0) -> dict:
    """The dtype of every tensor of one real ``mixprec.step.train_step`` under ``precision``, read by hooks.

    A two-layer MLP (Linear, GELU, Linear) with FP32 loss; keys are ``STEP_STAGES`` (dtype names such
    as ``"float16"``), plus ``"scale"`` (the loss scale the step multiplied by; None without scaling).
    Under emulated autocast a tensor's dtype is the one real autocast would hold it in (``held_in``).
    """
    import torch
    import torch.nn.functional as F

    from .amp import get_policy
    from .step import train_step

    policy = get_policy(precision)
    seen: dict = {}
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    first, last = net[0], net[2]

    def pack(t):  # the second layer's weight, as its matmul used it (and saved it for the backward)
        if t.shape in (last.weight.shape, last.weight.t().shape) and t.untyped_storage().data_ptr() != last.weight.untyped_storage().data_ptr():
            seen.setdefault("working_weight", _dtype_name(t))
        return t

    class Traced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            seen["input"] = _dtype_name(x)
            x = x.to(first.weight.dtype)  # *-master and pure policies: the model's own dtype, as an embedding would give
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = self.net(x)
            seen["logits"] = _dtype_name(out)
            return out

    def on_activation(module, args, out):
        seen["activation"] = _dtype_name(out)
        out.register_hook(lambda grad: seen.__setitem__("activation_grad", _dtype_name(grad)))

    first.register_forward_hook(on_activation)
    model = Traced()
    setup = policy.setup(model, lr=1e-3, loss_fn=lambda out, y: F.cross_entropy(out.float(), y), device=device, clip=1.0)
    masters = setup.master.master if setup.master is not None else [p for p in model.parameters()]
    seen["master"] = _dtype_name(masters[0])
    setup.scaler = _RecordingScaler(setup.scaler, seen, masters)

    def after_backward(m):
        seen["grad"] = _dtype_name(last.weight.grad)

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 8, (64,), generator=g)
    train_step(setup, x, y, after_backward=after_backward)
    seen.setdefault("working_weight", _dtype_name(last.weight))  # no cast copy: the matmul used the parameter itself
    return seen


_DTYPE_SHORT = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}


def _dtype_color(name: str) -> str:
    import matplotlib.colors as mcolors

    base = mcolors.to_rgb(plots.color({"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, "")))
    return mcolors.to_hex([0.62 + 0.38 * c for c in base])  # a light tint of the format's colour


def mixed_precision_step(trace: dict):
    """The data flow of one mixed-precision step, each box labelled with the dtype ``trace_step`` read from a real run.

    Returns the figure; ``fig.mixprec_labels`` maps each stage to the dtype text drawn in its box (for tests).
    """
    import math

    from matplotlib.patches import Rectangle

    short = {k: _DTYPE_SHORT.get(v, v) for k, v in trace.items() if k in STEP_STAGES}
    scale = trace.get("scale")
    zh = plots.has_cjk()

    def t(cn: str, en: str) -> str:
        return cn if zh else en

    fig, ax = canvas(7.4, 3.5)
    w, h = 0.8, 0.62
    top, bottom = 2.3, 0.5
    xs = [0.08 + i * 1.25 for i in range(6)]
    labels = {}

    def stage(key, x, y, title):
        labels[key] = short[key]
        return box(ax, x, y, w, h, f"{title}\n{short[key]}", color=_dtype_color(trace[key]), fontsize=7.5)

    def link(a, b, note, above=True):
        arrow(ax, a, b)
        if note:
            ax.text((a[0] + b[0]) / 2, a[1] + (0.06 if above else -0.06), note, fontsize=6.3, ha="center",
                    va="bottom" if above else "top", color="#333333", linespacing=1.0)

    forward = [("master", t("主权重 W", "master W")), ("working_weight", t("W 的副本", "copy of W")),
               ("activation", t("激活", "activations")), ("logits", "logits"), ("loss", t("损失", "loss")),
               ("scaled_loss", t("损失 × S", "loss × S"))]
    top_c = [stage(k, x, top, name) for (k, name), x in zip(forward, xs)]
    scale_note = f"× S\n$S=2^{{{int(round(math.log2(scale)))}}}$" if scale else t("不缩放\nS = 1", "no scaling\nS = 1")
    for (x0, y0), (x1, _), note in zip(top_c, top_c[1:], ["autocast\n" + t("转换", "cast"), t("矩阵\n乘法", "mat-\nmul"),
                                                          t("前向", "forward"), ".float()", scale_note]):
        link((x0 + w / 2, y0), (x1 - w / 2, y0), note)
    backward = [("activation_grad", t("激活的梯度", "activation grads")), ("grad", t("参数梯度\n（含 ×S）", "param grads\n(× S)")),
                ("unscaled_grad", t("还原后", "unscaled")), ("clipped_grad", t("裁剪后", "clipped")),
                ("updated", t("更新后的\n主权重", "updated\nmaster W"))]
    bottom_c = [stage(k, x, bottom, name) for (k, name), x in zip(backward, [xs[4], xs[3], xs[2], xs[1], xs[0]])]
    arrow(ax, (top_c[5][0], top), (bottom_c[0][0] + w / 2 - 0.05, bottom + h))
    ax.text(top_c[5][0] - 0.05, (top + bottom + h) / 2, t("反向传播\n（autocast 之外）", "backward\n(outside autocast)"),
            fontsize=6.5, ha="left", va="center")
    for (x0, y0), (x1, _), note in zip(bottom_c, bottom_c[1:], [t("反向", "backward"), "÷ S", t("裁剪", "clip"), "step"]):
        link((x0 - w / 2, y0), (x1 + w / 2, y0), note, above=False)
    adam = stage("optimizer_state", xs[0] + 0.62, 1.42, t("Adam 状态", "Adam state"))
    arrow(ax, (adam[0], 1.42), ((bottom_c[3][0] + bottom_c[4][0]) / 2, bottom + h / 2 + 0.03))
    ax.annotate("", xy=(top_c[0][0] - 0.2, top), xytext=(bottom_c[4][0] - 0.2, bottom + h),
                arrowprops={"arrowstyle": "-|>", "color": "#333333", "linestyle": "--", "linewidth": 0.9})
    ax.text(top_c[0][0] - 0.17, 1.45, t("下\n一\n步", "next\nstep"), fontsize=6.5, va="center", ha="left", color="#333333")
    ax.text(0.08, 3.25, t("前向（autocast 之内）→", "forward (inside autocast) →"), fontsize=8, weight="bold")
    ax.text(0.08, 0.08, t("← 反向与更新（autocast 之外）", "← backward and update (outside autocast)"), fontsize=8, weight="bold")
    for i, (name, key) in enumerate((("FP32", "float32"), ("FP16", "float16"), ("BF16", "bfloat16"))):
        ax.add_patch(Rectangle((5.6 + i * 0.6, 3.22), 0.15, 0.15, facecolor=_dtype_color(key), edgecolor="#333333", linewidth=0.5))
        ax.text(5.8 + i * 0.6, 3.295, name, fontsize=7, va="center")
    fig.mixprec_labels = labels
    return fig


MEMORY_PARTS = ("weights", "grads", "optimizer", "autocast_cache", "activations")
_MEMORY_COLORS = {"weights": "#1f5fbf", "grads": "#e67e22", "optimizer": "#7d3c98", "autocast_cache": "#95a5a6", "activations": "#2e8b3a"}


def training_memory(n_layer: int, n_embd: int, precision: str, tokens: int, coefficients: dict | None = None) -> dict[str, float]:
    """Bytes of each part of training memory (``MEMORY_PARTS``) for a GPT-2 of ``n_layer`` blocks of width ``n_embd`` and
    ``tokens`` tokens a step: model state from ``mixprec.amp.memory_breakdown``, saved activations from ``activation_bytes``."""
    parts = dict(memory_breakdown(int(gpt2_parameters(n_layer, n_embd)), precision))
    parts["activations"] = activation_bytes(coefficients or activation_coefficients(precision), n_layer, n_embd, tokens)
    return parts


def memory_by_tokens(n_layer: int = 48, n_embd: int = 1600, precisions=("fp32", "bf16-amp"), shapes=((1, 1024), (4, 1024), (8, 1024)),
                     limit_gib: float = 80):
    """Stacked bars of training memory for each (batch, sequence) and policy, with a line at ``limit_gib``;
    by default GPT-2 XL (48 blocks of width 1600, 1.56 B parameters) on an 80 GB card.

    Returns the figure; ``fig.mixprec_values`` maps (batch, seq, precision) to ``training_memory``'s parts."""
    zh = plots.has_cjk()
    names = {"weights": ("权重", "weights"), "grads": ("梯度", "gradients"), "optimizer": ("优化器状态", "optimizer state"),
             "autocast_cache": ("autocast 权重缓存", "autocast weight cache"), "activations": ("激活", "activations")}
    coefficients = {p: activation_coefficients(p) for p in precisions}
    rows = [(b, s, p) for b, s in shapes for p in precisions]
    values = {row: training_memory(n_layer, n_embd, row[2], row[0] * row[1], coefficients[row[2]]) for row in rows}
    fig, ax = plt.subplots(figsize=(7.2, 0.42 * len(rows) + 1.5))
    gib = 2.0**30
    for y, row in enumerate(reversed(rows)):
        left = 0.0
        for part in MEMORY_PARTS:
            width = values[row][part] / gib
            ax.barh(y, width, left=left, color=_MEMORY_COLORS[part], height=0.7,
                    label=(names[part][0] if zh else names[part][1]) if y == 0 else None)
            left += width
        ax.text(left + 1.5, y, f"{left:.1f} GiB", va="center", fontsize=7.5)
    ax.set_yticks(range(len(rows)), [f"{b}×{s}  {p}" for b, s, p in reversed(rows)], fontsize=8)
    ax.axvline(limit_gib, color="#c0392b", linestyle="--", linewidth=1)
    ax.text(limit_gib, len(rows) - 0.45, f" {limit_gib:g} GB", color="#c0392b", fontsize=7.5, va="bottom")
    ax.set_xlabel(plots.label("GiB（批大小 × 序列长度、策略）", "GiB (batch × sequence, policy)"))
    ax.set_xlim(0, max(limit_gib, max(sum(v.values()) for v in values.values()) / gib) * 1.15)
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.45, -0.2), fontsize=7.5, ncol=5, handlelength=1.2, columnspacing=1.0)
    fig.tight_layout()
    fig.mixprec_values = values
    return fig
