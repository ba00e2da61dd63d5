"""Floating-point formats as data, and exact emulation of any of them on float32.

A binary floating-point format is fixed by three numbers and one convention:

* ``exponent_bits`` (E) and ``mantissa_bits`` (M): the field widths; one sign bit comes on top;
* ``bias``: stored exponent minus bias is the true exponent (IEEE: ``2**(E-1) - 1``);
* ``special``: how the all-ones exponent field is used.
  ``"ieee"`` reserves it for inf (mantissa 0) and NaN (anything else), like FP16 and E5M2.
  ``"fn"`` ("finite, NaN") has no inf and gives up only the all-ones code to NaN, like E4M3FN,
  which is how E4M3 reaches 448 instead of 240 (with no mantissa bits, as in E8M0, the all-ones
  exponent field is that code). ``"none"`` has neither inf nor NaN: every code is a number, like
  the OCP FP4 format E2M1, which is how two exponent bits reach 6;
* ``signed`` (default True): a sign bit; the scale formats UE4M3 and E8M0 have none;
* ``subnormals`` (default True): exponent field 0 holds zero and the subnormals; without them it
  is one more binade of normal numbers, so there is no zero (E8M0: field 0 is 2**-127).

Everything else (max, min normal, min subnormal, eps) follows from these, so it is computed here,
never typed in.

``round_to_format`` rounds float32 tensors to the values of a format, bit for bit like torch's own
casts, with round-to-nearest-even or stochastic rounding. It is plain vectorised torch, so it
emulates formats the hardware lacks (FP8 on a CPU, or a made-up E3M4) on any device. That eager
code is the readable reference. For large tensors an opt-in fused path (``MIXPREC_COMPILE_ROUNDING=1``)
runs the same rounding as one ``torch.compile`` kernel of integer arithmetic on the bit patterns,
bit-exact with the eager path for round-to-nearest-even (``_round_bits_fused``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

Special = Literal["ieee", "fn", "none"]
Rounding = Literal["nearest", "stochastic"]
Overflow = Literal["auto", "saturate", "nonfinite"]
Impl = Literal["auto", "eager", "compiled"]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exponent_bits``, ``mantissa_bits``."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    special: Special = "ieee"
    torch_dtype: torch.dtype | None = None
    signed: bool = True
    subnormals: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.exponent_bits <= 11:
            raise ValueError(f"{self.name}: exponent_bits must be in 1..11, got {self.exponent_bits}")
        if not 0 <= self.mantissa_bits <= 52:
            raise ValueError(f"{self.name}: mantissa_bits must be in 0..52, got {self.mantissa_bits}")
        if self.special not in ("ieee", "fn", "none"):
            raise ValueError(f"{self.name}: special must be 'ieee', 'fn' or 'none', got {self.special!r}")
        if self.special == "fn" and self.mantissa_bits == 0 and self.exponent_bits < 2:
            raise ValueError(f"{self.name}: an 'fn' format without mantissa bits needs at least two exponent bits")
        if not self.subnormals and self.mantissa_bits:
            raise ValueError(f"{self.name}: subnormals=False is modelled for formats without mantissa bits (E8M0) only")
        if isinstance(self.bias, bool) or not isinstance(self.bias, int):
            raise TypeError(f"{self.name}: bias must be an int, got {self.bias!r}")
        top_field = self.emax + self.bias
        low, high = top_field - 1023, 1075 - self.mantissa_bits  # every value, subnormals included, a float64
        if not low <= self.bias <= high:
            raise ValueError(f"{self.name}: bias must be in {low}..{high} for E{self.exponent_bits}M{self.mantissa_bits} "
                             f"(so that its range fits float64's), got {self.bias}")
        if self.max <= 0:
            raise ValueError(f"{self.name}: E{self.exponent_bits}M{self.mantissa_bits} ({self.special}) has no positive finite value")

    # --- derived properties -------------------------------------------------------------
    @property
    def bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def emin(self) -> int:
        """True exponent of the smallest normal number (field 1, or field 0 in a format without subnormals)."""
        return (1 if self.subnormals else 0) - self.bias

    @property
    def emax(self) -> int:
        """True exponent of the largest finite number."""
        top_field = 2**self.exponent_bits - 1
        whole_top_field_special = self.special == "ieee" or (self.special == "fn" and self.mantissa_bits == 0)
        return (top_field - 1 if whole_top_field_special else top_field) - self.bias

    @property
    def has_normals(self) -> bool:
        """False for a tiny IEEE-style format whose only finite exponent field is 0 (E1): all its numbers are subnormal."""
        return self.emax >= self.emin

    @property
    def max(self) -> float:
        m = self.mantissa_bits
        if not self.has_normals:  # the largest subnormal
            return math.ldexp(2**m - 1, self.emin - m)
        # "fn" loses the all-ones mantissa of the top binade to NaN (with m = 0, the whole top binade).
        top_mantissa = 2**m - 2 if self.special == "fn" and m else 2**m - 1
        return math.ldexp(1 + top_mantissa / 2**m, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """The smallest positive value (the smallest normal in a format without subnormals)."""
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Gap between 1 and the next larger number: 2**-M."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def decimal_digits(self) -> float:
        """Significant decimal digits, log10(2**(M+1))."""
        return (self.mantissa_bits + 1) * math.log10(2)

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.special != "none"

    @property
    def has_zero(self) -> bool:
        return self.subnormals

    @property
    def bytes(self) -> float:
        return self.bits / 8

    def ulp(self, x: float) -> float:
        """Spacing of representable numbers at |x| (the gap above |x|'s binade start)."""
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"ulp needs a real number, got {x!r}")
        try:
            a = abs(float(x))
        except OverflowError:
            raise ValueError(f"ulp is defined for finite numbers; this int is beyond float64's range ({str(x)[:20]}...)") from None
        if not math.isfinite(a):
            raise ValueError(f"ulp is defined for finite numbers, got {x!r}")
        e = self.emin if a < self.min_normal else math.frexp(a)[1] - 1
        return math.ldexp(1.0, e - self.mantissa_bits)

    def __repr__(self) -> str:
        extra = ("" if self.signed else ", unsigned") + ("" if self.subnormals else ", no subnormals")
        return f"FloatFormat({self.name}: E{self.exponent_bits}M{self.mantissa_bits}, bias={self.bias}, {self.special}{extra})"


