"""FP8: scales, scaling recipes as data, and linear layers that train in FP8.

A tensor goes to FP8 as ``q = round(x * s)`` with a scale ``s`` chosen so that its largest values
land near the format's maximum; ``q / s`` gives it back. Recipes differ in how many values share
one scale (the granularity) and how the scale is chosen from their largest magnitude (amax):

* ``tensorwise``: one scale per tensor; ``axiswise``: one per row along the reduction dimension;
* ``blockwise``: one per tile, e.g. 1×128 for activations and 128×128 for weights (DeepSeek-V3);
* ``mx``: one power-of-two (E8M0) scale per 32 values along the reduction dimension (OCP MX v1.0).

A linear layer runs three matrix products per step (output, input gradient, weight gradient),
each on two operands, so a recipe is six ``CastConfig`` s: ``Float8LinearConfig``, with torchao's
field names. ``Float8LinearConfig.from_recipe_name`` and ``convert_to_float8_training`` have
torchao.float8's names and signatures; ``Float8Linear`` computes what torchao's ``emulate=True``
path computes (tested equal in tests/test_fp8_torchao.py), on any device. The products accumulate
in FP32 unless ``accumulator`` asks for the narrower accumulator of FP8 tensor cores.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .emulate import EmulatedAutocast
from .formats import E4M3, FloatFormat, custom_format, get_format, round_to_format
from .hw import device_info

GRANULARITIES = ("tensorwise", "axiswise", "blockwise", "mx")
SCALE_MODES = ("real", "floor", "rceil", "ceil", "even")
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise", "mxfp8")
TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao.float8's own recipe names

_F32 = torch.finfo(torch.float32)


@dataclass(frozen=True)
class Quantized:
    """FP8 values (held in float32) and the scales that map them back: ``x ≈ values / scale``."""

    values: torch.Tensor  # same shape as x, every entry on the format's grid
    scale: torch.Tensor  # broadcastable against values (a scalar, a column, or expanded per block)
    fmt: FloatFormat

    def dequantize(self) -> torch.Tensor:
        return self.values / self.scale


# --- scales ---------------------------------------------------------------------------------

def scale_from_amax(amax: torch.Tensor, fmt: str | FloatFormat = E4M3, mode: str = "real") -> torch.Tensor:
    """The multiplier ``s`` that takes values whose largest magnitude is ``amax`` into ``fmt``.

    ``"real"``: ``s = fmt.max / amax``, so amax lands exactly on the format's maximum (torchao's
    ``amax_to_scale``). The other modes give powers of two, ``s = 2**-e`` (an E8M0 scale), with ``e``
    chosen as torchao's MX ``ScaleCalculationMode`` chooses it (``emax``: the format's largest exponent):

    * ``"floor"``, the OCP MX v1.0 rule: ``e = floor(log2 amax) - emax``; amax lands in
      ``[2**emax, 2**(emax+1))``, [256, 512) for E4M3, so values above 448 are clamped;
    * ``"rceil"``: ``e = ceil(log2(amax / fmt.max))``; amax lands in ``(max/2, max]``: nothing is
      clamped, up to one binade is left unused (also torchao float8's ``round_scales_to_power_of_2``);
    * ``"ceil"``: ``e = ceil(log2 amax) - emax``; amax lands in ``(2**(emax-1), 2**emax]``;
    * ``"even"``: ``"floor"`` after rounding amax to the format's mantissa width.

    ``amax`` (a tensor or a Python number) is a magnitude: its sign is ignored, in every mode.
    """
    fmt = get_format(fmt)
    if mode not in SCALE_MODES:
        raise ValueError(f"scale mode must be one of {SCALE_MODES}, got {mode!r}")
    if isinstance(amax, bool) or not isinstance(amax, (torch.Tensor, int, float)):
        raise TypeError(f"amax must be a tensor or a number, got {type(amax).__name__}")
    amax = torch.as_tensor(amax).detach().float().abs()
    has_nan = amax.isnan()
    if mode == "real":
        # torchao computes this in float64 and clamps amax at 1e-12, so a tensor whose amax is below
        # 1e-12 quantizes to zero there. We clamp only where the scale would stop being a finite float32.
        scale = fmt.max / amax.double().clamp(min=_F32.tiny)
        return scale.clamp(max=_F32.max).float()
    if mode == "rceil":
        e = torch.ceil(torch.log2(amax / fmt.max)).nan_to_num(nan=0.0, neginf=-127.0)
    else:
        if mode == "even":  # round amax's float32 mantissa to the element's width (ties away), then floor
            half = 1 << (22 - fmt.mantissa_bits)
            amax = ((amax.view(torch.int32) + half) & ~((1 << 23) - 1)).view(torch.float32)
        bits = amax.contiguous().view(torch.int32)
        e = ((bits >> 23) & 0xFF) - 127  # floor(log2 amax), exactly, for normal amax; -127 for 0 and subnormals
        if mode == "ceil":
            e = e + ((bits & 0x7FFFFF) > 0).int()
        e = (e - fmt.emax).float()
    # E8M0 spans 2**-127 .. 2**127. (torchao quantizes with 2**-126 at the bottom, a float32 normal,
    # but dequantizes with 2**-127: its blocks with amax below 2**(-127 + emax) come back halved.)
    scale = torch.exp2(-e.clamp(min=-127, max=127))
    return torch.where(has_nan, torch.nan, scale)  # a block holding NaN comes back all NaN (E8M0's NaN)


def _quantize(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> Quantized:
    # saturate: a value beyond the range (possible with delayed or floor scaling) is clamped, never inf/NaN
    return Quantized(round_to_format(x.detach().float() * scale, fmt, overflow="saturate"), scale, fmt)


def _check(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} takes a tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{what}: the tensor is empty (shape {tuple(x.shape)}); there is no amax to scale by")


def quantize_tensorwise(x: torch.Tensor, fmt: str | FloatFormat = E4M3, scale_mode: str = "real") -> Quantized:
    """One scale for the whole tensor, from its current amax."""
    _check(x, "quantize_tensorwise")
    fmt = get_format(fmt)
    return _quantize(x, scale_from_amax(x.detach().abs().amax(), fmt, scale_mode), fmt)


def quantize_rowwise(x: torch.Tensor, fmt: str | FloatFormat = E4M3, scale_mode: str = "real") -> Quantized:
    """One scale per row (per slice along the last dimension)."""
    _check(x, "quantize_rowwise")
    if x.dim() == 0:
        raise ValueError("quantize_rowwise needs at least one dimension, got a 0-d tensor")
    fmt = get_format(fmt)
    return _quantize(x, scale_from_amax(x.detach().abs().amax(dim=-1, keepdim=True), fmt, scale_mode), fmt)


def quantize_blockwise(x: torch.Tensor, block: tuple[int, int] = (1, 128), fmt: str | FloatFormat = E4M3,
                       scale_mode: str = "real") -> Quantized:
    """One scale per ``block`` (rows × columns) tile of a 2-D tensor, e.g. (1, 128) or (128, 128)."""
    _check(x, "quantize_blockwise")
    fmt = get_format(fmt)
    if x.dim() != 2:
        raise ValueError(f"blockwise quantization takes a 2-D tensor, got shape {tuple(x.shape)}")
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)):
        raise ValueError(f"block must be two positive integers (rows, columns), got {block!r}")
    (rows, cols), (br, bc) = x.shape, block
    if rows % br or cols % bc:
        raise ValueError(f"shape {tuple(x.shape)} is not a whole number of {br}×{bc} blocks")
    tiles = x.detach().reshape(rows // br, br, cols // bc, bc)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    scale = scale_from_amax(amax, fmt, scale_mode).expand_as(tiles).reshape(rows, cols)
    return _quantize(x, scale, fmt)


def quantize_mx(x: torch.Tensor, fmt: str | FloatFormat = E4M3, block: int = 32, scale_mode: str = "floor") -> Quantized:
    """OCP Microscaling: each ``block`` consecutive values along the last dimension share a power-of-two scale.

    With the specification's ``"floor"`` rule the shared exponent is floor(log2(amax)) minus the
    element format's largest exponent, so the block's largest value lands in [2**emax, 2**(emax + 1)):
    [256, 512) for E4M3, whose max is 448; larger values are clamped. Equal, bit for bit, to
    torchao's ``MXTensor.to_mx(x, torch.float8_e4m3fn, 32)`` dequantized, NaN and inf blocks included.
    """
    _check(x, "quantize_mx")
    fmt = get_format(fmt)
    if scale_mode == "real":
        raise ValueError("MX scales are powers of two: scale_mode must be 'floor', 'rceil', 'ceil' or 'even'")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"the MX block size must be a positive integer (the last dimension a multiple of it; 32 in the spec), got {block!r}")
    if x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(f"the last dimension of shape {tuple(x.shape)} is not a multiple of the MX block size {block}")
    blocks = x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = scale_from_amax(blocks.abs().amax(dim=-1, keepdim=True), fmt, scale_mode)
    return _quantize(x, scale.expand_as(blocks).reshape(x.shape), fmt)


class DelayedScaling:
    """Per-tensor scaling from the amax of the last ``history`` calls (Transformer Engine's original recipe).

    The scale used now comes only from earlier amaxes, so it can be computed before x is seen; a
    value larger than the history predicted is clamped to the format's max. The first call, with no
    history yet, uses its own amax. Rule for non-finite data: an inf or NaN amax is not recorded (the
    loss scaler skips that step anyway), so one bad batch cannot poison the next ``history`` steps.
    """

    def __init__(self, fmt: str | FloatFormat = E4M3, history: int = 16):
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        self.fmt = get_format(fmt)
        self.history: list[float] = []
        self.length = history

    def __call__(self, x: torch.Tensor) -> Quantized:
        _check(x, "DelayedScaling")
        amax = float(x.detach().abs().amax())
        reference = max(self.history) if self.history else amax
        if amax == amax and amax != float("inf"):
            self.history = (self.history + [amax])[-self.length :]
        return _quantize(x, scale_from_amax(torch.tensor(reference, device=x.device), self.fmt), self.fmt)


# --- recipes as data -------------------------------------------------------------------------

@dataclass(frozen=True)
class CastConfig:
    """How one operand of one matrix product goes to FP8.

    ``fmt``: the element format, or None to keep the operand in high precision (torchao's
    ``ScalingType.DISABLED``). ``granularity``: which values share a scale, always counted along the
    product's reduction dimension K: one per tensor, one per row (``axiswise``), one per ``block``
    tile of (rows, K) values (``blockwise``; (1, 128) or (128, 128)), or one per ``block[1]`` values
    (``mx``). ``scale_mode``: see ``scale_from_amax``.
    """

    fmt: str | None = "e4m3fn"
    granularity: str = "tensorwise"
    block: tuple[int, int] = (1, 1)
    scale_mode: str = "real"

    def __post_init__(self):
        if self.fmt is not None:
            get_format(self.fmt)  # fails with the valid names
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if self.granularity == "mx" and self.scale_mode == "real":
            raise ValueError("MX scales are powers of two: scale_mode must be 'floor', 'rceil', 'ceil' or 'even'")
        if len(self.block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.block):
            raise ValueError(f"block must be two positive integers (rows, K), got {self.block!r}")

    @property
    def k_multiple(self) -> int:
        """The reduction dimension must be a multiple of this (the block's length along K)."""
        return self.block[1] if self.fmt is not None and self.granularity in ("blockwise", "mx") else 1

    def quantize(self, x: torch.Tensor, k_dim: int) -> Quantized | None:
        """``x`` (2-D) quantized with this config, its scales grouped along dimension ``k_dim``; None if ``fmt`` is None."""
        if self.fmt is None:
            return None
        if x.dim() != 2:
            raise ValueError(f"an operand of a matrix product is 2-D, got shape {tuple(x.shape)}")
        t = x if k_dim in (1, -1) else x.t()  # put K last: every granularity groups along the last dimension
        q = {"tensorwise": lambda: quantize_tensorwise(t, self.fmt, self.scale_mode),
             "axiswise": lambda: quantize_rowwise(t, self.fmt, self.scale_mode),
             "blockwise": lambda: quantize_blockwise(t, self.block, self.fmt, self.scale_mode),
             "mx": lambda: quantize_mx(t, self.fmt, self.block[1], self.scale_mode)}[self.granularity]()
        if t is x:
            return q
        return Quantized(q.values.t(), q.scale.t() if q.scale.dim() == 2 else q.scale, q.fmt)

    def cast(self, x: torch.Tensor, k_dim: int) -> torch.Tensor:
        """What the matrix product sees: ``x`` quantized and dequantized (in FP32), or ``x`` itself."""
        q = self.quantize(x, k_dim)
        return x.float() if q is None else q.dequantize()


@dataclass(frozen=True)
class Accumulator:
    """A matrix product's running sum with ``mantissa_bits`` (FP32's exponent range), added into FP32
    every ``promote_every`` products (None: never), as DeepSeek-V3 does with N_C = 128 on H800
    tensor cores, whose FP8 accumulator keeps about 14 significant bits (13 stored)."""

    mantissa_bits: int = 13
    promote_every: int | None = 128

    def __post_init__(self):
        if not 1 <= self.mantissa_bits <= 23:
            raise ValueError(f"mantissa_bits must be in 1..23, got {self.mantissa_bits}")
        if self.promote_every is not None and self.promote_every < 1:
            raise ValueError(f"promote_every must be >= 1 or None, got {self.promote_every}")


def matmul(a: torch.Tensor, b: torch.Tensor, accumulator: Accumulator | None = None) -> torch.Tensor:
    """``a @ b`` in FP32, or with ``accumulator``'s narrow running sum (one product at a time: slow, for study)."""
    if accumulator is None:
        return a.float() @ b.float()
    fmt = custom_format(8, accumulator.mantissa_bits)
    total = torch.zeros(a.shape[0], b.shape[1], device=a.device)
    part = torch.zeros_like(total)
    for k in range(a.shape[1]):
        part = round_to_format(part + a[:, k : k + 1].float() * b[k : k + 1, :].float(), fmt)
        if accumulator.promote_every and (k + 1) % accumulator.promote_every == 0:
            total, part = total + part, torch.zeros_like(part)
    return total + part


@dataclass(frozen=True)
class Float8LinearConfig:
    """A linear layer's FP8 recipe: how each operand of its three matrix products is cast.

    output = input @ weight.T; grad_input = grad_output @ weight; grad_weight = grad_output.T @ input.
    The ``*_for_grad_*`` configs default to the operand's main config, as in torchao.
    """

    cast_config_input: CastConfig = CastConfig("e4m3fn")
    cast_config_input_for_grad_weight: CastConfig | None = None
    cast_config_weight: CastConfig = CastConfig("e4m3fn")
    cast_config_weight_for_grad_input: CastConfig | None = None
    cast_config_grad_output: CastConfig = CastConfig("e5m2")
    cast_config_grad_output_for_grad_weight: CastConfig | None = None
    accumulator: Accumulator | None = None  # None: products accumulate in FP32
    recipe: str = "custom"

    def __post_init__(self):
        for main, derived in (("input", "input_for_grad_weight"), ("weight", "weight_for_grad_input"),
                              ("grad_output", "grad_output_for_grad_weight")):
            if getattr(self, f"cast_config_{derived}") is None:
                object.__setattr__(self, f"cast_config_{derived}", getattr(self, f"cast_config_{main}"))
        for a, b, product in (("input", "weight", "output"), ("grad_output", "weight_for_grad_input", "grad_input"),
                              ("grad_output_for_grad_weight", "input_for_grad_weight", "grad_weight")):
            if (getattr(self, f"cast_config_{a}").fmt is None) != (getattr(self, f"cast_config_{b}").fmt is None):
                raise ValueError(f"the {product} product needs both operands in FP8 or both in high precision")

    @staticmethod
    def from_recipe_name(recipe_name: str) -> Float8LinearConfig:
        """A named recipe: torchao's ``tensorwise``, ``rowwise``, ``rowwise_with_gw_hp``, and
        ``blockwise`` (DeepSeek-V3) and ``mxfp8`` (OCP MX)."""
        name = getattr(recipe_name, "value", recipe_name)  # accepts torchao's Float8LinearRecipeName too
        if name == "tensorwise":  # E4M3 forward, E5M2 gradients, one real scale per tensor
            return Float8LinearConfig(recipe=name)
        if name == "rowwise":  # E4M3 everywhere, one power-of-two scale per row along K
            row = CastConfig("e4m3fn", "axiswise", scale_mode="rceil")
            return Float8LinearConfig(row, None, row, None, row, recipe=name)
        if name == "rowwise_with_gw_hp":  # rowwise; the weight gradient's product in high precision
            row = CastConfig("e4m3fn", "axiswise", scale_mode="rceil")
            high = CastConfig(None)
            return Float8LinearConfig(row, high, row, CastConfig("e4m3fn", scale_mode="rceil"), row, high, recipe=name)
        if name == "blockwise":  # DeepSeek-V3: 1×128 activations and gradients, 128×128 weights, E4M3, FP32 scales
            tile, square = CastConfig("e4m3fn", "blockwise", (1, 128)), CastConfig("e4m3fn", "blockwise", (128, 128))
            return Float8LinearConfig(tile, None, square, None, tile, recipe=name)
        if name == "mxfp8":  # OCP MX: 32 values along K share an E8M0 scale (floor rule), E4M3 everywhere
            mx = CastConfig("e4m3fn", "mx", (1, 32), "floor")
            return Float8LinearConfig(mx, None, mx, None, mx, recipe=name)
        raise ValueError(f"unknown FP8 recipe {recipe_name!r}; valid: {', '.join(RECIPES)}")


class _Float8Matmul(torch.autograd.Function):
    """input (M, K) @ weight (N, K).T with each operand cast by its config; the backward casts again
    along each product's own reduction dimension, from the high-precision tensors, as torchao does.

    One FP8 kernel: inside it autocast (real or emulated) changes nothing; products accumulate in FP32
    and each result comes out in the dtype of its high-precision operand (input or output gradient),
    as torchao's scaled matmuls do.
    """

    @staticmethod
    def forward(ctx, x, weight, config: Float8LinearConfig):
        ctx.save_for_backward(x, weight)
        ctx.config = config
        c = config
        with _one_kernel(x.device.type):
            x32, w32 = x.float(), weight.float()
            out = matmul(c.cast_config_input.cast(x32, 1), c.cast_config_weight.cast(w32, 1).t(), c.accumulator)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        c = ctx.config
        with _one_kernel(grad_out.device.type):
            g, x32, w32 = grad_out.float(), x.float(), weight.float()
            grad_x = matmul(c.cast_config_grad_output.cast(g, 1), c.cast_config_weight_for_grad_input.cast(w32, 0), c.accumulator)
            grad_w = matmul(c.cast_config_grad_output_for_grad_weight.cast(g, 0).t(), c.cast_config_input_for_grad_weight.cast(x32, 0),
                            c.accumulator)
        return grad_x.to(grad_out.dtype), grad_w.to(grad_out.dtype), None  # autograd casts grad_w on to the weight's dtype


@contextlib.contextmanager
def _one_kernel(device_type: str):
    """Inside an FP8 kernel: no autocast, real or emulated (a TorchFunctionMode such as ``EmulatedAutocast``)."""
    with torch.amp.autocast(device_type, enabled=False), torch._C.DisableTorchFunction():
        yield


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast lowers to here, real (``torch.amp.autocast``) or emulated (``EmulatedAutocast``); None outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, EmulatedAutocast):
            return mode.dtype
    return None


class Float8Linear(nn.Linear):
    """``nn.Linear`` whose three matrix products are emulated FP8 as ``config`` says; the bias stays high precision.

    Under autocast (real, or ``EmulatedAutocast``) it does what torchao's ``Float8Linear`` does under
    real autocast: the input is cast to the autocast dtype, the FP8 product's output comes out in that
    dtype, and the bias is cast to it before it is added. The FP8 arithmetic itself does not change.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: Float8LinearConfig | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config or Float8LinearConfig(recipe="tensorwise")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, tokens = self.config, x.numel() // max(x.shape[-1], 1)
        if x.numel() == 0:  # an empty batch: nothing to quantize (no amax); nn.Linear's empty result
            return nn.functional.linear(x, self.weight, self.bias)
        sizes = {"in_features": (self.in_features, c.cast_config_input.k_multiple, c.cast_config_weight.k_multiple),
                 "out_features": (self.out_features, c.cast_config_grad_output.k_multiple, c.cast_config_weight_for_grad_input.k_multiple)}
        for field_name, (size, *multiples) in sizes.items():
            if field_name == "out_features" and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
                continue  # out_features is the reduction dimension of the grad-input product (computed in every backward)
            if size % max(multiples):
                raise ValueError(f"the {c.recipe} recipe quantizes in blocks of {max(multiples)} along {field_name}; this "
                                 f"layer (Linear({self.in_features}, {self.out_features})) has {field_name} = {size}: keep it in "
                                 "high precision (module_filter_fn; fp8.fits_recipe tells which layers fit)")
        need = max(c.cast_config_grad_output_for_grad_weight.k_multiple, c.cast_config_input_for_grad_weight.k_multiple)
        if torch.is_grad_enabled() and self.weight.requires_grad and tokens % need:
            raise ValueError(f"the {c.recipe} recipe quantizes the weight gradient's operands in blocks of {need} along the "
                             f"tokens; this batch has {tokens} tokens (batch × sequence), not a multiple of {need}")
        low = autocast_dtype(x.device.type)
        if low is not None:  # as torchao: the input in the autocast dtype, so the output comes out in it too
            x = x.to(low)
        out = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight, self.config)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Float8LinearConfig | None = None) -> Float8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, config=config,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.load_state_dict(linear.state_dict())
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.config.recipe}"


def quantization_errors(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each ``Float8Linear``'s error on one batch: the relative error of its output, input gradient and
    weight gradient against the same layer computed in FP32, given the same input and output gradient."""
    from .debug import relative_error

    layers = {name: m for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    seen: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: seen[name].update(x=args[0].detach()))
             for name, m in layers.items()]
    hooks += [m.register_full_backward_hook(lambda m, gin, gout, name=name: seen[name].update(g=gout[0].detach()))
              for name, m in layers.items()]
    try:
        logits = model(inputs.to(next(model.parameters()).device)).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.to(logits.device).flatten()).backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    errors = {}
    for name, layer in layers.items():
        x = seen[name]["x"].reshape(-1, layer.in_features).float().requires_grad_(True)
        g = seen[name]["g"].reshape(-1, layer.out_features).float()
        w = layer.weight.detach().float().requires_grad_(True)
        out8, out32 = _Float8Matmul.apply(x, w, layer.config), x @ w.t()
        gx8, gw8 = torch.autograd.grad(out8, (x, w), g)
        gx32, gw32 = torch.autograd.grad(out32, (x, w), g)
        errors[name] = {"output": relative_error(out8, out32), "grad_input": relative_error(gx8, gx32),
                        "grad_weight": relative_error(gw8, gw32)}
    return errors


