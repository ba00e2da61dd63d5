"""Checkers for the exercises: call one with your answer and read the feedback.

Each checker returns a ``CheckResult``: it is truthy when the answer is right, prints as plain text,
and shows as a coloured box in a notebook. Feedback names the first thing that is wrong and why,
not just "wrong".
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .formats import FloatFormat, get_format, round_to_format
from .summation import running_sum


@dataclass
class CheckResult:
    passed: bool
    messages: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = "✔ 正确" if self.passed else "✘ 还不对"
        return "\n".join([head] + [f"- {m}" for m in self.messages])

    def __repr__(self) -> str:
        return str(self)

    def _repr_markdown_(self) -> str:  # print editions (PDF); the HTML repr wins on the site
        from .widgets import escape_markdown

        escaped = [escape_markdown(m) for m in self.messages]
        return "**" + ("✔ 正确" if self.passed else "✘ 还不对") + "**\n\n" + "\n".join(f"- {m}" for m in escaped)

    def _repr_html_(self) -> str:
        colour = "#e8f5e9" if self.passed else "#fdecea"
        items = "".join(f"<li>{html.escape(m)}</li>" for m in self.messages)
        head = "✔ 正确" if self.passed else "✘ 还不对"
        return f'<div style="background:{colour};padding:6px 12px;border-radius:4px"><b>{head}</b><ul>{items}</ul></div>'


def _close(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=1e-9))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value, what: str) -> tuple[float | None, str | None]:
    """``(float, None)`` for a finite real number (or a one-element tensor), else ``(None, feedback in Chinese)``.

    A reader's answer can be anything: None (a function that forgot ``return``), a string, a bool,
    a huge int, a tensor, NaN or inf. None of them may crash a checker or pass it.
    """
    if value is None:
        return None, f"{what}：收到的是 None。函数是不是忘了 return？"
    if isinstance(value, bool):
        return None, f"{what}：需要一个数，收到的是布尔值 {value!r}"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None, f"{what}：需要一个数，收到的是形状为 {tuple(value.shape)} 的张量"
        try:
            value = value.item()
        except Exception as exc:  # a meta tensor, a tensor on a lost device...
            return None, f"{what}：收到的张量（{value.device} 上）读不出数值（{type(exc).__name__}）"
    if isinstance(value, (str, bytes)):
        return None, f"{what}：需要一个数，收到的是字符串 {_short(value)}（去掉引号）"
    try:
        number = float(value)
    except OverflowError:
        return None, f"{what}：{_short(value)} 太大，超出了 float 的范围"
    except (TypeError, ValueError):
        return None, f"{what}：需要一个数，收到的是 {type(value).__name__} 类型的 {_short(value)}"
    if math.isnan(number):
        return None, f"{what}：结果是 NaN。检查计算里有没有 0/0、inf - inf 或对负数开方"
    if math.isinf(number):
        return None, f"{what}：结果是 {number}（无穷大），不是一个有限的数"
    return number, None


def _numbers(labelled) -> tuple[list[float] | None, str | None]:
    """``_number`` for each (value, label) pair: ``(floats, None)``, or ``(None, feedback)`` for the first bad one."""
    numbers = []
    for value, what in labelled:
        number, problem = _number(value, what)
        if problem:
            return None, problem
        numbers.append(number)
    return numbers, None


def _format_or_feedback(fmt) -> tuple[FloatFormat | None, CheckResult | None]:
    try:
        return get_format(fmt), None
    except (TypeError, ValueError) as error:
        return None, CheckResult(False, [f"格式 {_short(fmt)} 无法识别：{error}"])


# --- exercise: derive a format's limits -----------------------------------------------------------

def check_format_limits(fmt: str | FloatFormat, *, max: float, min_normal: float, min_subnormal: float, eps: float) -> CheckResult:
    """Check the four numbers that describe a format's range and precision."""
    f, problem = _format_or_feedback(fmt)
    if problem is not None:
        return problem
    answers = {"max": max, "min_normal": min_normal, "min_subnormal": min_subnormal, "eps": eps}
    truth = {"max": f.max, "min_normal": f.min_normal, "min_subnormal": f.min_subnormal, "eps": f.eps}
    msgs = []
    for key, value in answers.items():
        value, problem = _number(value, key)
        if problem:
            msgs.append(problem)
            continue
        if _close(value, truth[key]):
            msgs.append(f"{key} = {truth[key]:.6g} ✔")
            continue
        hint = f"{key}: 你的答案是 {value:.6g}，还不对。"
        ieee_max = math.ldexp(2 - 2.0 ** -f.mantissa_bits, 2**f.exponent_bits - 2 - f.bias)
        if key == "max" and f.special == "fn" and _close(value, ieee_max):
            hint += f" 这是按 IEEE 规则（全 1 指数留给 inf/NaN）算的；{f.name} 没有 inf，全 1 指数也表示普通数，只有全 1 的码是 NaN。"
        elif key == "max" and _close(value, math.ldexp(1.0, f.emax + 1)):
            hint += " 2^(emax+1) 本身已经超出范围：最大值是 (2 - 2^-M) × 2^emax 这一类形式。"
        elif key == "min_subnormal" and _close(value, f.min_normal):
            hint += " 这是最小正规数；次正规数还能再往下走 M 位，最小的是 2^(emin - M)。"
        elif key == "min_normal" and _close(value, math.ldexp(1.0, -f.bias)):
            hint += " 指数字段全 0 留给零和次正规数，最小正规数的指数字段是 1，即 2^(1 - bias)。"
        elif key == "eps" and _close(value, math.ldexp(1.0, -f.mantissa_bits - 1)):
            hint += " 这是单位舍入（eps 的一半）；eps 是 1 与下一个可表示数之差，2^-M。"
        msgs.append(hint)
    return CheckResult(all(m.endswith("✔") for m in msgs), msgs)


