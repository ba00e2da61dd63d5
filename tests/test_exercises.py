"""Each reference solution passes its checker; typical wrong answers fail with a specific message."""

import math

import torch
from mixprec import exercises as X
from mixprec.formats import round_to_format
from mixprec.summation import kahan_sum, running_sum


def test_format_limits_reference_and_wrong_answers():
    assert X.check_format_limits("e4m3fn", max=448, min_normal=2**-6, min_subnormal=2**-9, eps=0.125)
    assert X.check_format_limits("e3m4", max=15.5, min_normal=0.25, min_subnormal=2**-6, eps=2**-4)
    r = X.check_format_limits("e4m3fn", max=240, min_normal=2**-6, min_subnormal=2**-6, eps=0.125)
    assert not r
    text = str(r)
    assert "IEEE" in text and "最小正规数" in text
    r = X.check_format_limits("fp16", max=65504, min_normal=2**-15, min_subnormal=2**-24, eps=2**-11)
    assert not r and "2^(1 - bias)" in str(r) and "单位舍入" in str(r)
    assert not X.check_format_limits("fp16", max="big", min_normal=2**-14, min_subnormal=2**-24, eps=2**-10)


def test_round_to_fp16_checker():
    assert X.check_round_to_fp16(lambda x: round_to_format(x, "fp16"))
    assert X.check_round_to_fp16(lambda x: x.half().float())
    flush = X.check_round_to_fp16(lambda x: torch.where(x.abs() < 2**-14, 0 * x, x.half().float()))
    assert not flush and "次正规数" in str(flush)

    def half_away_from_zero(x):
        e = torch.floor(torch.log2(x.abs().clamp(min=2**-14)))
        q = torch.exp2(e - 10)
        r = torch.sign(x) * torch.floor(x.abs() / q + 0.5) * q
        r = torch.where(r.abs() > 65504, torch.sign(x) * math.inf, r)
        return torch.where(torch.isfinite(x), r, x)

    ties = X.check_round_to_fp16(half_away_from_zero)
    assert not ties and "平局取偶" in str(ties)
    saturating = X.check_round_to_fp16(lambda x: x.clamp(-65504, 65504).half().float())
    assert not saturating and "溢出" in str(saturating)
    crash = X.check_round_to_fp16(lambda x: x.nonexistent())
    assert not crash and "异常" in str(crash)
    assert "<div" in crash._repr_html_()


def test_kahan_checker():
    assert X.check_kahan_sum(kahan_sum)
    naive = X.check_kahan_sum(lambda v, d: float(running_sum(v, d, "naive")[-1]))
    assert not naive and "补偿项没有起作用" in str(naive)
    # a hand-written loop without any compensation: the same stall as the naive sum
    def plain_loop(v, d):
        s = torch.zeros((), dtype=d)
        for x in v.to(d):
            s = s + x
        return float(s)
    assert not X.check_kahan_sum(plain_loop)


def test_running_sum_shapes_and_errors():
    v = torch.full((100, 3), 0.01)
    out = running_sum(v, torch.float32)
    assert out.shape == (100, 3) and abs(out[-1, 0].item() - 1.0) < 1e-5
    # swamping: 1 + 1e-4, one thousand times, stays exactly 1 in fp16 and bf16
    w = torch.cat([torch.ones(1), torch.full((1000,), 1e-4)])
    for dt in (torch.float16, torch.bfloat16):
        assert running_sum(w, dt)[-1].item() == 1.0
        assert abs(running_sum(w, dt, "kahan")[-1].item() - 1.1) < 0.01
    try:
        running_sum(v, torch.float32, "pairwise")
    except ValueError as e:
        assert "naive" in str(e)
    else:
        raise AssertionError("unknown method accepted")


def test_check_loss_scaler():
    from mixprec.exercises import check_loss_scaler
    from mixprec.scaling import DynamicLossScaler, StaticLossScaler

    assert check_loss_scaler(DynamicLossScaler)
    assert check_loss_scaler(lambda **kw: torch.amp.GradScaler("cpu", **kw))
    static = check_loss_scaler(lambda init_scale, **kw: StaticLossScaler(init_scale))
    assert not static and "第 8 步" in str(static)
    slow = check_loss_scaler(lambda **kw: DynamicLossScaler(**{**kw, "growth_interval": 21}))
    assert not slow and "没有溢出" in str(slow)
    assert "运行出错" in str(check_loss_scaler(lambda **kw: object()))


def test_check_memory():
    from mixprec.exercises import check_memory

    n = 1000
    assert check_memory("bf16-amp", n, weights=4 * n, grads=4 * n, optimizer=8 * n)
    wrong = check_memory("bf16-amp", n, weights=2 * n, grads=4 * n, optimizer=8 * n)
    assert not wrong and "每个参数 4 字节" in str(wrong)
    assert not check_memory("int4", n, weights=0, grads=0, optimizer=0)


def test_check_smallest_update():
    from mixprec.exercises import check_smallest_update, smallest_visible_update

    assert smallest_visible_update("bf16", 1.0) == 2**-7  # 2**-8 is a tie and rounds back to the even 1.0
    assert smallest_visible_update("bf16", 1 + 2**-7) == 2**-8  # odd mantissa: the tie rounds up
    assert smallest_visible_update("fp16", 1.0) == 2**-10
    assert check_smallest_update("bf16", 1.0, 2**-7)
    assert "平局" in str(check_smallest_update("bf16", 1.0, 2**-8))


def test_check_mystery_fix():
    from mixprec import clinic

    def two_pass_fp32(x, weight, bias, eps):
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        return ((h - mean) / torch.sqrt(var + eps)).to(x.dtype) * weight + bias

    assert X.check_mystery_fix(two_pass_fp32)
    assert not X.check_mystery_fix(clinic.layer_norm_one_pass)  # the model's own: fails in FP16
    assert not X.check_mystery_fix(lambda x, w, b, eps: x)  # finite, but not a LayerNorm


def test_check_tokens_per_second():
    def right(block, eos, seconds):
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in block.tolist()) / seconds

    assert X.check_tokens_per_second(right)
    assert not X.check_tokens_per_second(lambda block, eos, seconds: block.numel() / seconds)  # counts the padding
    assert not X.check_tokens_per_second(lambda block, eos, seconds: int((block != eos).sum()) / seconds)  # drops EOS


def test_check_e2m1_values():
    assert X.check_e2m1_values([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert X.check_e2m1_values(torch.tensor([6.0, 4, 3, 2, 1.5, 1, 0.5, 0]))  # any order, a tensor too
    assert "inf 和 NaN" in str(X.check_e2m1_values([0, 0.5, 1, 1.5, 2, 3, 4]))  # the all-ones code taken for NaN
    assert "次正规数" in str(X.check_e2m1_values([0, 1, 1.5, 2, 3, 4, 6]))
    for junk in (None, "0, 0.5", 5, [None], [float("nan")], [-1, 0], range(100), [[0]], object()):
        assert not X.check_e2m1_values(junk)  # never raises, never passes


def test_check_outlier_recipe_channel():
    assert X.check_outlier_recipe("mxfp8", where="channel")
    assert not X.check_outlier_recipe("rowwise", where="channel")
    assert not X.check_outlier_recipe("tensorwise", where="channel")
    assert not X.check_outlier_recipe("mxfp8", where="column")
    assert X.check_outlier_recipe("rowwise")  # the token case is unchanged
