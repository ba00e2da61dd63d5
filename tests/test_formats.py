"""round_to_format, decode and encode against torch's own dtypes, bit for bit."""

import math

import pytest
import torch
from mixprec import formats as F

NATIVE = [F.FP16, F.BF16, F.E4M3, F.E5M2]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns, with every NaN made canonical so NaN == NaN."""
    b = t.float().view(torch.int32).clone()
    b[torch.isnan(t.float())] = 0x7FC00000
    return b


def native_round(x: torch.Tensor, fmt: F.FloatFormat) -> torch.Tensor:
    return x.to(fmt.torch_dtype).float()


@pytest.mark.parametrize("fmt", NATIVE, ids=lambda f: f.name)
def test_decode_all_codes_match_torch(fmt):
    codes = torch.arange(2**fmt.bits, dtype=torch.int64)
    if fmt.bits == 16:
        native = (codes - (codes >= 2**15) * 2**16).to(torch.int16).view(fmt.torch_dtype)
    else:
        native = codes.to(torch.uint8).view(fmt.torch_dtype)
    native = native.double()
    ours = F.decode_all(fmt)
    same = (ours == native) | (torch.isnan(ours) & torch.isnan(native))
    assert bool(same.all()), f"first mismatch at code {int((~same).nonzero()[0])}"
    # the sign of zero too
    assert torch.equal(torch.signbit(ours[~torch.isnan(ours)]), torch.signbit(native[~torch.isnan(native)]))
    # the scalar decoder agrees with the vectorised one, and encode inverts it
    for code in range(0, 2**fmt.bits, 1 if fmt.bits == 8 else 37):
        d = F.decode(code, fmt)
        v = float(ours[code])
        assert (math.isnan(d.value) and math.isnan(v)) or (d.value == v and math.copysign(1, d.value) == math.copysign(1, v))
        if d.kind != "nan":
            assert F.encode(d.value, fmt) == code


@pytest.mark.parametrize("fmt", NATIVE, ids=lambda f: f.name)
def test_finfo_matches_torch(fmt):
    fi = torch.finfo(fmt.torch_dtype)
    assert fmt.max == fi.max
    assert fmt.min_normal == fi.smallest_normal
    assert fmt.eps == fi.eps
    assert fmt.min_subnormal == float(F.decode_all(fmt)[1])  # code 1 is the smallest subnormal


def test_fp32_fp64_limits():
    for fmt, dt in [(F.FP32, torch.float32), (F.FP64, torch.float64)]:
        fi = torch.finfo(dt)
        assert (fmt.max, fmt.min_normal, fmt.eps) == (fi.max, fi.smallest_normal, fi.eps)
    assert F.FP32.min_subnormal == 2.0**-149
    assert F.FP64.min_subnormal == 5e-324
    assert F.decode(0x3C00, "fp16").value == 1.0
    assert F.decode(0x7BFF, "fp16").value == 65504.0
    assert F.decode(0x0001, "fp16").kind == "subnormal"
    assert F.decode(0x3F800000, "fp32").value == 1.0
    assert F.encode(-2.0, "fp64") == 0xC000000000000000


def edge_cases(fmt: F.FloatFormat) -> torch.Tensor:
    """Ties, subnormal boundaries, overflow thresholds and specials for one format."""
    vals = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 3.0e38, 1e-45, -1e-45]
    codes = F.decode_all(fmt)
    finite = codes[torch.isfinite(codes)].unique()
    pos = finite[finite > 0]
    mids = (pos[:-1] + pos[1:]) / 2  # exact ties between neighbours
    vals += pos.tolist() + mids.tolist()
    top = fmt.max + fmt.ulp(fmt.max) / 2  # the tie just above max
    vals += [top, fmt.max + fmt.ulp(fmt.max), 2 * fmt.max, fmt.min_subnormal / 2, fmt.min_subnormal / 2 * 1.0001,
             fmt.min_subnormal / 4, fmt.min_normal * (1 - 2**-12), fmt.min_normal]
    t = torch.tensor(vals, dtype=torch.float64).float()  # float32 versions of the edge values
    # and float32's own neighbours of each, which probe both sides of every threshold
    up = torch.nextafter(t, torch.tensor(math.inf))
    down = torch.nextafter(t, torch.tensor(-math.inf))
    t = torch.cat([t, up, down])
    return torch.cat([t, -t])


IMPLS = ["eager", "compiled"]  # the readable reference and the fused torch.compile kernel


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", NATIVE, ids=lambda f: f.name)
def test_round_to_format_edge_cases_bit_exact(fmt, impl):
    x = edge_cases(fmt)
    ours, native = F.round_to_format(x, fmt, impl=impl), native_round(x, fmt)
    bad = bits_of(ours) != bits_of(native)
    assert not bad.any(), f"{fmt.name}: x={x[bad][:5].tolist()} ours={ours[bad][:5].tolist()} torch={native[bad][:5].tolist()}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", NATIVE, ids=lambda f: f.name)
def test_round_to_format_random_bit_exact(fmt, impl):
    g = torch.Generator().manual_seed(0)
    # random bit patterns cover every exponent; scaled normals cover the format's own range densely
    raw = torch.randint(-(2**31), 2**31 - 1, (1_000_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    scale = fmt.max if fmt.max < 1e30 else 1e4
    dense = torch.randn(1_000_000, generator=g) * torch.exp2(torch.randint(-30, 2, (1_000_000,), generator=g).float()) * scale
    for x in (raw, dense):
        ours, native = F.round_to_format(x, fmt, impl=impl), native_round(x, fmt)
        bad = bits_of(ours) != bits_of(native)
        assert not bad.any(), f"{fmt.name}: x={x[bad][:5].tolist()} ours={ours[bad][:5].tolist()} torch={native[bad][:5].tolist()}"


def test_overflow_conventions():
    x = torch.tensor([1e6, math.inf, -math.inf, -1e6])
    # torch 2.13 on CPU: E4M3FN saturates (even from inf); fp16 and e5m2 overflow to inf
    assert F.round_to_format(x, "e4m3fn").tolist() == [448.0, 448.0, -448.0, -448.0]
    assert F.round_to_format(x, "fp16").tolist() == [math.inf, math.inf, -math.inf, -math.inf]
    assert F.round_to_format(x, "fp16", overflow="saturate").tolist() == [65504.0, 65504.0, -65504.0, -65504.0]
    assert torch.isnan(F.round_to_format(x, "e4m3fn", overflow="nonfinite")).all()
    assert F.round_to_format(torch.tensor([464.0, 465.0]), "e4m3fn", overflow="nonfinite")[0] == 448.0  # tie to even
    assert torch.isnan(F.round_to_format(torch.tensor([465.0]), "e4m3fn", overflow="nonfinite")).all()


def test_tf32_and_custom_formats():
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-10])
    assert F.round_to_format(x, "tf32").tolist() == [1.0, 1 + 2**-9, 1 + 2**-10]
    e3m2 = F.get_format("e3m2")
    values = F.decode_all(e3m2)
    assert e3m2.max == 14.0 and e3m2.min_subnormal == 0.0625
    # every representable value maps to itself, and nothing else is produced
    fin = values[torch.isfinite(values)].float()
    assert torch.equal(F.round_to_format(fin, e3m2), fin)
    out = F.round_to_format(torch.linspace(-20, 20, 10001), e3m2, overflow="saturate")
    assert set(out.unique().tolist()) <= set(fin.tolist())
    assert F.round_to_format(torch.tensor([1.0 + 2**-20]), "fp32").item() == 1.0 + 2**-20  # identity


@pytest.mark.parametrize("impl", IMPLS)
def test_stochastic_rounding_is_unbiased(impl):
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for fmt, x0 in [(F.BF16, 1.0 + 2**-9), (F.FP16, 1e-7), (F.E4M3, 0.3), (F.FP16, -5.1), (F.TF32, 1 / 3), (F.E5M2, 1e-6), (F.FP16, 2**-30)]:
        x = torch.full((n,), x0)
        r = F.round_to_format(x, fmt, rounding="stochastic", generator=g, impl=impl).double()
        lo = F.round_to_format(x[:1], fmt, overflow="saturate").item()
        neighbours = set(r.unique().tolist())
        assert len(neighbours) <= 2, neighbours  # only the two values that bracket x
        # standard error of the mean for a two-point distribution of gap h is at most h/2/sqrt(n)
        h = max(neighbours) - min(neighbours) if len(neighbours) == 2 else fmt.ulp(lo)
        se = h / 2 / math.sqrt(n)
        assert abs(r.mean().item() - float(torch.tensor(x0).float())) < 5 * se
    # nearest rounding of the same value is biased: always the same neighbour
    assert len(F.round_to_format(torch.full((10,), 1.0 + 2**-9), "bf16").unique()) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_stochastic_rounding_reproducible_with_generator(impl):
    x = torch.randn(1000)
    a = F.round_to_format(x, "e5m2", "stochastic", torch.Generator().manual_seed(3), impl=impl)
    b = F.round_to_format(x, "e5m2", "stochastic", torch.Generator().manual_seed(3), impl=impl)
    assert torch.equal(a, b)
    c = F.round_to_format(x, "e5m2", "stochastic", torch.Generator().manual_seed(4), impl=impl)
    assert not torch.equal(a, c)  # another seed, other random bits


def test_compiled_stochastic_rounding_lands_on_a_neighbour():
    """Compiled stochastic rounding gives a value of the format less than one grid step from x: one of
    its two neighbours (the frequencies are the unbiasedness test's; the random stream is not eager's)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-20, 8, (4096,), generator=g).float())
    for fmt in (F.FP16, F.BF16, F.E4M3, F.E5M2, F.TF32):
        xs = x.clamp(-fmt.max, fmt.max)
        r = F.round_to_format(xs.repeat(32), fmt, "stochastic", generator=g, impl="compiled").view(32, -1)
        assert torch.equal(F.round_to_format(r, fmt, overflow="saturate", impl="eager"), r)  # values of the format
        step = torch.tensor([fmt.ulp(v) for v in xs.tolist()])
        assert ((r - xs).abs() < step).all()  # within one grid step: one of the two neighbours
        assert ((r.max(0).values - r.min(0).values) <= step).all()
        assert (r.max(0).values > r.min(0).values).float().mean() > 0.5  # and both neighbours do occur