def custom_format(exponent_bits: int, mantissa_bits: int, special: Special = "ieee", bias: int | None = None) -> FloatFormat:
    """Any ExMy format; the bias defaults to the IEEE choice 2**(E-1) - 1.

    Its name reads back through ``get_format`` to the same format: ``e3m4``, ``e4m3fn``, ``e5m2_b20``
    for a bias other than the default, and ``e4m3ieee`` where the plain name already means another
    format (``e4m3`` is the common name of E4M3FN).
    """
    for name, value in (("exponent_bits", exponent_bits), ("mantissa_bits", mantissa_bits)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    default_bias = 2 ** (exponent_bits - 1) - 1
    if bias is None:
        bias = default_bias
    name = f"e{exponent_bits}m{mantissa_bits}" + {"fn": "fn", "none": "finite"}.get(special, "")
    if special == "ieee" and _ALIASES.get(name, name) in FORMATS and FORMATS[_ALIASES.get(name, name)].special != "ieee":
        name += "ieee"
    if bias != default_bias:
        name += f"_b{bias}"
    return FloatFormat(name, exponent_bits, mantissa_bits, bias, special)


FP64 = FloatFormat("fp64", 11, 52, 1023, "ieee", torch.float64)
FP32 = FloatFormat("fp32", 8, 23, 127, "ieee", torch.float32)
TF32 = FloatFormat("tf32", 8, 10, 127, "ieee", None)  # a compute mode, never a storage dtype
FP16 = FloatFormat("fp16", 5, 10, 15, "ieee", torch.float16)
BF16 = FloatFormat("bf16", 8, 7, 127, "ieee", torch.bfloat16)
E4M3 = FloatFormat("e4m3fn", 4, 3, 7, "fn", torch.float8_e4m3fn)
E5M2 = FloatFormat("e5m2", 5, 2, 15, "ieee", torch.float8_e5m2)
# The OCP FP4 element format: no inf, no NaN, so its 16 codes are 15 distinct values (±0 twice):
# 0, 0.5 (the one subnormal), 1, 1.5, 2, 3, 4, 6. (custom_format(2, 1) is the IEEE-style E2M1,
# max 3, and "e2m1fn" would be max 4: neither is the format FP4 hardware uses, so "e2m1" names this one.)
E2M1 = FloatFormat("e2m1", 2, 1, 1, "none")  # torch.float4_e2m1fn_x2 is packed storage only: see pack_e2m1
# The scale formats of the block formats: E8M0 (MX), powers of two 2**-127 .. 2**127, 0xFF NaN, no
# zero, no sign; UE4M3 (NVFP4), E4M3 without its sign bit.
E8M0 = FloatFormat("e8m0fnu", 8, 0, 127, "fn", torch.float8_e8m0fnu, signed=False, subnormals=False)
UE4M3 = FloatFormat("ue4m3", 4, 3, 7, "fn", signed=False)

FORMATS: dict[str, FloatFormat] = {f.name: f for f in (FP64, FP32, TF32, FP16, BF16, E4M3, E5M2, E2M1, E8M0, UE4M3)}
_ALIASES = {
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "float16": "fp16",
    "half": "fp16", "bfloat16": "bf16", "e4m3": "e4m3fn", "fp8_e4m3": "e4m3fn", "float8_e4m3fn": "e4m3fn",
    "fp8_e5m2": "e5m2", "float8_e5m2": "e5m2", "fp4": "e2m1", "float4_e2m1fn": "e2m1",
    "fp4_e2m1": "e2m1", "e8m0": "e8m0fnu", "float8_e8m0fnu": "e8m0fnu", "ue8m0": "e8m0fnu",
}


def get_format(fmt: str | FloatFormat | torch.dtype) -> FloatFormat:
    """Look a format up by name (``"fp16"``, ``"e4m3fn"``, ``"e3m4"``...), torch dtype, or pass one through."""
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, torch.dtype):
        for f in FORMATS.values():
            if f.torch_dtype == fmt:
                return f
        raise ValueError(f"no format for torch dtype {fmt}; known dtypes: {[str(f.torch_dtype) for f in FORMATS.values() if f.torch_dtype]}")
    if not isinstance(fmt, str):
        raise TypeError(f"expected a format name, FloatFormat or torch.dtype, got {type(fmt).__name__}")
    key = _ALIASES.get(fmt.lower(), fmt.lower())
    if key in FORMATS:
        return FORMATS[key]
    custom = re.fullmatch(r"e(\d{1,2})m(\d{1,2})(fn|ieee|finite)?(?:_b(-?\d{1,4}))?", key)
    if custom:
        e, m, special, bias = custom.groups()
        special = {"fn": "fn", "finite": "none"}.get(special, "ieee")
        return custom_format(int(e), int(m), special, None if bias is None else int(bias))
    raise ValueError(f"unknown format {fmt!r}; use one of {sorted(FORMATS)} or 'eXmY' / 'eXmYfn' / 'eXmYieee' "
                     "(optionally '_b<bias>') for a custom one")


