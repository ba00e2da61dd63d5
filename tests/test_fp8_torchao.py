"""The hand-written FP8 code against the library it teaches: torchao, on this machine's CPU.

torchao's float8 training runs here with ``emulate=True`` (its own FP32 emulation of the FP8
products), ``MXTensor.to_mx`` quantizes to MXFP8 with its emulated kernels, and torchao's MXFP8
training layer (``torchao.prototype.moe_training.mxfp8_linear.MXFP8Linear``) runs with
``KernelPreference.EMULATED``. Tolerance: zero.
Both compute the same scales (torchao divides in float64 and rounds once to float32, which equals
our float32 division: one correctly rounded quotient either way), the same saturating casts, and
the same FP32 products in the same order, so every output and gradient is equal bit for bit.

Two documented differences, each tested on its own:
* torchao clamps a tensor's amax at 1e-12 before ``448 / amax``, so tensors whose largest value is
  below 1e-12 quantize to zero there; ours keep them (the scale only has to stay a finite float32).
* MX blocks whose scale would fall below 2**-126 (amax < 2**-118 for E4M3): torchao quantizes with
  2**-126 but records the E8M0 code of 2**-127, so its dequantized block comes back at half its
  value. We use 2**-127 for both, as the OCP MX v1.0 scale range says.

The ``blockwise`` recipe (DeepSeek-V3) has no torchao reference that runs on a CPU: torchao's
``prototype.blockwise_fp8_training`` (its layer and its ``torch_blockwise_scale_*`` reference
quantizers alike) imports triton at module level. It is held equal instead to an independent
reference: NumPy with ml_dtypes' E4M3 cast, following the same rule (scale = 448 / amax in float64,
rounded to float32; saturate; dequantize by dividing by the scale).
"""

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from mixprec import fp8

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ao_float8 = pytest.importorskip("torchao.float8")
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference


def activations(rows=64, cols=256, seed=0, spread=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-spread, spread, (rows, 1), generator=g).float())


def run_both(recipe, x, grad_out, layer):
    """(output, input grad, weight grad, bias grad) of torchao's emulated layer and ours, from one module."""
    results = []
    for convert in ("torchao", "mixprec"):
        model = torch.nn.Sequential(copy.deepcopy(layer))
        if convert == "torchao":
            config = dataclasses.replace(ao_float8.Float8LinearConfig.from_recipe_name(recipe), emulate=True)
            ao_float8.convert_to_float8_training(model, config=config)
        else:
            fp8.convert_to_float8_training(model, config=fp8.Float8LinearConfig.from_recipe_name(recipe))
        inp = x.detach().clone().requires_grad_(True)
        out = model(inp)
        out.backward(grad_out)
        results.append((out.detach(), inp.grad, model[0].weight.grad, model[0].bias.grad))
    return results


@pytest.mark.parametrize("recipe", fp8.TORCHAO_RECIPES)
@pytest.mark.parametrize("shape", [(64, 256, 128), (2, 32, 64, 48)])  # (M, K, N) and a 3-D input (B, T, K, N)
def test_float8_linear_equals_torchao_emulate(recipe, shape):
    torch.manual_seed(0)
    *lead, k, n = shape
    layer = torch.nn.Linear(k, n)
    x = activations(math.prod(lead), k).reshape(*lead, k)
    grad_out = torch.randn(*lead, n) * 1e-3
    (ao, ours) = run_both(recipe, x, grad_out, layer)
    for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias"), ao, ours, strict=True):
        assert torch.equal(a, b), f"{recipe}: {name} differs from torchao by up to {(a - b).abs().max().item():.3g}"


def test_the_conversion_has_torchaos_names_and_signature():
    """A reader swaps ``from torchao.float8 import ...`` for ``from mixprec.fp8 import ...``."""
    import inspect

    ours, theirs = inspect.signature(fp8.convert_to_float8_training), inspect.signature(ao_float8.convert_to_float8_training)
    assert list(ours.parameters) == list(theirs.parameters)[: len(ours.parameters)]
    for name in fp8.TORCHAO_RECIPES:
        assert name in [r.value for r in ao_float8.Float8LinearRecipeName]
        fp8.Float8LinearConfig.from_recipe_name(ao_float8.Float8LinearRecipeName(name))  # torchao's enum works too
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16))
    fp8.convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn != "1")
    assert isinstance(model[0], fp8.Float8Linear) and type(model[1]) is torch.nn.Linear


