"""A clinic of small broken models: each fails in FP16 for one real reason, and one change fixes it.

All cases share one model, ``ClinicModel``: a one-layer attention classifier that reads a padded
sequence of tokens and names its largest token. It is written the way such models are written by
hand, and each case switches on one classic mistake:

==================  ============================================================  ===================
case                the mistake                                                    precision (policy)
==================  ============================================================  ===================
``naive_softmax``   softmax as exp(s) / Σ exp(s), without subtracting the max     ``fp16-master``
``layernorm_eps``   a hand-written LayerNorm with eps = 1e-12, computed in FP16   ``fp16-master``
``fp16_loss``       the loss as -log(softmax(logits)) in FP16                     ``fp16-master``
``additive_mask``   padding masked by adding (1 - mask) · (-1e9) in FP16          ``fp16-master``
``exploding_lr``    a learning rate 1000x too high; GradScaler skips every step   ``fp16-amp:native``
``custom_op``       a custom autograd.Function that autocast leaves in FP16       ``fp16-amp:native``
==================  ============================================================  ===================

Each case's precision is a policy of ``mixprec.amp``. ``fp16-master`` is the classic "FP16 model"
recipe of Micikevicius et al. (2018), also DeepSpeed's fp16 mode: the model's weights and
activations in FP16, FP32 master weights in the optimizer, dynamic loss scaling.
``fp16-amp:native`` is this device's own ``torch.amp.autocast`` with FP32 weights and
``torch.amp.GradScaler``: native, because ``torch.amp.custom_fwd`` (the custom-op fix) reacts to
real autocast only.
``run_case(name, fixed=False)`` trains the broken model, ``run_case(name, fixed=True)`` the fixed
one, and both report whether the model learned the task.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .amp import get_policy
from .debug import NonFinite, trace_nonfinite
from .step import TrainHistory, forward_backward, train_step

VOCAB = 32  # token 0 is padding
MAX_LEN = 12


@dataclass(frozen=True)
class Case:
    name: str
    title: str  # in Chinese, for the chapter
    precision: str  # the policy it trains under (mixprec.amp): "fp16-master" or "fp16-amp:native"
    lr: float = 3e-3
    fixed_lr: float | None = None  # exploding_lr: the fix is the learning rate itself


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("naive_softmax", "softmax 没有减去最大值", "fp16-master"),
        Case("layernorm_eps", "LayerNorm 的 eps = 1e-12", "fp16-master"),
        Case("fp16_loss", "在 FP16 中计算损失", "fp16-master"),
        Case("additive_mask", "加性 −1e9 掩码", "fp16-master"),
        Case("exploding_lr", "学习率过大，GradScaler 一直跳步", "fp16-amp:native", lr=3.0, fixed_lr=3e-3),
        Case("custom_op", "autocast 管不到的自定义算子", "fp16-amp:native"),
    )
}


# The exercise: a model the chapter does not show. Its mistake is for the reader to find.
MYSTERY = Case("mystery", "练习：找出这个模型的毛病", "fp16-master")
MYSTERY_OFFSET = 30.0  # its token features are all positive, around 30 (like raw counts or intensities)


def layer_norm_one_pass(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The mystery model's normalisation."""
    mean = x.mean(-1, keepdim=True)
    var = (x * x).mean(-1, keepdim=True) - mean * mean
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


class FunctionalNorm(nn.Module):
    """A LayerNorm whose arithmetic is ``fn(x, weight, bias, eps)``: the mystery model's, or a reader's fix."""

    def __init__(self, width: int, fn, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.fn, self.eps = fn, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.bias, self.eps)


# --- the task: name the largest token of a padded sequence ----------------------------------------

def make_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences of random length 3..MAX_LEN, padded with 0; the label is the largest token."""
    tokens = torch.randint(1, VOCAB, (batch_size, MAX_LEN), generator=generator)
    lengths = torch.randint(3, MAX_LEN + 1, (batch_size,), generator=generator)
    tokens[torch.arange(MAX_LEN) >= lengths[:, None]] = 0
    return tokens, tokens.max(dim=1).values


# --- the pieces, each in a broken and a fixed version -------------------------------------------------

def softmax_naive(scores: torch.Tensor) -> torch.Tensor:
    """exp(s) / Σ exp(s): exp overflows FP16 as soon as a score passes log(65504) ≈ 11.09."""
    e = torch.exp(scores)
    return e / e.sum(dim=-1, keepdim=True)


def softmax_stable(scores: torch.Tensor) -> torch.Tensor:
    """Subtract each row's max first, so every exp(·) <= 1 and the sum <= the row length; in FP32,
    as ``F.softmax``'s kernels do, so that a masked score minus the max cannot overflow either."""
    s = scores.float()
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (e / e.sum(dim=-1, keepdim=True)).to(scores.dtype)