# --- bit patterns ---------------------------------------------------------------------------

Kind = Literal["zero", "subnormal", "normal", "inf", "nan"]


@dataclass(frozen=True)
class Decoded:
    """A bit pattern taken apart: the three fields, what they mean, and the value."""

    sign: int
    exponent_field: int
    mantissa_field: int
    kind: Kind
    exponent: int | None  # true (unbiased) exponent; None for zero, inf and NaN
    value: float

    def bits(self, fmt: FloatFormat) -> str:
        """The pattern as 'S EEEEE MMMMMMMMMM'."""
        e = format(self.exponent_field, f"0{fmt.exponent_bits}b")
        m = format(self.mantissa_field, f"0{fmt.mantissa_bits}b") if fmt.mantissa_bits else ""
        return f"{self.sign} {e} {m}".rstrip()


def decode(code: int, fmt: str | FloatFormat) -> Decoded:
    """Split an integer bit pattern of ``fmt`` into sign, exponent and mantissa, and give its value."""
    fmt = get_format(fmt)
    if not isinstance(code, int) or not 0 <= code < 2**fmt.bits:
        raise ValueError(f"{fmt.name} codes are integers in [0, 2**{fmt.bits}), got {code!r}")
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    sign = code >> (E + M)  # 0 in an unsigned format: its codes have no sign bit
    e_field = (code >> M) & (2**E - 1)
    m_field = code & (2**M - 1)
    s = -1.0 if sign else 1.0
    top = 2**E - 1
    if e_field == top and fmt.special == "ieee":
        if m_field == 0:
            return Decoded(sign, e_field, m_field, "inf", None, s * math.inf)
        return Decoded(sign, e_field, m_field, "nan", None, math.nan)
    if e_field == top and m_field == 2**M - 1 and fmt.special == "fn":  # "fn": only the all-ones code is NaN
        return Decoded(sign, e_field, m_field, "nan", None, math.nan)
    if e_field == 0 and fmt.subnormals:
        if m_field == 0:
            return Decoded(sign, 0, 0, "zero", None, s * 0.0)
        return Decoded(sign, 0, m_field, "subnormal", fmt.emin, s * math.ldexp(m_field, fmt.emin - M))
    exponent = e_field - fmt.bias
    return Decoded(sign, e_field, m_field, "normal", exponent, s * math.ldexp(2**M + m_field, exponent - M))


def encode(value: float, fmt: str | FloatFormat) -> int:
    """The bit pattern of ``value``, which must be exactly representable in ``fmt`` (round first)."""
    fmt = get_format(fmt)
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    sign = 1 if math.copysign(1.0, value) < 0 else 0
    if math.isnan(value):  # the canonical NaN: all exponent and mantissa bits set
        if not fmt.has_nan:
            raise ValueError(f"{fmt.name} has no NaN")
        return (2 ** (E + M) - 1) if fmt.special == "fn" else (2**E - 1) << M | 1 << max(M - 1, 0)
    if sign and not fmt.signed and value != 0:
        raise ValueError(f"{fmt.name} is unsigned: {value!r} has no code")
    sign = sign if fmt.signed else 0
    a = abs(value)
    if math.isinf(a):
        if not fmt.has_inf:
            raise ValueError(f"{fmt.name} has no infinity")
        return sign << (E + M) | (2**E - 1) << M
    if a == 0:
        if not fmt.has_zero:
            raise ValueError(f"{fmt.name} has no zero")
        return sign << (E + M)
    if a < fmt.min_normal:
        e_field, scaled = 0, math.ldexp(a, M - fmt.emin)
    else:
        exponent = math.frexp(a)[1] - 1
        e_field, scaled = exponent + fmt.bias, math.ldexp(a, M - exponent) - 2**M
    if scaled != int(scaled) or a > fmt.max or a < fmt.min_subnormal:
        raise ValueError(f"{value!r} is not exactly representable in {fmt.name}; round it first")
    return sign << (E + M) | e_field << M | int(scaled)


