import math

import pytest
import torch
from mixprec.formats import E4M3, E5M2, round_to_format
from mixprec.fp8 import DelayedScaling, quantize_blockwise, quantize_mx, quantize_rowwise, quantize_tensorwise


def half_ulp(v, fmt):
    """Half the grid spacing of ``fmt`` at |v| (elementwise), in the scaled domain."""
    e = torch.floor(torch.log2(v.abs().clamp(min=fmt.min_normal)))
    return torch.exp2(e - fmt.mantissa_bits - 1)


def data():
    g = torch.Generator().manual_seed(0)
    # heavy-tailed, with rows and columns of very different sizes, like real activations
    return torch.randn(256, 256, generator=g) * torch.exp2(torch.randint(-8, 8, (256, 1), generator=g).float())


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("recipe", ["tensor", "row", "block1x128", "block128x128", "tensor-pow2"])
def test_error_is_at_most_half_an_ulp(recipe, fmt):
    x = data()
    q = {
        "tensor": lambda: quantize_tensorwise(x, fmt),
        "row": lambda: quantize_rowwise(x, fmt),
        "block1x128": lambda: quantize_blockwise(x, (1, 128), fmt),
        "block128x128": lambda: quantize_blockwise(x, (128, 128), fmt),
        "tensor-pow2": lambda: quantize_tensorwise(x, fmt, power_of_two=True),
    }[recipe]()
    scaled = x * q.scale
    assert torch.equal(q.values, round_to_format(q.values, fmt))  # on the grid
    assert ((q.values - scaled).abs() <= half_ulp(scaled, fmt) * (1 + 1e-6)).all()  # no value saturated
    assert q.values.abs().max() <= fmt.max
    if recipe == "tensor-pow2":
        assert float(q.scale) == 2.0 ** round(math.log2(float(q.scale)))


def test_finer_scales_give_smaller_errors():
    x = data()
    error = {name: ((q.dequantize() - x).norm() / x.norm()).item() for name, q in {
        "tensor": quantize_tensorwise(x), "row": quantize_rowwise(x), "block": quantize_blockwise(x, (1, 128)),
    }.items()}
    assert error["block"] <= error["row"] < error["tensor"]


def test_mx_scales_are_powers_of_two_and_fill_the_range():
    x = data()
    q = quantize_mx(x)
    exponents = torch.log2(q.scale)
    assert torch.equal(exponents, exponents.round())  # E8M0: powers of two only
    blocks = q.values.abs().reshape(256, 8, 32).amax(-1)
    assert (blocks >= 2.0**E4M3.emax).all() and (blocks <= E4M3.max).all()  # each block's max in the top binade
    rel = ((q.dequantize() - x).abs() / x.abs().reshape(256, 8, 32).amax(-1, keepdim=True).expand(256, 8, 32).reshape(256, 256))
    assert rel.max() <= 2**-3  # at worst a clamped top value: 1.75·2^8 vs just under 2^9, relative to the block max
    with pytest.raises(ValueError, match="multiple"):
        quantize_mx(torch.ones(4, 30))


def test_delayed_scaling_uses_history_and_saturates():
    recipe = DelayedScaling(E4M3, history=2)
    first = recipe(torch.tensor([1.0, -2.0]))
    assert float(first.scale) == E4M3.max / 2.0  # no history yet: its own amax
    second = recipe(torch.tensor([8.0, 1.0]))  # amax 8, but the scale still comes from the history (2)
    assert float(second.scale) == E4M3.max / 2.0 and second.values[0] == E4M3.max  # clamped, not NaN
    third = recipe(torch.tensor([0.5]))
    assert float(third.scale) == E4M3.max / 8.0  # history: 2, 8
    recipe(torch.tensor([0.5]))  # history: 8, 0.5
    fifth = recipe(torch.tensor([0.5]))
    assert float(fifth.scale) == E4M3.max / 0.5  # history: 0.5, 0.5 (8 has left the 2-step window)


def test_blockwise_rejects_bad_shapes():
    with pytest.raises(ValueError, match="blocks"):
        quantize_blockwise(torch.ones(100, 100), (128, 128))
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.ones(2, 2, 128))


@pytest.mark.parametrize("quantize", [quantize_tensorwise, quantize_rowwise])
def test_scaled_matmul_native_matches_emulation(quantize):
    from mixprec.fp8 import scaled_matmul

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    qa, qb = quantize(a), quantize(b)
    emulated = scaled_matmul(qa, qb, native=False)
    reference = qa.dequantize() @ qb.dequantize().t()
    assert torch.allclose(emulated, reference, rtol=1e-5, atol=1e-5)
    native = scaled_matmul(qa, qb)  # torch._scaled_mm where this torch has the kernel, else the emulation
    assert torch.allclose(native, reference, rtol=1e-4, atol=1e-4)
    assert ((native - a @ b.t()).norm() / (a @ b.t()).norm()) < 0.1  # FP8 is coarse, but this close


def test_fp8_linear_forward_and_backward_match_fp32():
    """Stated tolerance: relative error of the output, the input gradient and the weight gradient below 10%
    (E4M3 has 3 mantissa bits, E5M2 has 2: single values are off by up to 6% and 12%; sums of many
    independent rounding errors are much closer)."""
    from mixprec.fp8 import to_emulated_fp8

    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 32)
    layer = to_emulated_fp8(reference)
    x = torch.randn(16, 64, requires_grad=True)
    x8 = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(16, 32)
    reference(x).backward(grad_out)
    out = layer(x8)
    out.backward(grad_out)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(out, reference(x)) < 0.1
    assert rel(x8.grad, x.grad) < 0.1
    assert rel(layer.weight.grad, reference.weight.grad) < 0.1
    assert torch.allclose(layer.bias.grad, reference.bias.grad)  # the bias stays FP32