# --- exercise: implement round-to-nearest-even to FP16 ----------------------------------------------

def _round_cases() -> list[tuple[str, list[float], str]]:
    h = 2.0**-24  # fp16's smallest subnormal
    return [
        ("能精确表示的数", [1.0, -2.5, 65504.0, 0.5, 1024.0], "可表示的数应当原样返回"),
        ("普通舍入", [0.1, 3.14159, -1234.567, 1e-3], "结果应是最近的 FP16 数"),
        ("平局取偶（ties to even）", [1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 2051.0],
         "恰好在两个 FP16 数正中间时，应取尾数最后一位为 0 的那个"),
        ("次正规数", [1e-7, 3e-6, -5e-8, 3 * h / 2, h / 2 * 1.5],
         "小于 6.1e-5 的数不会直接变 0：FP16 还有间距为 2^-24 的次正规数"),
        ("下溢为零", [h / 2, 1e-9, -1e-10], "小于等于 2^-25 的数舍入到 0（2^-25 恰为平局，取偶得 0），并保留符号"),
        ("溢出", [65520.0, 1e5, -7e4, 65519.0], "不小于 65520 的数在 FP16 中变成 inf；65519 仍舍入到 65504"),
        ("特殊值", [math.inf, -math.inf, math.nan, -0.0], "inf、NaN 与 -0 应原样保留"),
    ]


def check_round_to_fp16(fn: Callable[[torch.Tensor], torch.Tensor]) -> CheckResult:
    """Check a function that rounds a float32 tensor to FP16's values (returned as float32)."""
    if not callable(fn):
        return CheckResult(False, [f"需要一个函数，收到的是 {type(fn).__name__} 类型的 {_short(fn)}"])
    msgs = []
    for name, values, why in _round_cases():
        x = torch.tensor(values, dtype=torch.float32)
        want = round_to_format(x, "fp16")
        try:
            got = fn(x.clone())
        except Exception as exc:  # the reader's code: report, don't crash the notebook
            msgs.append(f"{name}：函数抛出了异常 {type(exc).__name__}: {exc}")
            return CheckResult(False, msgs)
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            msgs.append(f"{name}：应返回与输入同形状的张量，收到 {type(got).__name__} {getattr(got, 'shape', '')}")
            return CheckResult(False, msgs)
        if got.is_complex():
            msgs.append(f"{name}：应返回实数张量，收到 {got.dtype}")
            return CheckResult(False, msgs)
        try:
            got = got.detach().float().cpu()
        except Exception as exc:  # a meta or otherwise unreadable tensor
            msgs.append(f"{name}：返回的张量读不出数值（{got.device} 上的 {got.dtype}：{type(exc).__name__}）：应返回普通的 CPU/GPU 张量")
            return CheckResult(False, msgs)
        same = (got == want) & (torch.signbit(got) == torch.signbit(want)) | (torch.isnan(got) & torch.isnan(want))
        if not bool(same.all()):
            i = int((~same).nonzero()[0])
            msgs.append(f"{name}：输入 {values[i]!r} 应得到 {want[i].item()!r}，你的函数给出 {got[i].item()!r}。{why}。")
            return CheckResult(False, msgs)
        msgs.append(f"{name} ✔")
    return CheckResult(True, msgs)


# --- exercise: Kahan summation --------------------------------------------------------------------