def decode_all(fmt: str | FloatFormat) -> torch.Tensor:
    """Values of all 2**bits codes of a format of at most 16 bits, as float64, by code (vectorised)."""
    fmt = get_format(fmt)
    if fmt.bits > 16:
        raise ValueError(f"decode_all enumerates formats of at most 16 bits; {fmt.name} has {fmt.bits}")
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    code = torch.arange(2**fmt.bits, dtype=torch.int64)
    sign = torch.where((code >> (E + M)) == 1, -1.0, 1.0).double()
    e_field = (code >> M) & (2**E - 1)
    m_field = (code & (2**M - 1)).double()
    exponent = (torch.clamp(e_field, min=1) if fmt.subnormals else e_field) - fmt.bias
    subnormal = (e_field == 0) & fmt.subnormals
    significand = torch.where(subnormal, m_field, m_field + 2**M)
    value = sign * torch.ldexp(significand, (exponent - M).double())
    top = e_field == 2**E - 1
    if fmt.special == "ieee":
        value = torch.where(top & (m_field == 0), sign * math.inf, value)
        value = torch.where(top & (m_field != 0), math.nan, value)
    elif fmt.special == "fn":
        value = torch.where(top & (m_field == 2**M - 1), math.nan, value)
    return value


# --- rounding ---------------------------------------------------------------------------------

@cache
def torch_overflow_convention(fmt: FloatFormat, device_type: str = "cpu") -> Literal["saturate", "nonfinite"]:
    """What the installed torch's own cast to ``fmt`` does with a too-large finite value, found by trying it."""
    if fmt.torch_dtype is None:
        return "nonfinite"
    probe = torch.tensor([2 * fmt.max], dtype=torch.float32, device=device_type)
    return "saturate" if torch.isfinite(probe.to(fmt.torch_dtype).float()).item() else "nonfinite"


_ABS_MASK = 0x7FFFFFFF
_EXP_MASK = 0x7F800000
_CHUNK = 2**17


