"""FP8: scaling recipes, and linear layers emulated on any device or run by torchao on GPUs with FP8.

A tensor goes to FP8 as ``q = round(x * scale)`` with a scale chosen so that its largest values land
near the format's maximum; ``q / scale`` gives it back. The recipes differ in how many values share
one scale and how the scale is chosen:

* per tensor, current: one scale from this tensor's amax;
* per tensor, delayed: one scale from the amax *history* of earlier steps (no extra pass over x);
* per row: one scale per row (e.g. per token of an activation);
* per block: one scale per 1×128 or 128×128 block (DeepSeek-V3's recipe);
* MX: one power-of-two (E8M0) scale per 32 consecutive values (OCP Microscaling).

The linear-layer recipe is the usual one: activations and weights in E4M3 (more precision) for the forward
matmul, gradients in E5M2 (more range) for the backward matmuls, each tensor scaled by its own
current absolute maximum so that it fills the format's range ("per-tensor current scaling").
The emulated matmuls then accumulate in full FP32. That is optimistic: FP8 tensor cores keep fewer bits
in their accumulator (about 14 significant bits on H800, as DeepSeek-V3 §3.3.2 measured), which is why
DeepSeek-V3 promotes the partial sums to FP32 registers every 128 products (N_C = 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .formats import E4M3, E5M2, FloatFormat, get_format, round_to_format
from .hw import device_info

_TINY = 1e-12  # amax floor: an all-zero tensor gets a finite scale


@dataclass(frozen=True)
class Quantized:
    """FP8 values (held in float32) and the scales that map them back: ``x ≈ values / scale``."""

    values: torch.Tensor  # same shape as x, every entry on the format's grid
    scale: torch.Tensor  # broadcastable against values (a scalar, a column, or expanded per block)
    fmt: FloatFormat

    def dequantize(self) -> torch.Tensor:
        return self.values / self.scale


def _quantize(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> Quantized:
    # saturate: a value beyond the range (possible with delayed scaling) is clamped, never inf/NaN
    return Quantized(round_to_format(x.detach().float() * scale, fmt, overflow="saturate"), scale, fmt)


def _scale_from_amax(amax: torch.Tensor, fmt: FloatFormat, power_of_two: bool) -> torch.Tensor:
    scale = fmt.max / torch.clamp(amax.float(), min=_TINY)
    return torch.exp2(torch.floor(torch.log2(scale))) if power_of_two else scale  # rounding down keeps amax in range


def quantize_tensorwise(x: torch.Tensor, fmt: str | FloatFormat = E4M3, power_of_two: bool = False) -> Quantized:
    """One scale for the whole tensor, from its current amax."""
    fmt = get_format(fmt)
    return _quantize(x, _scale_from_amax(x.detach().abs().amax(), fmt, power_of_two), fmt)


def quantize_rowwise(x: torch.Tensor, fmt: str | FloatFormat = E4M3, power_of_two: bool = False) -> Quantized:
    """One scale per row (per slice along the last dimension)."""
    fmt = get_format(fmt)
    return _quantize(x, _scale_from_amax(x.detach().abs().amax(dim=-1, keepdim=True), fmt, power_of_two), fmt)


def quantize_blockwise(x: torch.Tensor, block: tuple[int, int] = (1, 128), fmt: str | FloatFormat = E4M3,
                       power_of_two: bool = False) -> Quantized:
    """One scale per ``block`` (rows × columns) tile of a 2-D tensor, e.g. (1, 128) or (128, 128)."""
    fmt = get_format(fmt)
    if x.dim() != 2:
        raise ValueError(f"blockwise quantization takes a 2-D tensor, got shape {tuple(x.shape)}")
    (rows, cols), (br, bc) = x.shape, block
    if rows % br or cols % bc:
        raise ValueError(f"shape {tuple(x.shape)} is not a whole number of {br}×{bc} blocks")
    tiles = x.detach().reshape(rows // br, br, cols // bc, bc)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    scale = _scale_from_amax(amax, fmt, power_of_two).expand_as(tiles).reshape(rows, cols)
    return _quantize(x, scale, fmt)


def quantize_mx(x: torch.Tensor, fmt: str | FloatFormat = E4M3, block: int = 32) -> Quantized:
    """OCP Microscaling: each ``block`` consecutive values along the last dimension share a power-of-two scale.

    The shared exponent is floor(log2(amax)) minus the element format's largest exponent, as in the
    MX specification, so the block's largest value lands in [2**emax, 2**(emax + 1)): [256, 512) for
    E4M3, whose max is 448, so a block's largest values can exceed the max and are then clamped
    (saturated). Rounding the exponent up instead would avoid the clamp but leave up to a binade unused.
    """
    fmt = get_format(fmt)
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the MX block size {block}")
    blocks = x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    shared = torch.floor(torch.log2(torch.clamp(amax, min=_TINY))) - fmt.emax
    shared = torch.clamp(shared, -127, 127)  # E8M0 holds 2**-127 .. 2**127
    scale = torch.exp2(-shared).expand_as(blocks).reshape(x.shape)
    return _quantize(x, scale, fmt)


class DelayedScaling:
    """Per-tensor scaling from the amax of the last ``history`` calls (Transformer Engine's original recipe).

    The scale used now comes only from earlier amaxes, so it can be computed before x is seen; a
    value larger than the history predicted is clamped to the format's max. The first call, with no
    history yet, uses its own amax.
    """

    def __init__(self, fmt: str | FloatFormat = E4M3, history: int = 16):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.fmt = get_format(fmt)
        self.history: list[float] = []
        self.length = history

    def __call__(self, x: torch.Tensor) -> Quantized:
        amax = float(x.detach().abs().amax())
        reference = max(self.history) if self.history else amax
        self.history = (self.history + [amax])[-self.length :]
        return _quantize(x, _scale_from_amax(torch.tensor(reference), self.fmt, False), self.fmt)


def native_scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch._scaled_mm`` on FP8 operands: a (M, K) and b (N, K), each with a tensorwise or rowwise scale.

    FP8 inputs, the inverse scales applied to the result; the accumulator's precision is the kernel's (on
    Hopper tensor cores, fewer bits than FP32 between promotions). Raises whatever the
    installed torch raises where it has no such kernel.
    """
    if a.fmt.torch_dtype is None or b.fmt.torch_dtype is None:
        raise TypeError(f"_scaled_mm needs torch FP8 dtypes; got {a.fmt.name} and {b.fmt.name}")
    inv_a, inv_b = (1 / a.scale).float(), (1 / b.scale).float()
    return torch._scaled_mm(
        a.values.to(a.fmt.torch_dtype), b.values.to(b.fmt.torch_dtype).t(),
        scale_a=inv_a.reshape(-1, 1) if inv_a.numel() > 1 else inv_a,
        scale_b=inv_b.reshape(1, -1) if inv_b.numel() > 1 else inv_b,
        out_dtype=out_dtype,
    )


def scaled_matmul(a: Quantized, b: Quantized, native: bool = True, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a.dequantize() @ b.dequantize().T`` from FP8 operands, the way FP8 GEMMs compute it.

    a: (M, K) with a tensorwise or rowwise (M, 1) scale; b: (N, K), likewise, as weights are stored.
    native: use ``native_scaled_mm`` where this device and torch have the kernel; otherwise the same
    product is emulated in FP32. Returns (M, N).
    """
    if a.values.shape[-1] != b.values.shape[-1]:
        raise ValueError(f"inner dimensions differ: {tuple(a.values.shape)} and {tuple(b.values.shape)}")
    if native:
        try:
            return native_scaled_mm(a, b, out_dtype)
        except (RuntimeError, NotImplementedError, TypeError):
            pass  # no such FP8 kernel (or not an FP8 dtype torch knows): fall through to the emulation
    return ((a.values @ b.values.t()) / (a.scale.reshape(-1, 1) * b.scale.reshape(1, -1))).to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        xq, wq = quantize_tensorwise(x, E4M3).dequantize(), quantize_tensorwise(weight, E4M3).dequantize()
        ctx.save_for_backward(xq, wq)
        return xq @ wq.t()

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        gq = quantize_tensorwise(grad_out, E5M2).dequantize()
        grad_x = gq @ wq
        grad_w = gq.reshape(-1, gq.shape[-1]).t() @ xq.reshape(-1, xq.shape[-1])
        return grad_x, grad_w


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose matmul is emulated FP8 (E4M3 forward, E5M2 gradients); the bias stays FP32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Fp8Matmul.apply(x, self.weight)
        return out + self.bias if self.bias is not None else out


def linear_from_conv1d(conv) -> nn.Linear:
    """transformers' GPT-2 ``Conv1D`` (weight stored in×out) as an equivalent ``nn.Linear`` (out×in)."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


def swap_linears(model: nn.Module, make, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every ``nn.Linear`` and GPT-2 ``Conv1D`` (except names in ``skip``) by ``make(linear)``; returns their names.

    The output layer is skipped by default: its weight is tied to the token embedding, and FP8 recipes
    keep the first and last layers in higher precision.
    """
    from transformers.pytorch_utils import Conv1D

    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in skip or not isinstance(child, nn.Linear | Conv1D):
                continue
            linear = linear_from_conv1d(child) if isinstance(child, Conv1D) else child
            setattr(module, child_name, make(linear))
            swapped.append(full)
    return swapped


def to_emulated_fp8(linear: nn.Linear) -> Fp8Linear:
    layer = Fp8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
    layer.load_state_dict(linear.state_dict())
    return layer


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


def convert_to_fp8(model: nn.Module, device: torch.device | str | None = None) -> str:
    """Make ``model``'s linear layers FP8, natively where possible; returns which way it was done.

    Native: GPT-2's ``Conv1D`` layers become ``nn.Linear``, then torchao's
    ``convert_to_float8_training`` swaps those whose sizes are multiples of 16. Otherwise every
    linear becomes an emulated ``Fp8Linear``.
    """
    native, why = native_fp8_available(device)
    if native:
        from torchao.float8 import convert_to_float8_training

        swap_linears(model, lambda linear: linear)
        convert_to_float8_training(
            model, module_filter_fn=lambda mod, fqn: fqn != "lm_head" and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
        )
        return "native (torchao float8, tensorwise scaling)"
    swap_linears(model, to_emulated_fp8)
    return f"emulated ({why})"