def _kahan_inputs() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    small = torch.rand(4000, generator=g) * 1e-3 + 1e-4  # many small positive terms: a plain low-precision sum stalls
    # large terms that mostly cancel: here Kahan in BF16/FP16 ends a few units of the last place away from the exact
    # sum, so an FP32 (or float64) sum rounded at the end, or torch's .sum() with its FP32 accumulator, gives another number
    g = torch.Generator().manual_seed(4)
    cancelling = torch.randn(1000, generator=g) * 100 + 5
    return [("4000 个小正数", small), ("1000 个相互抵消的大数", cancelling)]


def check_kahan_sum(fn: Callable[[torch.Tensor, torch.dtype], float]) -> CheckResult:
    """Check ``fn(values, dtype) -> float``, a Kahan-compensated sum whose sum and compensation are stored in ``dtype``.

    The answer must equal ``running_sum(values, dtype, "kahan")[-1]`` exactly: one of the inputs is chosen
    so that a sum kept in FP32 (or float64) and rounded to ``dtype`` at the end gives another number.
    """
    if not callable(fn):
        return CheckResult(False, [f"需要一个函数 fn(values, dtype)，收到的是 {type(fn).__name__} 类型的 {_short(fn)}"])
    msgs = []
    for label, values in _kahan_inputs():
        exact = float(values.double().sum())
        for dtype in (torch.bfloat16, torch.float16):
            try:
                answer = fn(values.clone(), dtype)
            except Exception as exc:  # the reader's code: report, don't crash the notebook
                return CheckResult(False, [f"{label}，{dtype}: 函数抛出了异常 {type(exc).__name__}: {exc}"])
            got, problem = _number(answer, str(dtype))
            if problem:
                return CheckResult(False, [f"{label}：{problem}"])
            if float(round_to_format(torch.tensor([got], dtype=torch.float64).float(), dtype)) != got:
                return CheckResult(False, [f"{label}，{dtype}: 结果 {got!r} 不是 {dtype} 能表示的数：累加器（和与补偿项）要存成 dtype，"
                                           "这个练习看的正是低精度累加器里的误差"])
            naive = float(running_sum(values, dtype, "naive")[-1])
            reference = float(running_sum(values, dtype, "kahan")[-1])
            high = {float(torch.tensor(exact).to(dtype)), float(values.sum().to(dtype)), float(values.to(dtype).sum())}
            if got == reference:
                msgs.append(f"{label}，{dtype}: {got:.6g}（精确和 {exact:.6g}，普通累加 {naive:.6g}）✔")
                continue
            if got == naive:
                msgs.append(f"{label}，{dtype}: 结果 {got:.6g} 与普通累加完全相同。补偿项没有起作用：c = (t - s) - y 要在同一精度下计算，"
                            "并在下一步先从新加数里减掉。")
            elif got in high:
                msgs.append(f"{label}，{dtype}: 结果 {got:.6g} 是在 FP32（或更高精度）中求和、最后才舍入到 {dtype} 的结果；"
                            f"和与补偿项都存成 {dtype} 的 Kahan 求和得到 {reference:.6g}。")
            else:
                msgs.append(f"{label}，{dtype}: 结果 {got:.6g}，而和与补偿项都存成 {dtype} 的 Kahan 求和得到 {reference:.6g}"
                            f"（精确和 {exact:.6g}）。检查每一步的顺序：y = v - c，t = s + y，c = (t - s) - y，s = t。")
            return CheckResult(False, msgs)
    return CheckResult(True, msgs)


# --- exercise: write a dynamic loss scaler ---------------------------------------------------------


def check_loss_scaler(make_scaler: Callable[..., object]) -> CheckResult:
    """Check a dynamic loss scaler against ``mixprec.scaling.DynamicLossScaler`` (itself bit-identical to GradScaler).

    ``make_scaler(init_scale, growth_factor, backoff_factor, growth_interval)`` must return an object
    with ``scale``, ``unscale_``, ``step``, ``update`` and ``get_scale``. Both scalers drive the same
    small model through 400 steps with planted inf and NaN gradients; scales, skipped steps and the
    final weights must agree.
    """
    from .scale_experiments import scaler_trajectory
    from .scaling import DynamicLossScaler

    options = dict(init_scale=2.0**8, growth_factor=2.0, backoff_factor=0.5, growth_interval=20)
    poison = {s: (math.nan if s % 2 else math.inf) for s in (7, 8, 60, 61, 62, 150, 333)}
    if not callable(make_scaler):
        return CheckResult(False, [f"需要一个创建缩放器的函数，收到的是 {type(make_scaler).__name__} 类型的 {_short(make_scaler)}"])
    try:
        yours, your_model = scaler_trajectory(make_scaler(**options), 400, poison)
    except Exception as error:  # the reader's code: report what broke, don't crash the notebook
        return CheckResult(False, [f"运行出错：{type(error).__name__}: {error}"])
    truth, true_model = scaler_trajectory(DynamicLossScaler(**options), 400, poison)
    for step, ((your_scale, your_stepped), (scale, stepped)) in enumerate(zip(yours, truth)):
        if your_scale != scale:
            before = "有" if step - 1 in poison else "没有"
            return CheckResult(False, [f"第 {step} 步的缩放因子是 {_short(your_scale)}，应为 {scale:g}（该步之前{before}溢出）"])
        if your_stepped != stepped:
            what = "跳过了更新" if stepped else "没有跳过更新"
            return CheckResult(False, [f"第 {step} 步应该{what}：梯度{'含 inf/NaN' if step in poison else '全是有限值'}"])
    if not all(torch.equal(a, b) for a, b in zip(your_model.parameters(), true_model.parameters())):
        return CheckResult(False, ["缩放因子和跳步都对，但最终权重不同：检查 unscale_ 是否用 1/scale 乘梯度，且每步只做一次"])
    grown = sum(1 for a, b in zip(truth, truth[1:]) if b[0] > a[0])
    return CheckResult(True, [f"400 步中缩放因子、跳过的 {len(poison)} 步和最终权重都与参考实现一致（其间增长 {grown} 次）"])