def round_to_format(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
    overflow: Overflow = "auto",
    impl: Impl = "auto",
) -> torch.Tensor:
    """Round ``x`` to the nearest values of ``fmt``; returns float32 values exactly representable in ``fmt``.

    rounding: ``"nearest"`` is IEEE round-to-nearest, ties to even. ``"stochastic"`` rounds up with
        probability equal to the distance from the lower neighbour (in ULPs), so it is unbiased.
    overflow: what happens to finite values beyond ``fmt.max`` and to infinities.
        ``"saturate"`` clamps to ±max. ``"nonfinite"`` gives ±inf, or NaN in a format without inf.
        ``"auto"`` (default) does what the installed torch's cast ``x.to(fmt.torch_dtype)`` does on
        x's device (checked once by trying it; torch 2.13 saturates E4M3FN, even from inf);
        for formats without a torch dtype it means ``"nonfinite"``, except in formats without NaN
        (E2M1) and unsigned ones (UE4M3), where it means ``"saturate"``: E2M1 has no code to
        overflow to, and NVFP4 clamps its UE4M3 scales. ``"nonfinite"`` is refused for E2M1.
    NaN stays NaN, the sign of zero is kept, and subnormals are produced, not flushed.
    Formats without NaN or sign (the FP4 family), as ml_dtypes casts to them, except for NaN:
    * E2M1: NaN comes back as a float32 NaN, which no E2M1 code holds (ml_dtypes makes it -0;
      ``pack_e2m1`` refuses it); ±inf saturate to ±6.
    * unsigned formats (UE4M3, E8M0): negative numbers and -inf become NaN; -0 becomes +0 (UE4M3).
    * E8M0 (powers of two, no zero): a tie 1.5·2**k goes up, as ml_dtypes and torch round it (no
      mantissa bit to be even); positive values below 2**-127 become 2**-127; zero becomes NaN,
      as in ml_dtypes (torch's cast gives 2**-127, and drops the sign of negative numbers).
    impl: ``"eager"`` is the reference code below. ``"compiled"`` is one fused ``torch.compile`` kernel
        (bit-exact with eager for ``"nearest"``; ``"stochastic"`` draws its random bits from a
        counter-based hash seeded by ``generator``, so its stream differs from eager's). ``"auto"``
        (default) takes the compiled kernel only when ``MIXPREC_COMPILE_ROUNDING=1`` and ``x`` has at
        least ``COMPILE_MIN_NUMEL`` elements (compiling costs seconds). Where compiling fails the
        eager code runs, with one warning.
    """
    fmt = get_format(fmt)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"round_to_format works on float32 (float16/bfloat16 are widened exactly); got {x.dtype}. "
            "Convert with x.float() first, knowing that this rounds once to float32."
        )
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if impl not in ("auto", "eager", "compiled"):
        raise ValueError(f"impl must be 'auto', 'eager' or 'compiled', got {impl!r}")
    if overflow not in ("auto", "saturate", "nonfinite"):
        raise ValueError(f"overflow must be 'auto', 'saturate' or 'nonfinite', got {overflow!r}")
    x = x.detach().float().contiguous()  # values only: rounding has no useful gradient
    if overflow == "auto":
        overflow = "saturate" if not fmt.has_nan or (not fmt.signed and fmt.torch_dtype is None) else \
            torch_overflow_convention(fmt, x.device.type)
    if overflow == "nonfinite" and not fmt.has_nan:
        raise ValueError(f"{fmt.name} has neither inf nor NaN: overflow must be 'saturate' (or 'auto')")
    if not fmt.subnormals:
        return _round_power_of_two(x, fmt, rounding, generator, overflow)
    if fmt.mantissa_bits >= 23 and fmt.emin <= FP32.emin and fmt.emax >= FP32.emax:
        return x.clone()  # every float32 is already representable (fp32, fp64)
    if fmt.emin < FP32.emin or fmt.emax > FP32.emax:
        raise ValueError(f"{fmt.name}: round_to_format emulates formats whose exponent range fits in float32 (E <= 8)")
    if not fmt.signed:  # round the magnitude, then give negative numbers the NaN they become
        out = round_to_format(x.abs(), dataclasses.replace(fmt, signed=True), rounding, generator, overflow, "eager")
        return torch.where(x < 0, math.nan, out)
    if impl == "compiled" or (impl == "auto" and x.numel() >= COMPILE_MIN_NUMEL and compiled_rounding_enabled()):
        out = _round_compiled(x, fmt, rounding, generator, overflow)
        if out is not None:
            return out

    flat, out = x.view(-1), torch.empty_like(x).view(-1)
    # On CPU, work through cache-sized pieces and reuse two scratch buffers: several times faster
    # than whole-tensor passes, which allocate (and page-fault) a fresh buffer for every step.
    chunk = min(_CHUNK if x.device.type == "cpu" else flat.numel(), max(flat.numel(), 1))
    scratch_float = torch.empty(chunk, device=x.device)
    scratch_int = torch.empty(chunk, dtype=torch.int32, device=x.device)
    round_magnitude = _round_magnitude_same_exponent if fmt.exponent_bits == 8 else _round_magnitude_narrow_exponent
    for start in range(0, flat.numel(), chunk):
        xs, o = flat[start : start + chunk], out[start : start + chunk]
        n = xs.numel()
        round_magnitude(xs, o, fmt, rounding, generator, scratch_float[:n], scratch_int[:n])
        if overflow == "saturate":
            o.clamp_(max=fmt.max)  # NaN stays NaN
        else:
            o.masked_fill_(o > fmt.max, math.inf if fmt.has_inf else math.nan)
        torch.copysign(o, xs, out=o)
    return out.view(x.shape)


def _round_power_of_two(x: torch.Tensor, fmt: FloatFormat, rounding: Rounding, generator, overflow: str) -> torch.Tensor:
    """``x`` rounded to a format of powers of two without zero or sign (E8M0): 2**emin .. 2**emax.

    Between 2**k and 2**(k+1) the midpoint is 1.5·2**k; it rounds up. Stochastic rounding goes up
    with probability (|x| - 2**k) / 2**k, so it is unbiased. Zero and negative numbers have no code: NaN.
    """
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    low = torch.ldexp(torch.ones_like(x), exponent - 1)  # 2**floor(log2 x), float32 subnormals included
    if rounding == "nearest":
        # Between 2**-127 and 2**-126 (float32 subnormals) ml_dtypes and torch both round everything
        # above 2**-127 up: a quirk of rounding the bit pattern, which we copy to stay equal to them.
        up = (mantissa >= 0.75) | ((x > 2.0**-127) & (x < 2.0**-126))
    else:
        up = torch.rand(x.shape, generator=generator, device=x.device) < (x - low) / low
    out = torch.where(up, low * 2, low).clamp(min=fmt.min_normal)
    too_big = (out > fmt.max) | (x == math.inf)
    out = torch.where(too_big, fmt.max if overflow == "saturate" else math.nan, out)
    return torch.where(x > 0, out, math.nan)  # zero, negative numbers and NaN: NaN