def linear_from_conv1d(conv) -> nn.Linear:
    """transformers' GPT-2 ``Conv1D`` (weight stored in×out) as an equivalent ``nn.Linear`` (out×in)."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


def swap_linears(model: nn.Module, make, skip=lambda module, fqn: False) -> list[str]:
    """Replace every ``nn.Linear`` and GPT-2 ``Conv1D`` for which ``skip(module, fqn)`` is false by ``make(linear)``."""
    from transformers.pytorch_utils import Conv1D

    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear | Conv1D) or isinstance(child, Float8Linear):
                continue
            linear = linear_from_conv1d(child) if isinstance(child, Conv1D) else child
            if skip(linear, full):
                continue
            setattr(module, child_name, make(linear))
            swapped.append(full)
    return swapped


def convert_to_float8_training(module: nn.Module, *, module_filter_fn=None, config: Float8LinearConfig | None = None) -> nn.Module:
    """Swap ``module``'s linear layers (and GPT-2's ``Conv1D``) for emulated ``Float8Linear`` in place; returns ``module``.

    Same name and signature as ``torchao.float8.convert_to_float8_training``: ``module_filter_fn(mod, fqn)``
    returns False for layers to keep in high precision. A ``module`` that is itself a linear layer
    cannot be swapped in place: as torchao does, the converted layer is returned (its fqn is ``""``).
    """
    from transformers.pytorch_utils import Conv1D

    config = config or Float8LinearConfig(recipe="tensorwise")
    keep = (lambda mod, fqn: not module_filter_fn(mod, fqn)) if module_filter_fn else (lambda mod, fqn: False)
    if isinstance(module, nn.Linear | Conv1D) and not isinstance(module, Float8Linear):
        linear = linear_from_conv1d(module) if isinstance(module, Conv1D) else module
        return module if keep(linear, "") else Float8Linear.from_float(linear, config)
    swap_linears(module, lambda linear: Float8Linear.from_float(linear, config), skip=keep)
    return module


def fits_recipe(linear: nn.Module, recipe: str) -> bool:
    """Whether this layer's sizes suit the recipe's blocks (the layers that do not stay in high precision)."""
    multiple = {"blockwise": 128, "mxfp8": 32}.get(recipe, 16)  # 16: torch._scaled_mm's alignment
    return linear.in_features % multiple == 0 and linear.out_features % multiple == 0


# --- matrix products on FP8 operands, native or emulated --------------------------------------

def native_scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch._scaled_mm`` on FP8 operands: a (M, K) and b (N, K), each with a tensorwise or rowwise scale.

    FP8 inputs, the inverse scales applied to the result; the accumulator's precision is the kernel's (on
    Hopper tensor cores, fewer bits than FP32 between promotions). Raises whatever the
    installed torch raises where it has no such kernel.
    """
    if a.fmt.torch_dtype is None or b.fmt.torch_dtype is None:
        raise TypeError(f"_scaled_mm needs torch FP8 dtypes; got {a.fmt.name} and {b.fmt.name}")
    inv_a, inv_b = (1 / a.scale).float(), (1 / b.scale).float()
    # The kernel wants a row-major and b column-major: whatever view the values are, copy them into that layout.
    return torch._scaled_mm(
        a.values.to(a.fmt.torch_dtype).contiguous(), b.values.to(b.fmt.torch_dtype).contiguous().t(),
        scale_a=inv_a.reshape(-1, 1) if inv_a.numel() > 1 else inv_a,
        scale_b=inv_b.reshape(1, -1) if inv_b.numel() > 1 else inv_b,
        out_dtype=out_dtype,
    )