class HandLayerNorm(nn.Module):
    """LayerNorm written out, as in many older codebases (and BERT's eps = 1e-12).

    With ``in_fp32`` the statistics are computed in FP32 and the result cast back, which is what
    ``F.layer_norm``'s kernels do internally; without it everything runs in the input's dtype.
    """

    def __init__(self, width: int, eps: float, in_fp32: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps, self.in_fp32 = eps, in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() if self.in_fp32 else x
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) * (h - mean)).mean(-1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + self.eps)  # eps = 1e-12 is 0 in FP16: a constant row gives 0 / 0
        return h.to(x.dtype) * self.weight + self.bias


class _L2NormalizeFn(torch.autograd.Function):
    """x / ‖x‖ over the last dimension, with a hand-written backward, as custom fused kernels are written."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        inv_norm = torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)  # in FP16, x·x is inf once |x| > 255.9
        y = x * inv_norm
        ctx.save_for_backward(y, inv_norm)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, inv_norm = ctx.saved_tensors
        return inv_norm * (grad - y * (grad * y).sum(-1, keepdim=True)), None


def l2_normalize_as_given(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The custom op, run in whatever dtype it is handed: FP16 after a linear layer under autocast."""
    return _L2NormalizeFn.apply(x, eps)


def l2_normalize_fp32(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The same op declared with ``torch.amp.custom_fwd(cast_inputs=torch.float32)``: under autocast
    its inputs are cast to FP32 and autocast is off inside it; outside autocast nothing changes."""
    return _l2_normalize_fp32_fn(x.device.type).apply(x, eps)


_FP32_FNS: dict[str, type] = {}


def _l2_normalize_fp32_fn(device_type: str) -> type:
    # custom_fwd needs the device type when the class is defined: one class per device type.
    if device_type not in _FP32_FNS:
        class L2NormalizeFp32(_L2NormalizeFn):
            forward = staticmethod(torch.amp.custom_fwd(_L2NormalizeFn.forward, device_type=device_type, cast_inputs=torch.float32))
            backward = staticmethod(torch.amp.custom_bwd(_L2NormalizeFn.backward, device_type=device_type))
        _FP32_FNS[device_type] = L2NormalizeFp32
    return _FP32_FNS[device_type]


def cross_entropy_fp16(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) from a softmax in the logits' dtype: in FP16, p < 6e-8 rounds to 0 and log(0) = -inf."""
    probs = torch.softmax(logits, dim=-1)
    return -torch.log(probs.gather(-1, targets[:, None])).mean()


def cross_entropy_fp32(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The usual fix: log-softmax in FP32 (``F.cross_entropy`` never forms p itself)."""
    return F.cross_entropy(logits.float(), targets)


def mask_additive(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An additive bias (1 - mask)·(-1e9), made in the scores' dtype: in FP16 -1e9 is -inf, and the
    allowed positions get 0·(-inf) = NaN."""
    bias = (1 - mask.to(scores.dtype)) * torch.tensor(-1e9, dtype=scores.dtype, device=scores.device)
    return scores + bias


def mask_fill_min(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_fill with the dtype's most negative finite value: a fully masked row stays finite."""
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)


# --- the model ------------------------------------------------------------------------------------

class Attention(nn.Module):
    """One head of self-attention over a padded sequence; padded keys are masked out."""

    def __init__(self, width: int, bug: str | None):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.bug = bug

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(h), self.k(h), self.v(h)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        keys = valid[:, None, :]  # every query attends to the real tokens only
        scores = mask_additive(scores, keys) if self.bug == "additive_mask" else mask_fill_min(scores, keys)
        weights = softmax_naive(scores) if self.bug == "naive_softmax" else softmax_stable(scores)
        return self.out(weights @ v)


class L2Normalize(nn.Module):
    def __init__(self, as_given: bool):
        super().__init__()
        self.as_given = as_given

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize_as_given(x) if self.as_given else l2_normalize_fp32(x)


class ClinicModel(nn.Module):
    """Embed → LayerNorm → self-attention (padded keys masked) → mean over tokens → linear → L2-normalise → logits.

    ``bug`` names the case whose mistake is switched on (None: every piece in its fixed version).
    The output layer is tied to the token embedding, so the logits are scores against each token.
    ``custom_op`` adds an outlier channel of 4000 to the residual stream, as large language models
    have ("massive activations"); everything but the custom op copes with it.
    """

    def __init__(self, bug: str | None = None, width: int = 64, seed: int = 0, norm_fn=None):
        super().__init__()
        if bug is not None and bug not in CASES and bug != MYSTERY.name:
            raise ValueError(f"unknown case {bug!r}; valid: {', '.join(CASES)}")
        self.bug = bug
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, width, padding_idx=0)
            self.norm = HandLayerNorm(width, eps=1e-12 if bug == "layernorm_eps" else 1e-5, in_fp32=bug != "layernorm_eps")
            self.attn = Attention(width, bug)
            self.proj = nn.Linear(width, width)
        mystery = bug == MYSTERY.name or norm_fn is not None
        if mystery:
            self.norm = FunctionalNorm(width, norm_fn or layer_norm_one_pass)
        self.offset = MYSTERY_OFFSET if mystery else 0.0
        self.head_norm = L2Normalize(as_given=bug == "custom_op")
        outlier = torch.zeros(width)
        if bug == "custom_op":
            outlier[0] = 4000.0
        self.register_buffer("outlier", outlier)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        valid = tokens != 0  # (B, T)
        x = self.embed(tokens)
        h = self.norm(x + self.offset * valid[..., None].to(x.dtype))  # mystery: the norm's input is offset; LN removes a mean
        x = x + self.attn(h, valid) + self.outlier.to(x.dtype)
        pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        z = self.head_norm(self.proj(pooled))
        return (math.sqrt(z.shape[-1]) * z) @ self.embed.weight.T.to(z.dtype)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_fp16(logits, labels) if self.bug == "fp16_loss" else cross_entropy_fp32(logits, labels)


# --- the chapter's fifteen-line first-NaN finder ------------------------------------------------

class NonFiniteOp(FloatingPointError):
    """Raised by ``FindFirstNonFinite`` at the first op whose result holds an inf or a NaN."""

    def __init__(self, op: str, phase: str):
        super().__init__(f"{phase}：{op} 第一个产生了 inf 或 NaN")
        self.op, self.phase = op, phase


class FindFirstNonFinite(TorchDispatchMode):
    """The chapter's fifteen-line version of ``trace_nonfinite``: stop at the first non-finite result and name
    its op (no module names, no attribution of a narrowing cast). On every clinic case it stops at the op
    ``trace_nonfinite`` names (tested)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))  # 先照常执行这个运算
        for t in tree_leaves(out):  # 再检查它的每个浮点输出
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                node = torch._C._current_autograd_node()  # 反向传播中：正在执行的自动微分节点
                phase = "前向" if node is None else f"反向（{node.name()}）"
                raise NonFiniteOp(func.overloadpacket.__name__, phase)
        return out


# --- training -----------------------------------------------------------------------------------

@dataclass
class CaseRun(TrainHistory):
    """A clinic run: the training history every trainer keeps, plus what the case is about."""

    case: str = ""
    fixed: bool = False
    accuracy: float = float("nan")  # on held-out sequences, at the end, in the run's precision
    first_failure: NonFinite | None = None  # what the tracer found on the first step with an inf or NaN
    failure_step: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> CaseRun:
        """The inverse of ``as_dict`` (a cached run read back)."""
        failure = data.get("first_failure")
        if failure is not None:
            failure = NonFinite(**{**failure, "shape": tuple(failure["shape"])})
        return cls(**{**data, "first_failure": failure})

    @property
    def trained(self) -> bool:
        """Learned the task: >= 90% held-out accuracy, and the last quarter of steps finite and not skipped."""
        tail = len(self.loss) // 4
        late_ok = all(math.isfinite(v) for v in self.loss[-tail:]) and not any(self.skipped[-tail:])
        return self.accuracy >= 0.9 and late_ok


def run_case(case: str, fixed: bool, steps: int = 300, batch_size: int = 64, seed: int = 0, device: str | torch.device = "cpu",
             trace: bool = True, progress: bool = False, norm_fn=None, trace_steps: int | None = None, wait: bool = True) -> CaseRun:
    """Train the case's model (broken, or with its fix) with ``mixprec.step.train_step`` and report what happened.

    Each case trains under its policy (``Case.precision``, see the module docstring).
    trace: before each step, until one is found, run its forward and backward once more without
        loss scaling under ``debug.trace_nonfinite``: the first inf or NaN anywhere, even one that
        later ops hide, goes into ``first_failure``.
    trace_steps: trace only the first this many steps (None: all). Tracing costs a few steps' time
        each; a run that finds nothing (a fixed case) pays it on every step it traces.
    norm_fn: for the mystery case, the reader's ``fn(x, weight, bias, eps)`` used as the fix.

    A run is a pure function of these settings and the library, so it is cached (``mixprec.cache``)
    like ``story.compare``'s runs, except one with the reader's ``norm_fn``. ``wait=False``: return
    ``cache.BUSY`` if another process is training this run now (see ``run_cases``).
    """
    if case not in CASES and case != MYSTERY.name:
        raise ValueError(f"unknown case {case!r}; valid: {', '.join(CASES)}")
    settings = dict(case=case, fixed=fixed, steps=steps, batch_size=batch_size, seed=seed, device=str(torch.device(device)),
                    trace=trace, trace_steps=trace_steps)
    if norm_fn is not None:
        return _train_case(**settings, progress=progress, norm_fn=norm_fn)
    from .cache import cached, write_json

    def build(directory):
        run = _train_case(**settings, progress=progress)
        write_json(directory / "run.json", run.as_dict())
        return run

    def load(directory):
        return CaseRun.from_dict(json.loads((directory / "run.json").read_text()))

    return cached("clinic", settings, build, load, wait=wait)


def run_cases(runs: dict[str, dict], **options) -> dict[str, CaseRun]:
    """``run_case(**runs[name], **options)`` for every name; two processes that need the same runs split them."""
    from .cache import split_with_other_processes

    return split_with_other_processes({name: lambda wait, name=name: run_case(**runs[name], **options, wait=wait) for name in runs})


def _train_case(case: str, fixed: bool, steps: int, batch_size: int, seed: int, device: str, trace: bool,
                trace_steps: int | None, progress: bool = False, norm_fn=None) -> CaseRun:
    spec = CASES.get(case, MYSTERY)
    device = torch.device(device)
    if case == MYSTERY.name:
        model = ClinicModel(MYSTERY.name, seed=seed, norm_fn=norm_fn if fixed else None).to(device)
    else:
        model = ClinicModel(None if fixed else case, seed=seed).to(device)
    lr = spec.fixed_lr if fixed and spec.fixed_lr else spec.lr
    setup = get_policy(spec.precision).setup(model, lr=lr, betas=(0.9, 0.999), loss_fn=model.loss, clip=1.0, device=device)
    policy = setup.policy
    generator = torch.Generator().manual_seed(seed)
    run = CaseRun(policy.name, device=device.type, parameters=sum(p.numel() for p in model.parameters()), case=case, fixed=fixed,
                  notes=list(setup.notes))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{case} ({'fixed' if fixed else 'broken'})", leave=False)
    for step in range(steps):
        x, y = (t.to(device) for t in make_batch(batch_size, generator))
        if trace and run.first_failure is None and (trace_steps is None or step < trace_steps):
            # Traced without loss scaling: the scaler's own overflows while it calibrates are not the bug.
            run.first_failure = trace_nonfinite(model, lambda x=x, y=y: forward_backward(model, x, y, model.loss, policy, device))
            run.failure_step = step if run.first_failure is not None else None
            model.zero_grad(set_to_none=True)
        run.append(train_step(setup, x, y))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    x, y = (t.to(device) for t in make_batch(1024, torch.Generator().manual_seed(seed + 1)))
    with torch.no_grad(), policy.forward(device):
        logits = model(x)
    run.accuracy = float((logits.argmax(-1) == y).float().mean()) if bool(torch.isfinite(logits).all()) else 0.0
    return run