def _round_magnitude_same_exponent(x, out, fmt: FloatFormat, rounding: Rounding, generator, scratch_float, scratch_int) -> None:
    """out = |x| rounded to M mantissa bits, for formats with float32's exponent (bf16, tf32).

    Their grid is float32's grid with the low 23 - M mantissa bits cleared, subnormals included,
    so we round the bit pattern: add half an ULP (or random bits) and truncate. A carry out of the
    mantissa moves into the exponent, which is exactly what rounding up across a binade means.
    """
    shift = 23 - fmt.mantissa_bits
    low = (1 << shift) - 1
    a = torch.bitwise_and(x.view(torch.int32), _ABS_MASK, out=scratch_int)  # bits of |x|
    r = out.view(torch.int32)
    if rounding == "nearest":
        torch.bitwise_right_shift(a, shift, out=r)
        r &= 1  # the last kept bit: a tie goes to the even neighbour
        r += low >> 1
    else:
        torch.randint(0, low + 1, r.shape, generator=generator, out=r)
    r += a
    r &= ~low
    torch.where(a > _EXP_MASK, a, r, out=r)  # NaN in, NaN out (its payload could round to inf)


def _round_magnitude_narrow_exponent(x, out, fmt: FloatFormat, rounding: Rounding, generator, scratch_float, scratch_int) -> None:
    """out = |x| rounded to the grid of a format with fewer exponent bits than float32 (fp16, fp8).

    At |x| in [2**e, 2**(e+1)) the grid step is q = 2**(e - M); below the smallest normal
    2**emin it stays 2**(emin - M), which is what makes subnormals evenly spaced.
    """
    a = torch.abs(x, out=scratch_float)
    # exponent field of |x|, clamped to the format's normal range, as float32 bits
    e_bits = torch.bitwise_and(a.view(torch.int32), _EXP_MASK, out=scratch_int)
    e_bits.clamp_(min=(fmt.emin + 127) << 23, max=(max(fmt.emax, fmt.emin) + 127) << 23)  # E1 IEEE: subnormals only
    if rounding == "nearest":
        # c = 2**(e + 23 - M) has a float32 ULP of exactly q, so a + c is rounded to the grid by the
        # FPU itself, ties to even; subtracting c again is exact. NaN and inf pass through.
        e_bits += (23 - fmt.mantissa_bits) << 23
        c = e_bits.view(torch.float32)
        torch.add(a, c, out=out).sub_(c)
        return
    e_bits -= fmt.mantissa_bits << 23
    q = e_bits.view(torch.float32)
    scaled = a / q  # exact: q is a power of two
    floor = torch.floor(scaled)
    u = torch.rand(a.shape, generator=generator, device=a.device)
    torch.mul(floor.add_((u < scaled - floor).float()), q, out=out)


# --- the fused path: the same rounding as integer arithmetic on the bit patterns, compiled ----------

COMPILE_MIN_NUMEL = 2**20  # below this the eager path is fast enough and a compile never pays back
_M32 = 0xFFFFFFFF
_compiled: dict[str, object] = {}  # "fn": the compiled kernel, or "failed": why it could not be used


def compiled_rounding_enabled() -> bool:
    """Whether ``round_to_format(impl="auto")`` uses the compiled kernel for large tensors (opt-in)."""
    return os.environ.get("MIXPREC_COMPILE_ROUNDING", "0").strip().lower() in ("1", "true", "yes", "on")  # off, 0, False...: off


def _round_bits_fused(bits, seed, *, mantissa_bits: int, emin: int, max_bits: int, overflow_bits: int,
                      saturate: bool, stochastic: bool):
    """float32 bit patterns (int32) -> bit patterns of the values rounded to the format (int32).

    Integers only, so no compiler flag (fast-math) can change a result. With a = the bits of |x|,
    its float32 exponent field ex and significand sig (the implicit 1 included), the format's grid
    step at |x| is 2**s units of sig, s = (23 - M) + max(0, emin_field - ex): rounding is rounding
    sig to a multiple of 2**s, ties to even (or up with probability (sig mod 2**s) / 2**s). A carry
    into 2**24 moves the exponent up, which is rounding up across a binade; s is capped at 25,
    where every value rounds to 0. Then overflow (saturate, or inf / NaN), NaN in NaN out, sign.
    """
    a = bits & 0x7FFFFFFF
    ex = torch.clamp(a >> 23, min=1)  # float32 subnormals share the exponent of the smallest normal
    sig = a - ((ex - 1) << 23)  # mantissa with the implicit bit for normals, without for subnormals
    s = torch.clamp((emin + 127) - ex, min=0) + (23 - mantissa_bits)
    if stochastic:
        # round up with probability (sig mod 2**s) / 2**s, from 32 random bits h: up iff h < frac * 2**(32 - s)
        # (for s > 32, ceil(frac / 2**(s - 32)): the probability is exact to 2**-32; s is capped at 56,
        # where it is below 2**-32 anyway)
        s = torch.clamp(s, max=56).to(torch.int64)
        i = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64)
        h = (i * 0x9E3779B1 + seed * 0x632BE5AB) & _M32  # a counter-based hash (lowbias32-like) of the index
        h = ((h ^ (h >> 16)) * 0x7FEB352D) & _M32
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _M32
        h = h ^ (h >> 16)
        sig64 = sig.to(torch.int64)
        frac = sig64 & ((1 << s) - 1)
        wide = torch.clamp(s - 32, min=0)
        threshold = torch.where(s <= 32, frac << torch.clamp(32 - s, min=0), (frac + (1 << wide) - 1) >> wide)
        rounded = ((sig64 >> s) << s) + ((h < threshold).to(torch.int64) << s)
    else:
        s = torch.clamp(s, max=25)  # from s = 25 on, |x| is under half the smallest subnormal: 0
        rounded = ((sig + ((1 << s) >> 1) - 1 + ((sig >> s) & 1)) >> s) << s  # ties to the even neighbour
    # a result of 2**s with s > 24 is the format's smallest subnormal, whose exponent sig cannot carry
    r = torch.where(s > 24, ((emin - mantissa_bits) + 127) << 23, ((ex - 1) << 23) + rounded)
    r = torch.where(rounded == 0, 0, r).to(torch.int32)
    r = torch.where(r > max_bits, max_bits if saturate else overflow_bits, r)
    r = torch.where(a > 0x7F800000, a, r)  # NaN in, NaN out
    return r | (bits ^ a)  # the sign of x, zeros and NaN included