# --- exercise: count the bytes of mixed-precision training -----------------------------------------


def check_memory(precision: str, n_params: int, *, weights: float, grads: float, optimizer: float) -> CheckResult:
    """Check bytes of weights, gradients and AdamW state for ``n_params`` parameters under ``precision``."""
    from .amp import BYTES_PER_PARAMETER, memory_breakdown

    if not isinstance(precision, str) or precision not in BYTES_PER_PARAMETER:
        return CheckResult(False, [f"没有 {_short(precision)} 的内存模型；可选：{', '.join(BYTES_PER_PARAMETER)}"])
    if isinstance(n_params, bool) or not isinstance(n_params, int) or not 0 <= n_params <= 2**62:
        return CheckResult(False, [f"n_params 应是不超过 2^62 的非负整数，收到的是 {_short(n_params)}"])
    truth = memory_breakdown(n_params, precision)
    names = {"weights": "权重", "grads": "梯度", "optimizer": "优化器状态"}
    msgs, ok = [], True
    for key, value in {"weights": weights, "grads": grads, "optimizer": optimizer}.items():
        value, problem = _number(value, names[key])
        if problem:
            ok = False
            msgs.append(problem)
        elif _close(value, truth[key]):
            msgs.append(f"{names[key]}：{truth[key]:,.0f} 字节 ✔")
        else:
            ok = False
            per = truth[key] / n_params if n_params else 0
            msgs.append(f"{names[key]}：你的答案 {value:,.0f}，应为 {truth[key]:,.0f}（每个参数 {per:g} 字节）")
    return CheckResult(ok, msgs)


# --- exercise: the smallest update a low-precision weight notices -----------------------------------


def smallest_visible_update(fmt: str | FloatFormat, w: float) -> float:
    """The smallest power of two Δ with round(w + Δ) != w in ``fmt`` (round-to-nearest-even), by trying them all."""
    f = get_format(fmt)
    w = float(round_to_format(torch.tensor([w]), f))
    for k in range(-160, 128):
        delta = math.ldexp(1.0, k)
        if float(round_to_format(torch.tensor([w + delta], dtype=torch.float64).float(), f)) != w:
            return delta
    raise ValueError(f"no power of two changes {w} in {f.name}")


def check_smallest_update(fmt: str | FloatFormat, w: float, answer: float) -> CheckResult:
    """Check the smallest power-of-two update Δ that changes the weight ``w`` stored in ``fmt``."""
    f, problem = _format_or_feedback(fmt)
    if problem is not None:
        return problem
    w_value, problem = _number(w, "w")
    if problem:
        return CheckResult(False, [problem])
    try:
        truth = smallest_visible_update(f, w_value)
    except ValueError as error:
        return CheckResult(False, [f"w = {w_value:g} 在 {f.name} 中没有可见的更新（{error}）：换一个在范围内的 w"])
    answer, problem = _number(answer, "答案")
    if problem:
        return CheckResult(False, [problem])
    if _close(answer, truth):
        return CheckResult(True, [f"{f.name} 中 w = {w:g} 处，最小的可见更新是 2^{int(math.log2(truth))} = {truth:.6g} ✔"])
    ulp = f.ulp(w_value)
    parity = "w 的尾数末位是 0（偶数），平局会舍回 w" if truth == ulp else "w 的尾数末位是 1（奇数），平局会进位"
    hint = "恰好半个 ULP 时是平局，就近舍入取偶数尾数，" + parity
    return CheckResult(False, [f"你的答案 {answer:.6g}，应为 {truth:.6g}。w 处的 ULP 是 {ulp:.6g}；{hint}"])