def test_tiny_tensors_where_torchao_flushes_to_zero():
    layer = torch.nn.Linear(32, 16)
    x = activations(16, 32) * 1e-16  # amax ~1e-14, below torchao's 1e-12 clamp
    ao, ours = run_both("tensorwise", x, torch.randn(16, 16), layer)
    x_q_ours = fp8.quantize_tensorwise(x).dequantize()
    assert (x_q_ours - x).abs().max() <= x.abs().max() * 2**-4
    expected = x_q_ours @ fp8.quantize_tensorwise(layer.weight).dequantize().t() + layer.bias
    assert torch.allclose(ours[0], expected)
    assert torch.equal(ao[0], layer.bias.detach().expand(16, 16))  # torchao: the input quantized to 0


def mx_blocks():
    """Rows of 32-value blocks spanning 60 binades, and every special block."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-30, 30, (64, 8), generator=g).float()).repeat_interleave(32, 1)
    x[0, :32] = 0.0  # all zeros
    x[1, :32] = torch.randn(32, generator=g) * 1e-20  # tiny, normal
    x[2, 5] = math.inf  # one inf
    x[3, 7] = math.nan  # one NaN
    x[4, :32] = 448 * 2.0**100  # huge, at the top of E4M3 after scaling
    x[5, 32:64] = -math.inf  # all -inf
    x[6, 64:96] = torch.randn(32, generator=g) * 2.0**-100  # amax ~2**-98: still above the bottom of the scale range
    x[7, :32] = torch.linspace(-1, 1, 32) * 511  # amax just under 2**9: the floor rule's worst clipping
    return x


@pytest.mark.parametrize("mode", ["floor", "rceil", "ceil", "even"])
def test_mx_quantizer_equals_torchao_to_mx_bit_for_bit(mode):
    x = mx_blocks()
    reference = MXTensor.to_mx(x, torch.float8_e4m3fn, 32, scaling_mode=ScaleCalculationMode(mode)).dequantize(torch.float32)
    ours = fp8.quantize_mx(x, "e4m3fn", 32, scale_mode=mode).dequantize()
    same = (reference == ours) | (reference.isnan() & ours.isnan())
    assert same.all(), f"{int((~same).sum())} values differ, in blocks {(~same).reshape(64, 8, 32).any(-1).nonzero().tolist()[:5]}"
    assert ours[3, :32].isnan().all() and ours[0, :32].eq(0).all()  # a NaN block comes back NaN; zeros stay zeros


def test_mx_blocks_below_the_scale_range_follow_the_spec():
    """amax < 2**-118: the shared exponent clamps at E8M0's bottom, 2**-127. Ours quantizes and
    dequantizes with it (error within half an E4M3 step); torchao dequantizes to half the value."""
    x = torch.zeros(2, 32)
    x[0] = torch.linspace(0.1, 1, 32) * 1e-40  # subnormal float32 values
    x[1] = torch.linspace(0.1, 1, 32) * 2.0**-120
    q = fp8.quantize_mx(x)
    assert torch.equal(q.scale, torch.full_like(x, 2.0**127))
    assert ((q.dequantize() - x).abs() <= 2.0**-127 * 2.0**-10 + x.abs() * 2**-4).all()
    reference = MXTensor.to_mx(x, torch.float8_e4m3fn, 32).dequantize(torch.float32)
    assert not torch.equal(reference, q.dequantize())  # the documented difference (see the module docstring)


# --- the mxfp8 training layer against torchao's MXFP8 training matmul --------------------------

@pytest.mark.parametrize("shape", [(64, 256, 128), (2, 32, 64, 96)])  # (M, K, N) and a 3-D input (B, T, K, N)
def test_mxfp8_linear_equals_torchao_mxfp8_linear_emulated(shape):
    """The ``mxfp8`` recipe's forward output, input gradient, weight gradient and bias gradient equal
    torchao's ``MXFP8Linear`` (emulated kernels, the OCP ``floor`` scale rule) bit for bit. torchao's
    layer defaults to the ``rceil`` rule; our recipe keeps the specification's ``floor``."""
    torch.manual_seed(0)
    *lead, k, n = shape
    layer = torch.nn.Linear(k, n)
    x = activations(math.prod(lead), k).reshape(*lead, k)
    grad_out = torch.randn(*lead, n) * 1e-3
    theirs = MXFP8Linear(k, n, kernel_preference=KernelPreference.EMULATED, scale_calculation_mode=ScaleCalculationMode.FLOOR)
    theirs.load_state_dict(layer.state_dict())
    ours = fp8.Float8Linear.from_float(copy.deepcopy(layer), fp8.Float8LinearConfig.from_recipe_name("mxfp8"))
    results = []
    for module in (theirs, ours):
        inp = x.detach().clone().requires_grad_(True)
        out = module(inp)
        out.backward(grad_out)
        results.append((out.detach(), inp.grad, module.weight.grad, module.bias.grad))
    for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias"), *results, strict=True):
        assert torch.equal(a, b), f"mxfp8: {name} differs from torchao by up to {(a - b).abs().max().item():.3g}"