def _compiled_kernel():
    if "fn" not in _compiled and "failed" not in _compiled:
        _compiled["fn"] = torch.compile(_round_bits_fused, dynamic=True, fullgraph=True)
    return _compiled.get("fn")


def _fused_args(fmt: FloatFormat, rounding: Rounding, overflow: str) -> dict:
    max_bits = int(torch.tensor(fmt.max, dtype=torch.float32).view(torch.int32))
    return dict(mantissa_bits=fmt.mantissa_bits, emin=fmt.emin, max_bits=max_bits,
                overflow_bits=0x7F800000 if fmt.has_inf else 0x7FC00000,
                saturate=overflow == "saturate", stochastic=rounding == "stochastic")


def _round_compiled(x: torch.Tensor, fmt: FloatFormat, rounding: Rounding, generator, overflow: str) -> torch.Tensor | None:
    """The fused kernel's result as float32, or None where no compiler works (warned about once)."""
    kernel = _compiled_kernel()
    if kernel is None:
        return None
    if rounding == "stochastic":
        device = generator.device if generator is not None else x.device  # a generator draws on its own device
        seed = torch.randint(0, 2**31 - 1, (), generator=generator, dtype=torch.int64, device=device)
    else:
        seed = torch.zeros((), dtype=torch.int64)
    try:
        bits = kernel(x.reshape(-1).view(torch.int32), seed.to(x.device), **_fused_args(fmt, rounding, overflow))
    except Exception as exc:  # no C++ compiler, an unsupported backend, ...: the eager path is always there
        _compiled.pop("fn", None)
        _compiled["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"mixprec.formats: torch.compile of round_to_format failed ({_compiled['failed']}); "
                      "using the eager path from now on", RuntimeWarning, stacklevel=3)
        return None
    _compiled["used"] = True
    return bits.view(torch.float32).view(x.shape)


def compiled_rounding_status() -> str:
    """'ready' (compiled and used), 'not compiled yet', or why the compiled path is unavailable."""
    if "failed" in _compiled:
        return "unavailable: " + str(_compiled["failed"])
    return "ready" if "used" in _compiled else "not compiled yet"


# --- where values land in a format: its zones ------------------------------------------------------

ZONES = ("zero", "flushed", "subnormal", "normal", "overflow")


def zone_edges(fmt: str | FloatFormat) -> dict[str, float]:
    """log2 of the magnitudes where the format's zones begin, as round-to-nearest-even draws them.

    ``flushed_below``: |x| at or below 2**this rounds to 0 (half the smallest subnormal; the tie goes
    to 0). ``normal_from``: the smallest normal number. ``overflow_from``: |x| above 2**this rounds
    beyond the largest finite value (the largest value plus half its ULP; the tie itself goes to the
    even neighbour: inf for IEEE-like formats, the largest value for E4M3FN). The loss-scale
    explorer, the chapters' zone plots and ``mixprec.debug`` all draw the zones from here.
    """
    fmt = get_format(fmt)
    return {"flushed_below": math.log2(fmt.min_subnormal) - 1, "normal_from": math.log2(fmt.min_normal),
            "overflow_from": math.log2(fmt.max + fmt.ulp(fmt.max) / 2)}


ZONES = ("zero", "flushed", "subnormal", "normal", "overflow")  # in order of magnitude


