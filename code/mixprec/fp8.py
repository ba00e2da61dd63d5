"""FP8 linear layers: emulated on any device, or torchao's float8 training on GPUs that have FP8.

The recipe is the usual one: activations and weights in E4M3 (more precision) for the forward
matmul, gradients in E5M2 (more range) for the backward matmuls, each tensor scaled by its own
current absolute maximum so that it fills the format's range ("per-tensor current scaling").
The matmuls then accumulate in FP32, as FP8 tensor cores do.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import E4M3, E5M2, FloatFormat, round_to_format


def quantize_per_tensor(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """x rounded to ``fmt`` after scaling its amax to ``fmt.max``, then scaled back (dequantized), in float32."""
    amax = x.detach().abs().amax().float()
    scale = fmt.max / torch.clamp(amax, min=1e-12)
    return round_to_format(x.float() * scale, fmt, overflow="saturate") / scale


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        xq, wq = quantize_per_tensor(x, E4M3), quantize_per_tensor(weight, E4M3)
        ctx.save_for_backward(xq, wq)
        return xq @ wq.t()

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        gq = quantize_per_tensor(grad_out, E5M2)
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
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return False, "FP8 matmuls need an NVIDIA GPU with compute capability 8.9+ (L4, H100); this is a CPU"
    if torch.cuda.get_device_capability(dev) < (8, 9):
        return False, f"{torch.cuda.get_device_name(dev)} has compute capability {torch.cuda.get_device_capability(dev)}; FP8 needs 8.9+"
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
