"""FP4: the formats against ml_dtypes, code by code; the NVFP4 and MXFP4 quantizers against torchao, bit for bit.

torchao 0.18's ``NVFP4Tensor.to_nvfp4`` and ``MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32)`` run on
this CPU. Tolerance: zero (compared as bit patterns, NaN included). Two documented departures are
tested against an exact rule computed with ml_dtypes instead:
* MX blocks whose amax lies below the smallest scale (amax < 2**-125 for E2M1 under floor):
  torchao quantizes with 2**-126 but stores the E8M0 code of 2**-127, so they come back halved;
  under rceil it multiplies such blocks by 1 instead of 2**127. We use the OCP range (2**-127).
* an all-zero tensor with a per-tensor scale: torchao divides 0 by 0 and returns NaN; we use a
  tensor scale of 1 and return zeros.
"""

import warnings

import ml_dtypes
import numpy as np
import pytest
import torch
from mixprec import formats
from mixprec.formats import E2M1, E4M3, E8M0, UE4M3, decode, decode_all, encode, round_to_format
from mixprec.fp4 import clipped_block_fraction, hadamard_matrix, hadamard_transform, quantize_mxfp4, quantize_nvfp4, sqnr_db

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, pack_uint4
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

MODES = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL,
         "ceil": ScaleCalculationMode.CEIL, "even": ScaleCalculationMode.EVEN}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN equals any NaN."""
    a, b = a.float(), b.float()
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32)))


# --- the formats, every code ----------------------------------------------------------------

ML = {"e2m1": ml_dtypes.float4_e2m1fn, "e8m0fnu": ml_dtypes.float8_e8m0fnu}


@pytest.mark.parametrize("name", ["e2m1", "e8m0fnu"])
def test_every_code_decodes_as_ml_dtypes(name):
    fmt = formats.get_format(name)
    codes = np.arange(2**fmt.bits, dtype=np.uint8)
    reference = codes.view(ML[name]).astype(np.float64) if fmt.bits == 8 else \
        np.array([float(np.array([c], np.uint8).view(ML[name])[0]) for c in codes])
    assert np.array_equal(decode_all(fmt).numpy(), reference, equal_nan=True)
    for code in codes.tolist():
        d = decode(code, fmt)
        assert np.array_equal(d.value, reference[code], equal_nan=True)
        if d.kind != "nan":
            assert encode(d.value, fmt) == code


def test_format_properties():
    assert (E2M1.max, E2M1.min_subnormal, E2M1.min_normal, E2M1.bits) == (6.0, 0.5, 1.0, 4)
    assert len(set(decode_all(E2M1).tolist())) == 15  # ±0 are two codes of one value
    assert not E2M1.has_inf and not E2M1.has_nan
    assert (E8M0.max, E8M0.min_normal, E8M0.bits, E8M0.has_zero) == (2.0**127, 2.0**-127, 8, False)
    assert (UE4M3.max, UE4M3.bits, UE4M3.signed) == (448.0, 7, False)
    assert decode_all(UE4M3).tolist()[:127] == decode_all(E4M3).tolist()[:127]
    # the IEEE-style and "fn" readings of E2M1 are other formats, and keep their own names
    assert formats.custom_format(2, 1).max == 3.0 and formats.get_format("e2m1ieee").max == 3.0
    assert formats.custom_format(2, 1, "fn").max == 4.0
    assert formats.get_format("float4_e2m1fn") is E2M1 and formats.get_format(torch.float8_e8m0fnu) is E8M0
    with pytest.raises(ValueError, match="no NaN"):
        encode(float("nan"), E2M1)
    with pytest.raises(ValueError, match="no zero"):
        encode(0.0, E8M0)
    with pytest.raises(ValueError, match="unsigned"):
        encode(-1.0, UE4M3)


def _probe_values() -> torch.Tensor:
    """Every float32 neighbourhood that matters: all codes, midpoints, their neighbours, random magnitudes."""
    g = torch.Generator().manual_seed(0)
    wide = torch.exp2(torch.empty(20000).uniform_(-140, 130, generator=g)) * torch.randn(20000, generator=g).sign()
    grid = torch.cat([decode_all(E2M1), decode_all(E8M0)]).float()
    grid = grid[grid.isfinite()]
    mids = torch.cat([(grid[:-1] + grid[1:]) / 2, grid * 1.5, grid * 0.75])
    base = torch.cat([grid, mids, wide, torch.randn(5000, generator=g) * 4])
    near = torch.cat([base, torch.nextafter(base, torch.full_like(base, np.inf)), torch.nextafter(base, torch.full_like(base, -np.inf))])
    return torch.cat([near, torch.tensor([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45])])


@pytest.mark.parametrize("name", ["e2m1", "e8m0fnu"])
def test_round_to_nearest_as_ml_dtypes(name):
    x = _probe_values()
    ours = round_to_format(x, name)
    reference = torch.from_numpy(x.numpy().astype(ML[name]).astype(np.float32))
    assert bits_equal(ours, reference)


def test_nan_and_infinity_rules():
    nan, inf = float("nan"), float("inf")
    # E2M1: saturates (the only thing a format without inf and NaN can do); NaN stays a float32 NaN
    assert round_to_format(torch.tensor([inf, -inf, 7.0, -100.0]), E2M1).tolist() == [6, -6, 6, -6]
    assert round_to_format(torch.tensor([nan]), E2M1).isnan().all()
    with pytest.raises(ValueError, match="neither inf nor NaN"):
        round_to_format(torch.ones(2), E2M1, overflow="nonfinite")
    # E8M0: overflow, inf, zero and negatives are NaN; saturate clamps overflow only
    assert round_to_format(torch.tensor([2.0**127 * 1.6, inf, 0.0, -2.0, nan]), E8M0).isnan().all()
    assert round_to_format(torch.tensor([inf, 2.0**127 * 1.6]), E8M0, overflow="saturate").tolist() == [2.0**127] * 2
    # UE4M3: negatives NaN, -0 is +0, overflow saturates (as NVFP4's clamped scales)
    out = round_to_format(torch.tensor([-1.0, -0.0, 500.0]), UE4M3)
    assert out[0].isnan() and out[1].item() == 0 and not out[1].signbit() and out[2].item() == 448


@pytest.mark.parametrize("name", ["e2m1", "e8m0fnu"])
def test_stochastic_rounding_is_unbiased_and_on_the_grid(name):
    fmt = formats.get_format(name)
    x = torch.full((40000,), 2.6) if name == "e2m1" else torch.full((40000,), 5.0)
    out = round_to_format(x, fmt, "stochastic", torch.Generator().manual_seed(1))
    assert set(out.unique().tolist()) == ({2.0, 3.0} if name == "e2m1" else {4.0, 8.0})
    assert abs(out.mean().item() - x[0].item()) < 0.02 * x[0].item()


def test_pack_unpack_equal_torchao():
    g = torch.Generator().manual_seed(2)
    values = round_to_format(torch.randn(8, 64, generator=g) * 3, E2M1)
    values[0, :16] = decode_all(E2M1).float()
    packed = formats.pack_e2m1(values)
    assert packed.dtype == torch.float4_e2m1fn_x2 and packed.shape == (8, 32)
    assert torch.equal(packed.view(torch.uint8), pack_uint4(f32_to_f4_unpacked(values)))
    assert bits_equal(formats.unpack_e2m1(packed), values)
    assert packed.view(torch.uint8)[0, 0].item() == 0x10  # element 0 (0.0) low nibble, element 1 (0.5) high
    with pytest.raises(ValueError, match="grid"):
        formats.pack_e2m1(torch.tensor([0.7, 1.0]))


# --- the quantizers against torchao ------------------------------------------------------------

def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(32, 128, generator=g) * torch.exp2(torch.randint(-20, 20, (32, 1), generator=g).float())
    wide[:, ::7] *= 1000  # outliers inside blocks
    zero_blocks = torch.randn(16, 64, generator=g)
    zero_blocks[:, :32] = 0
    special = torch.randn(16, 64, generator=g)
    special[1, 3], special[2, 40], special[5, 0] = float("nan"), float("inf"), float("-inf")
    return {"random": torch.randn(64, 256, generator=g), "wide": wide,
            "tiny": torch.randn(16, 64, generator=g) * 2.0**-128, "zero_blocks": zero_blocks, "special": special,
            "bf16": torch.randn(32, 64, generator=g).bfloat16().float()}


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("per_tensor", [True, False])
def test_nvfp4_equals_torchao(case, per_tensor):
    x = CASES[case]
    scale = per_tensor_amax_to_scale(x.abs().amax()) if per_tensor else None
    ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale)
    ours = quantize_nvfp4(x, per_tensor_scale=per_tensor)
    assert bits_equal(ours.dequantize(), ref.dequantize(torch.float32))
    blocks = ours.block_scale.reshape(x.shape[0], -1, 16)[..., 0]
    assert bits_equal(blocks, ref.scale.float())
    if not per_tensor or x.isfinite().all():  # the codes, where they mean something: rows without NaN
        finite_rows = ~x.isnan().any(-1)
        codes = formats.pack_e2m1(ours.values[finite_rows]).view(torch.uint8)
        assert torch.equal(codes, ref.qdata.view(torch.uint8)[finite_rows])


def test_nvfp4_all_zero_tensor():
    x = torch.zeros(4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))
    assert ref.dequantize(torch.float32).isnan().all()  # torchao: 0 / 0
    assert torch.equal(quantize_nvfp4(x).dequantize(), x)  # ours: tensor scale 1


@pytest.mark.parametrize("case", [c for c in CASES if c != "tiny"])
@pytest.mark.parametrize("scaling", list(MODES))
def test_mxfp4_equals_torchao(case, scaling):
    x = CASES[case]
    ref = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=MODES[scaling])
    ours = quantize_mxfp4(x, scaling)
    assert bits_equal(ours.dequantize(), ref.dequantize(torch.float32))
    finite_rows = ~x.isnan().any(-1)
    codes = formats.pack_e2m1(ours.values[finite_rows]).view(torch.uint8)
    assert torch.equal(codes, ref.qdata.view(torch.uint8)[finite_rows])


@pytest.mark.parametrize("scaling", ["floor", "ceil", "even"])
def test_mxfp4_tiny_blocks_follow_the_ocp_scale_range(scaling):
    """Blocks below the smallest scale: the exact rule, computed with ml_dtypes; torchao halves them."""
    x = CASES["tiny"]  # amax < 2**-125: floor(log2 amax) - 2 < -127, so the scale is clamped to 2**-127
    ours = quantize_mxfp4(x, scaling).dequantize()
    scaled = (x.double() * 2.0**127).clamp(-6, 6).numpy()
    reference = torch.from_numpy(scaled.astype(np.float32).astype(ml_dtypes.float4_e2m1fn).astype(np.float64) * 2.0**-127)
    assert bits_equal(ours, reference.float())
    ref = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=MODES[scaling]).dequantize(torch.float32)
    # torchao: E2M1 values quantized at the scale 2**-126 and dequantized with 2**-127: halved
    halved = round_to_format((x.double() * 2.0**126).clamp(-6, 6).float(), E2M1).double() * 2.0**-127
    assert bits_equal(ref, halved.float()) and not bits_equal(ref, ours)


def test_nvfp4_2d_blocks_give_the_same_weight_both_ways():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    q = quantize_nvfp4(w, block_2d=True)
    tiles = q.block_scale.reshape(3, 16, 4, 16)
    assert torch.equal(tiles, tiles[:, :1, :, :1].expand_as(tiles))  # one scale per 16×16 tile
    assert torch.equal(quantize_nvfp4(w.t(), block_2d=True).dequantize(), q.dequantize().t())
    assert not torch.equal(quantize_nvfp4(w.t()).dequantize(), quantize_nvfp4(w).dequantize().t())  # 1-D blocks: not so
    # every 1×16 block's amax is at most its tile's: a 2-D scale is never smaller than the 1-D one
    assert sqnr_db(w, q.dequantize()) <= sqnr_db(w, quantize_nvfp4(w).dequantize())


def test_hadamard_is_orthogonal_and_invertible():
    q = hadamard_matrix(16, seed=0)
    assert torch.allclose(q @ q.t(), torch.eye(16), atol=1e-6)
    assert set(q.abs().unique().tolist()) == {0.25}
    assert not torch.equal(q, hadamard_matrix(16, seed=1))
    x = torch.randn(8, 64)
    y = hadamard_transform(x, q)
    assert torch.allclose(hadamard_transform(y, q.t()), x, atol=1e-5)
    assert torch.allclose(y.norm(), x.norm(), rtol=1e-5)
    a, b = torch.randn(5, 32), torch.randn(7, 32)  # a product over the transformed dimension is unchanged
    assert torch.allclose(hadamard_transform(a, q) @ hadamard_transform(b, q).t(), a @ b.t(), atol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_nvfp4_beats_mxfp4_and_floor_clips():
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(5))
    nv, mx = sqnr_db(x, quantize_nvfp4(x).dequantize()), sqnr_db(x, quantize_mxfp4(x).dequantize())
    assert nv > mx
    assert 0 < clipped_block_fraction(x, "floor") < 1 and clipped_block_fraction(x, "rceil") == 0


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        quantize_nvfp4(torch.ones(3, 10))
    with pytest.raises(ValueError, match="scaling must be one of"):
        quantize_mxfp4(torch.ones(2, 32), "round")
    with pytest.raises(TypeError, match="floating-point"):
        quantize_mxfp4(torch.ones(2, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D blocks"):
        quantize_nvfp4(torch.ones(8, 32), block_2d=True)


def test_exercise_checkers():
    from mixprec.exercises import check_e2m1_pair, check_nvfp4_scales

    assert check_e2m1_pair(0x9A, (-1.0, -0.5)) and not check_e2m1_pair(0x9A, (-0.5, -1.0))
    assert "对调" in str(check_e2m1_pair(0x9A, (-0.5, -1.0)))
    assert check_e2m1_pair(0x7F, (-6.0, 6.0)) and not check_e2m1_pair(300, (0, 0)) and not check_e2m1_pair(1, (0.5,))
    assert check_nvfp4_scales(100, 3, tensor_scale=100 / 2688, block_scale=13)
    assert not check_nvfp4_scales(100, 3, tensor_scale=100 / 2688, block_scale=13.44)  # not rounded to E4M3
    assert not check_nvfp4_scales(100, 3, tensor_scale=100 / 448, block_scale=13)
    assert not check_nvfp4_scales(3, 100, tensor_scale=1, block_scale=1)


def test_format_explorer_takes_e2m1_and_refuses_scale_formats():
    from mixprec.widgets import format_explorer, format_spec

    assert "MixprecFloat.mount" in format_explorer("5", formats=("e2m1", "bf16"))._repr_html_()
    assert format_spec(E2M1)["overflow"] == "saturate" and format_spec(E2M1)["special"] == "none"
    with pytest.raises(ValueError, match="scale formats"):
        format_explorer("1", formats=("e8m0fnu",))