def zone_index(values: torch.Tensor, scale: float | torch.Tensor = 1.0, fmt: str | FloatFormat = "fp16") -> torch.Tensor:
    """For each of ``values * scale``, the index in ``ZONES`` of what the format stores it as.

    Computed by rounding every value, so the boundaries are exact. The index never decreases as
    ``|value|`` grows (NaN counts as overflow). ``scale`` may be a tensor that broadcasts.
    """
    fmt = get_format(fmt)
    values = torch.as_tensor(values).detach()
    if values.is_complex():
        raise TypeError(f"zone_fractions takes real values, got a {values.dtype} tensor (pass .real, .imag or .abs())")
    if values.dtype == torch.float64:  # float64 keeps magnitudes float32 cannot (1e-300, 1e300): classify them exactly
        x64 = values * scale
        zero = x64 == 0
        rounded = x64.abs() if fmt.emax > FP32.emax else round_to_format(float32_for_rounding(x64, fmt), fmt, overflow="nonfinite").abs()
    else:
        x = values.float() * scale
        zero = x == 0
        rounded = round_to_format(x, fmt, overflow="nonfinite").abs()
    index = torch.full(rounded.shape, 4, dtype=torch.long)  # overflow: inf or NaN
    index[rounded <= fmt.max] = 3
    index[rounded < fmt.min_normal] = 2
    index[rounded == 0] = 1
    index[zero] = 0
    return index


def zone_fractions(values: torch.Tensor, scale: float = 1.0, fmt: str | FloatFormat = "fp16") -> dict[str, float]:
    """Fractions of ``values * scale`` that the format stores as what.

    ``zero``: the value was exactly zero to begin with. ``flushed``: nonzero, but rounds to zero.
    ``subnormal``: stored with fewer significant bits than a normal number. ``normal``: stored with
    full precision. ``overflow``: beyond the largest finite value (inf, NaN, or clamped, depending
    on the format and the cast). Computed by rounding every value, so the boundaries are exact.
    """
    index = zone_index(torch.as_tensor(values).flatten(), scale, fmt)
    counts = torch.bincount(index, minlength=len(ZONES)).tolist()
    n = max(index.numel(), 1)
    return {name: c / n for name, c in zip(ZONES, counts)}


def float32_for_rounding(x: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """float64 ``x`` as float32 values that ``round_to_format(·, fmt)`` rounds exactly as it would round ``x`` itself.

    Rounding float64 to float32 to nearest and then to ``fmt`` can round twice the wrong way (a
    value just above a tie of ``fmt`` lands on the tie). Rounding to float32 *to odd* first
    (truncate, then set the last bit if anything was lost) cannot, as long as float32 keeps at least
    two more bits than ``fmt`` (Boldo and Melquiond, 2008). Values beyond float32's range become
    its largest value (which still overflows ``fmt``), tiny nonzero ones its smallest subnormal
    (which still flushes), with their signs. For a format as precise as float32, plain rounding is
    the answer.
    """
    fmt = get_format(fmt)
    if x.dtype != torch.float64:
        raise TypeError(f"float32_for_rounding takes float64, got {x.dtype}")
    y = x.float()
    if fmt.mantissa_bits >= 23:
        return y
    away = y.double().abs() > x.abs()  # rounded away from zero (an overflow to inf included)
    y = torch.where(away, torch.nextafter(y, torch.zeros_like(y)), y)
    inexact = (y.double() != x) & ~torch.isnan(x)
    return torch.bitwise_or(y.view(torch.int32), inexact.to(torch.int32)).view(torch.float32)


# --- FP4 storage: two E2M1 codes a byte ---------------------------------------------------------

_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; code | 8 is the negative


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """The 4-bit E2M1 codes (uint8, 0..15) of values already on the E2M1 grid (round them first)."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"e2m1_codes takes a floating-point tensor, got {type(values).__name__}")
    v = values.detach().float()
    if v.isnan().any():
        raise ValueError("E2M1 has no NaN: a NaN has no 4-bit code")
    grid = torch.tensor(_E2M1_MAGNITUDES, device=v.device)
    magnitude = torch.searchsorted(grid, v.abs())
    if (magnitude > 7).any() or (grid[magnitude.clamp(max=7)] != v.abs()).any():
        raise ValueError("values are not on the E2M1 grid (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives): round them "
                         "with round_to_format(x, 'e2m1') first")
    negative = torch.signbit(v).to(torch.uint8)  # -0 keeps its own code, 8
    return (negative << 3 | magnitude.to(torch.uint8))


def pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values as ``torch.float4_e2m1fn_x2``: two codes a byte, element 0 in the low nibble.

    The last dimension halves, as in torchao's ``pack_uint4`` and PyTorch's packed FP4 dtype
    (which stores bytes only: it has no casts and no arithmetic).
    """
    codes = e2m1_codes(values)
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"packing needs an even last dimension, got shape {tuple(codes.shape)}")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] | pairs[..., 1] << 4).view(torch.float4_e2m1fn_x2)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``pack_e2m1``'s inverse: float32 values, the last dimension doubled."""
    if not isinstance(packed, torch.Tensor) or packed.dtype not in (torch.float4_e2m1fn_x2, torch.uint8):
        raise TypeError(f"unpack_e2m1 takes a torch.float4_e2m1fn_x2 (or uint8) tensor, got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)}")
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
    magnitude = torch.tensor(_E2M1_MAGNITUDES, device=b.device)[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -magnitude, magnitude)