# --- exercise: diagnose and fix the clinic's mystery model ------------------------------------------


def check_mystery_fix(norm_fn: Callable[..., torch.Tensor]) -> CheckResult:
    """Check a fix for ``clinic``'s mystery model: ``norm_fn(x, weight, bias, eps)`` replaces its normalisation.

    It must compute a LayerNorm (compared with ``F.layer_norm`` in FP32), stay finite in FP16 on the
    model's inputs, and let the model learn its task in FP16 (``clinic.run_case("mystery", fixed=True)``).
    """
    from . import clinic

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, 64, generator=g) + clinic.MYSTERY_OFFSET
    weight, bias = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g) * 0.1
    if not callable(norm_fn):
        return CheckResult(False, [f"需要一个函数 norm_fn(x, weight, bias, eps)，收到的是 {type(norm_fn).__name__} 类型的 {_short(norm_fn)}"])
    try:
        yours = norm_fn(x, weight, bias, 1e-5)
        truth = torch.nn.functional.layer_norm(x, (64,), weight, bias, 1e-5)
        if not isinstance(yours, torch.Tensor):
            return CheckResult(False, [f"norm_fn 应返回张量，收到的是 {type(yours).__name__} 类型的 {_short(yours)}"])
        if yours.shape != truth.shape or not torch.allclose(yours.float(), truth, atol=1e-3, rtol=1e-3):
            return CheckResult(False, ["在 FP32 中，你的函数和 F.layer_norm 的结果不一致：它应当仍然是一个 LayerNorm"])
        half = norm_fn(x.half(), weight.half(), bias.half(), 1e-5)
        if not isinstance(half, torch.Tensor) or half.shape != truth.shape:
            return CheckResult(False, ["在 FP16 输入上，norm_fn 应返回与输入同形状的张量"])
        if not bool(torch.isfinite(half).all()):
            return CheckResult(False, ["在 FP16 输入上它仍然产生 inf 或 NaN：看看方差是怎么算出来的"])
        run = clinic.run_case("mystery", fixed=True, norm_fn=norm_fn, trace_steps=80)
    except Exception as error:  # the reader's code: report what broke, don't crash the notebook
        return CheckResult(False, [f"运行出错：{type(error).__name__}: {error}"])
    if not run.trained:
        where = f"；追踪器在第 {run.failure_step} 步发现：{run.first_failure}" if run.first_failure else ""
        return CheckResult(False, [f"FP16 训练后留出准确率 {run.accuracy:.1%}，跳过了 {run.skipped_fraction:.0%} 的步{where}"])
    rel = float((half.float() - truth).abs().max())
    return CheckResult(True, [f"FP32 结果与 F.layer_norm 一致；FP16 中最大绝对误差 {rel:.2e}；"
                              f"FP16 训练 {len(run.loss)} 步后留出准确率 {run.accuracy:.1%}，没有 inf 或 NaN"])


# --- exercise: count generated tokens honestly ------------------------------------------------------


def check_tokens_per_second(fn: Callable[[torch.Tensor, int, float], float]) -> CheckResult:
    """Check ``fn(new_tokens, eos_token_id, seconds)``: tokens really generated per second.

    Each row of ``new_tokens`` counts up to and including its first EOS; what follows is padding.
    """
    from .story.inference import count_generated

    if not callable(fn):
        return CheckResult(False, [f"需要一个函数 fn(new_tokens, eos_token_id, seconds)，收到的是 {type(fn).__name__} 类型的 {_short(fn)}"])
    eos = 0
    cases = [
        ("没有 EOS", torch.tensor([[5, 6, 7, 8]]), 2.0),
        ("中途生成 EOS，之后是填充", torch.tensor([[5, eos, eos, eos], [5, 6, 7, 8]]), 0.5),
        ("第一个词元就是 EOS", torch.tensor([[eos, eos, eos], [4, eos, eos], [4, 4, eos]]), 1.0),
        ("EOS 之后又出现普通词元（只算到第一个 EOS）", torch.tensor([[3, eos, 3, 3]]), 1.0),
    ]
    for name, block, seconds in cases:
        truth = count_generated(block, eos) / seconds
        try:
            answer = fn(block.clone(), eos, seconds)
        except Exception as error:  # the reader's code: report what broke, don't crash the notebook
            return CheckResult(False, [f"{name}：运行出错：{type(error).__name__}: {error}"])
        yours, problem = _number(answer, name)
        if problem:
            return CheckResult(False, [problem])
        if not _close(yours, truth):
            hint = "按请求的最大长度计算会高估提前结束的序列" if yours > truth else "EOS 本身也是生成的词元，要算进去"
            return CheckResult(False, [f"{name}：你的结果 {yours:g}，应为 {truth:g}（{hint}）"])
    return CheckResult(True, [f"{len(cases)} 种情况都正确：每个序列算到并包括它的第一个 EOS"])