# --- the blockwise recipe against an independent reference (ml_dtypes) --------------------------

def blockwise_reference(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x`` (2-D, float32) quantized to E4M3 in rows × cols tiles and dequantized, in NumPy with ml_dtypes."""
    import numpy as np

    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = x.detach().numpy().astype(np.float32)
    m, k = a.shape
    tiles = a.reshape(m // rows, rows, k // cols, cols)
    amax = np.abs(tiles).max(axis=(1, 3), keepdims=True).astype(np.float64)
    f32 = np.finfo(np.float32)
    scale = np.minimum(448.0 / np.maximum(amax, f32.tiny), f32.max).astype(np.float32)  # an all-zero tile: the largest finite scale
    scaled = np.clip(tiles * scale, -448.0, 448.0)  # float32 product, then saturate
    codes = scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return torch.from_numpy((codes / scale).reshape(m, k))


def test_blockwise_quantizer_equals_ml_dtypes_reference():
    x = activations(256, 384, spread=20)
    x[3, :128] = 0.0  # an all-zero tile
    for block in ((1, 128), (128, 128)):
        ours = fp8.quantize_blockwise(x, block).dequantize()
        assert torch.equal(ours, blockwise_reference(x, *block)), f"blockwise {block} differs from the ml_dtypes reference"


@pytest.mark.parametrize("shape", [(256, 256, 128), (2, 128, 128, 256)])  # (M, K, N) and a 3-D input (B, T, K, N)
def test_blockwise_linear_equals_the_ml_dtypes_reference(shape):
    """The ``blockwise`` recipe's three products, each operand cast as DeepSeek-V3 casts it: 1×128
    tiles along K for activations and output gradients, 128×128 for the weight; in the weight
    gradient's product the output gradient and the input are tiled along the tokens (their K)."""
    torch.manual_seed(0)
    *lead, k, n = shape
    layer = torch.nn.Linear(k, n)
    x = activations(math.prod(lead), k).reshape(*lead, k)
    grad_out = torch.randn(*lead, n) * 1e-3
    ours = fp8.Float8Linear.from_float(copy.deepcopy(layer), fp8.Float8LinearConfig.from_recipe_name("blockwise"))
    inp = x.detach().clone().requires_grad_(True)
    out = ours(inp)
    out.backward(grad_out)

    x2, g2, w = x.reshape(-1, k), grad_out.reshape(-1, n), layer.weight.detach()
    expected = {
        "output": (blockwise_reference(x2, 1, 128) @ blockwise_reference(w, 128, 128).t() + layer.bias.detach()).reshape(*lead, n),
        "grad_input": (blockwise_reference(g2, 1, 128) @ blockwise_reference(w, 128, 128)).reshape(*lead, k),
        "grad_weight": blockwise_reference(g2.t().contiguous(), 1, 128) @ blockwise_reference(x2.t().contiguous(), 1, 128).t(),
    }
    for name, got in (("output", out.detach()), ("grad_input", inp.grad), ("grad_weight", ours.weight.grad)):
        want = expected[name]
        assert torch.equal(got, want), f"blockwise: {name} differs from the reference by up to {(got - want).abs().max().item():.3g}"