def _all_pattern_sample() -> torch.Tensor:
    """Every 4099th float32 bit pattern (about a million, all exponents and signs) and the special values."""
    sample = torch.arange(-(2**31), 2**31, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)
    tiny = torch.tensor([2**-149, 2**-126, 2**-126 - 2**-149, 2**-24, 2**-25, 2**-25 + 2**-40, 3 * 2**-26, 2**-133])
    special = torch.tensor([0.0, math.inf, math.nan, 1.0, 65504.0, 65520.0, 65519.99, 448.0, 464.0, 480.0, 57344.0,
                            61440.0, 3.4028234663852886e38, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 2**-24])
    special = torch.cat([special, tiny, torch.nextafter(special, torch.tensor(0.0)), torch.nextafter(tiny, torch.tensor(1.0))])
    return torch.cat([sample, special, -special])


@pytest.mark.parametrize("overflow", ["saturate", "nonfinite"])
@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e4m3fn", "e5m2", "tf32", "e3m2", "e2m3fn", "e6m1"])
def test_compiled_path_equals_eager_on_all_bit_patterns_sampled(fmt, overflow):
    x = _all_pattern_sample()
    eager = F.round_to_format(x, fmt, overflow=overflow, impl="eager")
    compiled = F.round_to_format(x, fmt, overflow=overflow, impl="compiled")
    assert F.compiled_rounding_status() == "ready"  # the compiler worked here: no silent fallback to eager
    bad = bits_of(eager) != bits_of(compiled)
    assert not bad.any(), f"{fmt}/{overflow}: x={x[bad][:5].tolist()} eager={eager[bad][:5].tolist()} compiled={compiled[bad][:5].tolist()}"
    assert torch.equal(torch.signbit(eager), torch.signbit(compiled))  # -0.0 stays -0.0