def outlier_tensor(seed: int = 0) -> torch.Tensor:
    """The activation of the recipe exercise: 256 tokens × 256 features, token 7 a hundred thousand times larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 256, generator=g)
    x[7] *= 1e5
    return x


def outlier_channel_tensor(seed: int = 0) -> torch.Tensor:
    """A linear layer's input with an outlier feature: 256 tokens × 256 features, feature 7 a hundred thousand times larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 256, generator=g)
    x[:, 7] *= 1e5
    return x


def check_outlier_recipe(recipe: str, where: str = "token") -> CheckResult:
    """Which FP8 recipe quantizes the outlier tensor (as a linear layer's input, in the forward product) with
    the smallest error on the values other than the outlier? ``where="token"``: ``outlier_tensor()``, one
    token (row) is the outlier; ``where="channel"``: ``outlier_channel_tensor()``, one feature (column) is.
    Answer a recipe name from ``mixprec.fp8.RECIPES``."""
    from .debug import relative_error
    from .fp8 import RECIPES, Float8LinearConfig

    if where not in ("token", "channel"):
        return CheckResult(False, [f"where 应是 \"token\" 或 \"channel\"，收到 {_short(where)}"])
    if not isinstance(recipe, str) or recipe not in RECIPES:
        return CheckResult(False, [f"请回答一个配方名：{', '.join(RECIPES)}（收到 {_short(recipe)}）"])
    x = outlier_tensor() if where == "token" else outlier_channel_tensor()
    others = torch.ones(256, 256, dtype=torch.bool)
    if where == "token":
        others[7] = False
    else:
        others[:, 7] = False
    errors = {name: relative_error(Float8LinearConfig.from_recipe_name(name).cast_config_input.cast(x, 1)[others], x[others])
              for name in RECIPES}
    best = min(errors.values())
    table = "；".join(f"{name} {err:.2%}" for name, err in errors.items())
    if errors[recipe] <= best * 1.5:  # the per-row and per-block recipes differ only by how they round the scale
        if where == "token":
            return CheckResult(True, [f"其余词元的相对误差：{table}。按张量的缩放因子被异常值定死，其余词元挤进次正规数甚至下溢；"
                                      f"每行（每个词元）或每块有自己的缩放因子，异常值只影响它自己所在的行或块。"])
        return CheckResult(True, [f"其余特征的相对误差：{table}。前向的缩放因子沿内维（特征）分组：一行、一个 1×128 块都含有那个异常特征，"
                                  f"缩放因子被它定死；块越短，被它拖累的数越少，MX 的 32 个一块最短。"])
    return CheckResult(False, [f"{recipe} 的误差是 {errors[recipe]:.2%}，还有更小的。想一想：异常值所在的那个缩放因子还管着哪些数？"])


def e2m1_values() -> list[float]:
    """Every non-negative value of FP4 E2M1 (OCP MX v1.0): 2 exponent bits, bias 1, 1 mantissa bit, no inf or NaN."""
    from .formats import E2M1, decode

    return [decode(code, E2M1).value for code in range(8)]  # codes 0-7: sign bit clear


def check_e2m1_values(values) -> CheckResult:
    """Check the list of every non-negative value FP4 E2M1 (MXFP4's element) can hold, 0 included, in any order."""
    truth = e2m1_values()
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist() if values.numel() < 1000 else values
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        return CheckResult(False, [f"需要一个数的列表，例如 [0, 0.5, ...]，收到的是 {type(values).__name__} 类型的 {_short(values)}"])
    try:
        answer = list(values)
    except Exception as error:  # an iterator that fails: report it, never raise
        return CheckResult(False, [f"读取答案时出错：{type(error).__name__}: {error}"])
    if len(answer) > 64:
        return CheckResult(False, [f"E2M1 只有 4 位，至多 16 个编码；你给了 {len(answer)} 个数"])
    numbers, problem = _numbers((v, f"第 {i + 1} 个数") for i, v in enumerate(answer))
    if problem:
        return CheckResult(False, [problem])
    got = sorted(set(numbers))
    if any(v < 0 for v in got):
        return CheckResult(False, ["只列非负值（0 和正数）；负值由符号位给出，与正值对称"])
    if got == truth:
        return CheckResult(True, [f"E2M1 的 {len(truth)} 个非负值：{', '.join(f'{v:g}' for v in truth)}。最大值 6 = 1.5 × 2²：没有 inf 和 NaN，"
                                  "最高的指数也用于普通数；0.5 是唯一的次正规数。"])
    missing = [v for v in truth if v not in got]
    extra = [v for v in got if v not in truth]
    hints = []
    if 6.0 in missing and 4.0 in got:
        hints.append("E2M1 没有 inf 和 NaN，全 1 的编码（1.5 × 2²）也是普通数")
    if 0.5 in missing:
        hints.append("指数字段为 0 时是次正规数：0.m × 2^(1 - 偏置)")
    if any(v > 6 for v in extra):
        hints.append("偏置是 1，最大的指数是 3 - 1 = 2")
    if 0.25 in extra:
        hints.append("尾数只有 1 位：次正规数只有 0.5 一个")
    text = f"少了 {', '.join(f'{v:g}' for v in missing) or '无'}；多了 {', '.join(f'{v:g}' for v in extra) or '无'}。"
    return CheckResult(False, [text + ("提示：" + "；".join(hints) + "。" if hints else "")])