def _scale_kind(q: Quantized, rows: int) -> str | None:
    """'tensor', 'row' or None (anything else: blocks, MX), from the scale's shape."""
    if q.scale.numel() == 1:
        return "tensor"
    if q.scale.dim() == 2 and q.scale.shape == (rows, 1):
        return "row"
    return None


def scaled_matmul(a: Quantized, b: Quantized, native: bool = True, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a.dequantize() @ b.dequantize().T`` from FP8 operands, the way FP8 GEMMs compute it.

    a: (M, K), b: (N, K), as weights are stored; any scale layout. native: use ``native_scaled_mm``
    where the operands are tensorwise or rowwise and this device and torch have the kernel;
    otherwise the same product is emulated in FP32. Returns (M, N).
    """
    if a.values.dim() != 2 or b.values.dim() != 2:
        raise ValueError(f"scaled_matmul takes 2-D operands, got shapes {tuple(a.values.shape)} and {tuple(b.values.shape)}")
    if a.values.shape[-1] != b.values.shape[-1]:
        raise ValueError(f"inner dimensions differ: {tuple(a.values.shape)} and {tuple(b.values.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    has_torch_dtypes = a.fmt.torch_dtype is not None and b.fmt.torch_dtype is not None
    if native and has_torch_dtypes and _scale_kind(a, a.values.shape[0]) and _scale_kind(b, b.values.shape[0]):
        try:
            return native_scaled_mm(a, b, out_dtype)
        except (RuntimeError, NotImplementedError) as error:  # no such kernel here: say so, then emulate the same product
            reason = (str(error).strip().splitlines() or [""])[0]
            warnings.warn(f"torch._scaled_mm failed on {a.values.device.type} ({type(error).__name__}: {reason}); "
                          "scaled_matmul emulates the same product in FP32", RuntimeWarning, stacklevel=2)
    return (a.dequantize() @ b.dequantize().t()).to(out_dtype)


# --- which engine runs FP8 training here ------------------------------------------------------

def native_fp8_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether torchao float8 training can run here, and if not, why."""
    info = device_info(device)
    if info.device != "cuda":
        return False, "FP8 matmuls need an NVIDIA GPU with compute capability 8.9+ (L4, H100); this is a CPU"
    if not info.native["fp8"]:
        return False, f"{info.name} has compute capability {info.compute_capability}; FP8 needs 8.9+"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False, "torchao is not installed (pip install torchao)"
    return True, "torchao float8 training"


def fp8_engine(recipe: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``convert_to_fp8`` would run ``recipe`` on torchao's native FP8 kernels here, and if not, why."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    native, why = native_fp8_available(device)
    if native and recipe not in TORCHAO_RECIPES:
        return False, f"torchao.float8 has no '{recipe}' recipe"
    return native, why


def convert_to_fp8(model: nn.Module, device: torch.device | str | None = None, recipe: str = "tensorwise") -> str:
    """Make ``model``'s linear layers FP8 with ``recipe``; returns which engine does it, and why.

    torchao's ``convert_to_float8_training`` where this GPU has FP8 and torchao has the recipe;
    elsewhere the emulated ``Float8Linear``. The output layer (tied to the embedding) and layers
    whose sizes do not suit the recipe's blocks stay in high precision.
    """
    config = Float8LinearConfig.from_recipe_name(recipe)  # fails early on unknown names

    def wanted(mod, fqn):
        return fqn != "lm_head" and fits_recipe(mod, recipe)

    native, why = fp8_engine(recipe, device)
    if native:
        import torchao.float8 as ao

        swap_linears(model, lambda linear: linear)  # GPT-2's Conv1D -> nn.Linear, which torchao converts
        ao.convert_to_float8_training(model, module_filter_fn=wanted, config=ao.Float8LinearConfig.from_recipe_name(recipe))
        return f"native (torchao float8, {recipe})"
    convert_to_float8_training(model, module_filter_fn=wanted, config=config)
    return f"emulated {recipe} ({why})"