def test_auto_uses_the_compiled_path_only_when_asked_and_large(monkeypatch):
    calls = []
    real = F._round_compiled
    monkeypatch.setattr(F, "_round_compiled", lambda *a: calls.append(a[0].numel()) or real(*a))
    big, small = torch.randn(F.COMPILE_MIN_NUMEL), torch.randn(100)
    monkeypatch.delenv("MIXPREC_COMPILE_ROUNDING", raising=False)
    F.round_to_format(big, "bf16")
    assert calls == []  # opt-in
    monkeypatch.setenv("MIXPREC_COMPILE_ROUNDING", "1")
    F.round_to_format(small, "bf16")
    assert calls == []  # too small to pay for a compile
    F.round_to_format(big, "bf16")
    assert calls == [big.numel()]


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(F, "_compiled", {})
    monkeypatch.setattr(F.torch, "compile", lambda fn, **kw: broken)
    x = torch.randn(1000)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        y = F.round_to_format(x, "fp16", impl="compiled")
    assert torch.equal(y, x.half().float())
    assert F.compiled_rounding_status().startswith("unavailable: RuntimeError")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every call
        assert torch.equal(F.round_to_format(x, "fp16", impl="compiled"), x.half().float())


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown format 'fp12'"):
        F.get_format("fp12")
    with pytest.raises(TypeError, match="float64"):
        F.round_to_format(torch.zeros(3, dtype=torch.float64), "fp16")
    with pytest.raises(ValueError, match="rounding must be"):
        F.round_to_format(torch.zeros(3), "fp16", rounding="up")
    with pytest.raises(ValueError, match="impl must be"):
        F.round_to_format(torch.zeros(3), "fp16", impl="fast")
    with pytest.raises(ValueError, match="not exactly representable"):
        F.encode(0.1, "fp16")
    with pytest.raises(ValueError, match="codes are integers"):
        F.decode(70000, "fp16")


def test_zone_edges_are_where_rounding_changes_zone():
    from mixprec.formats import zone_edges, zone_fractions

    for name in ("fp16", "bf16", "e4m3fn", "e5m2"):
        edges = {k: 2.0**v for k, v in zone_edges(name).items()}
        probe = torch.tensor([edges["flushed_below"], edges["flushed_below"] * 1.01, edges["normal_from"], edges["overflow_from"] * 0.999,
                              edges["overflow_from"] * 1.001], dtype=torch.float64).float()
        zones = [max(zone_fractions(v.view(1), 1.0, name).items(), key=lambda kv: kv[1])[0] for v in probe]
        assert zones == ["flushed", "subnormal", "normal", "normal", "overflow"], (name, zones)