def check_mx_block(amax: float, restored) -> CheckResult:
    """A 32-value block whose largest magnitude is ``amax`` goes to MXFP8 (E4M3, the spec's floor
    scale). What does that largest value come back as? ``restored``: your prediction."""
    from .fp8 import quantize_mx

    value, problem = _number(amax, "amax")
    if problem or value <= 0:
        return CheckResult(False, [problem or f"amax 应是一个正数，收到 {_short(amax)}"])
    if value > torch.finfo(torch.float32).max:
        return CheckResult(False, [f"amax = {value:g} 超出了 FP32 的范围（最大 {torch.finfo(torch.float32).max:.4g}）：块里的数先要是 FP32 张量"])
    guess, problem = _number(restored, "预测的还原值")
    if problem:
        return CheckResult(False, [problem])
    block = torch.zeros(1, 32)
    block[0, 0] = value
    q = quantize_mx(block)
    truth, scale = float(q.dequantize()[0, 0]), float(q.scale[0, 0])
    stored = float(q.values[0, 0])
    why = (f"共享指数使缩放因子为 2^{math.log2(scale):.0f}：amax × 缩放 = {value * scale:g}，"
           + ("超过 448，被截断为 448" if value * scale > 448 else f"舍入到 E4M3 得 {stored:g}") + f"，还原后是 {truth:g}。")
    if guess == truth:
        return CheckResult(True, [why])
    return CheckResult(False, [f"预测 {guess:g}，实际 {truth:g}。提示：先算 floor(log2(amax)) − 8，再看 amax 除以 2 的这个幂后是否超过 448。"])


# --- exercise: bytes a DDP rank communicates per step -------------------------------------------------


def check_ddp_bytes(setting: str, n_params: int, world_size: int, *, payload: float, wire: float) -> CheckResult:
    """Check the bytes one DDP rank hands to the all-reduce in a step (``payload``) and sends in a ring (``wire``)."""
    from .distributed import Setting, communication_per_step, ring_wire_bytes

    try:
        parsed = Setting.parse(setting)
    except (ValueError, TypeError) as error:
        return CheckResult(False, [f"设置写错了：{error}"])
    if parsed.strategy != "ddp":
        return CheckResult(False, [f"这个检查器只管 DDP 的设置（如 'ddp,fp32,hook=bf16'），收到的是 {_short(setting)}"])
    if isinstance(n_params, bool) or not isinstance(n_params, int) or not 1 <= n_params <= 2**50:
        return CheckResult(False, [f"n_params 应是 1 到 2^50 之间的整数，收到的是 {_short(n_params)}"])
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= 2**20:
        return CheckResult(False, [f"world_size 应是 1 到 2^20 之间的整数，收到的是 {_short(world_size)}"])
    flat = torch.nn.Module()
    flat.weight = torch.nn.Parameter(torch.empty(n_params, device="meta"))  # only its size matters
    truth = communication_per_step(flat, parsed, world_size)
    true_wire = ring_wire_bytes(truth, world_size)
    dtype = parsed.communicated_dtypes()["all_reduce"]
    msgs, ok = [], True
    value, problem = _number(payload, "payload")
    if problem:
        return CheckResult(False, [problem])
    if _close(value, truth["all_reduce"]):
        msgs.append(f"交给 all-reduce 的数据：{truth['all_reduce']:,} 字节 ✔（每个梯度 {dtype.itemsize} 字节，{dtype}）")
    else:
        ok = False
        hint = "；注意通信钩子把梯度转成了什么类型" if value and _close(value, n_params * 4) else ""
        msgs.append(f"交给 all-reduce 的数据：你的答案 {value:,.0f}，应为 {truth['all_reduce']:,}（{n_params:,} 个梯度 × "
                     f"{dtype.itemsize} 字节{hint}）")
    value, problem = _number(wire, "wire")
    if problem:
        return CheckResult(False, msgs + [problem])
    if _close(value, true_wire):
        msgs.append(f"环形算法中每个 rank 发出：{true_wire:,} 字节 ✔")
    else:
        ok = False
        msgs.append(f"环形算法中每个 rank 发出：你的答案 {value:,.0f}，应为 {true_wire:,}：reduce-scatter 和 all-gather 两个阶段"
                    f"各发 (W-1)/W 份，共 2(W-1)/W = {2 * (world_size - 1) / world_size:g} 份")
    return CheckResult(ok, msgs)


def check_e2m1_pair(byte: int, values) -> CheckResult:
    """One byte of ``torch.float4_e2m1fn_x2`` holds two E2M1 codes, element 0 in the low nibble.
    ``values``: your two decoded values, (element 0, element 1)."""
    from .formats import E2M1, decode

    if isinstance(byte, bool) or not isinstance(byte, int) or not 0 <= byte < 256:
        return CheckResult(False, [f"byte 应是 0 到 255 之间的整数，收到 {_short(byte)}"])
    try:
        pair = list(values)
    except TypeError:
        return CheckResult(False, [f"需要两个数 (元素 0, 元素 1)，收到 {_short(values)}"])
    if len(pair) != 2:
        return CheckResult(False, [f"一个字节存两个 E2M1 值，你给了 {len(pair)} 个"])
    numbers, problem = _numbers((v, f"元素 {i}") for i, v in enumerate(pair))
    if problem:
        return CheckResult(False, [problem])
    low, high = byte & 0xF, byte >> 4
    truth = [decode(low, E2M1).value, decode(high, E2M1).value]
    why = f"0x{byte:02X}：低 4 位 {low:04b} 是元素 0 = {truth[0]:g}，高 4 位 {high:04b} 是元素 1 = {truth[1]:g}（符号 1 位、指数 2 位、尾数 1 位，偏置 1）。"
    if all(_close(a, b) for a, b in zip(numbers, truth)):
        return CheckResult(True, [why])
    if all(_close(a, b) for a, b in zip(numbers, reversed(truth))):
        return CheckResult(False, ["两个值对调了：元素 0 在低 4 位（与 torchao 的 pack_uint4 相同）"])
    return CheckResult(False, [f"预测 {numbers[0]:g}, {numbers[1]:g}，实际不是。提示：先把字节拆成高、低两个 4 位，"
                               "再按 S EE M 读每一个；指数字段为 0 时是次正规数 0.M × 2^0。"])


def check_nvfp4_scales(tensor_amax: float, block_amax: float, *, tensor_scale: float, block_scale: float) -> CheckResult:
    """NVFP4's two scales for a block whose largest magnitude is ``block_amax``, in a tensor whose largest
    is ``tensor_amax``: the FP32 tensor scale and the block's E4M3 scale, as ``mixprec.fp4.quantize_nvfp4`` computes them."""
    from .fp4 import quantize_nvfp4

    a, problem = _number(tensor_amax, "tensor_amax")
    b, problem_b = _number(block_amax, "block_amax")
    if problem or problem_b:
        return CheckResult(False, [problem or problem_b])
    if not 0 < b <= a:
        return CheckResult(False, [f"需要 0 < block_amax ≤ tensor_amax，收到 {b:g} 和 {a:g}"])
    guesses, problem = _numbers(((tensor_scale, "tensor_scale"), (block_scale, "block_scale")))
    if problem:
        return CheckResult(False, [problem])
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 16] = a, b
    q = quantize_nvfp4(x)
    truth = [float(q.tensor_scale), float(q.block_scale[0, 16])]
    why = (f"张量缩放因子 = {a:g} / (448 × 6) = {truth[0]:.6g}；块缩放因子 = ({b:g} / 6) / 张量缩放因子 = "
           f"{b / 6 / truth[0]:.6g}，舍入到 E4M3 得 {truth[1]:g}。")
    ok = [math.isclose(g, t, rel_tol=1e-4) for g, t in zip(guesses, truth)]
    if all(ok):
        return CheckResult(True, [why])
    if not ok[0]:
        return CheckResult(False, [f"张量缩放因子不对（你给的是 {guesses[0]:.6g}）。提示：它让整个张量最大的那个块的缩放因子正好是 E4M3 的最大值 448。"])
    return CheckResult(False, [f"块缩放因子不对（你给的是 {guesses[1]:g}）。提示：先除以 6 再除以张量缩放因子，最后舍入到 E4M3（尾数 3 位）。"])
