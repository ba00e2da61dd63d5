"""Precision policies: what a training step computes in, stores weights in, and scales the loss with.

A policy is data (``Policy``); ``get_policy(name)`` parses a name:

=====================  ==========================================================================
``fp32``               everything FP32
``tf32``               FP32 storage; FP32 matmuls on TF32 tensor cores (CUDA Ampere+; no effect on CPU)
``fp16-amp``           FP32 weights; autocast to FP16; ``torch.amp.GradScaler``
``bf16-amp``           FP32 weights; autocast to BF16; no scaler needed
``bf16-pure``          BF16 weights and compute; ``bf16-pure:stochastic`` / ``bf16-pure:kahan`` change
                       how updates are written back (``mixprec.optim.BF16AdamW``)
``fp16-master``        mixed precision by hand: the model in FP16, an FP32 master copy that the
``bf16-master``        optimizer updates (``MasterWeights``); GradScaler for FP16
``fp8``                linear layers in FP8: torchao with BF16 autocast on FP8 GPUs; emulated
                       ``mixprec.fp8.Fp8Linear`` with FP32 elsewhere
``emulate:<format>``   every op result, forward and backward, rounded to any ``mixprec.formats``
                       format; FP32 master weights, rounded working copy (runs anywhere)
=====================  ==========================================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .emulate import EmulatedPrecision
from .formats import FloatFormat, get_format, round_to_format

BASE_POLICIES = ("fp32", "tf32", "fp16-amp", "bf16-amp", "bf16-pure", "bf16-pure:stochastic", "bf16-pure:kahan", "fp16-master", "bf16-master", "fp8")
POLICY_NAMES = BASE_POLICIES + ("emulate:<format>",)


@dataclass(frozen=True)
class Policy:
    name: str
    autocast_dtype: torch.dtype | None = None  # autocast to this dtype, or no autocast
    param_dtype: torch.dtype = torch.float32  # dtype the model's weights are stored in
    tf32: bool = False
    emulate: FloatFormat | None = None
    fp8: bool = False
    update_rounding: str | None = None  # bf16-pure: "nearest", "stochastic" or "kahan"
    master_weights: bool = False  # FP32 master copy owned by the optimizer; the model holds the working copy
    uses_scaler: bool = False  # GradScaler by default

    @contextlib.contextmanager
    def compute(self, device: torch.device):
        """The context a forward/backward pass runs in: autocast, TF32 and emulation as the policy says."""
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype is not None:
                stack.enter_context(torch.amp.autocast(device_type=device.type, dtype=self.autocast_dtype))
            if self.tf32 and device.type == "cuda":
                stack.enter_context(_tf32_matmuls())
            if self.emulate is not None:
                stack.enter_context(EmulatedPrecision(self.emulate))
            yield


@contextlib.contextmanager
def _tf32_matmuls():
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def get_policy(name: str | Policy) -> Policy:
    """The policy called ``name``; unknown names fail with the list of valid ones."""
    if isinstance(name, Policy):
        return name
    if not isinstance(name, str):
        raise TypeError(f"precision must be a policy name, got {type(name).__name__}")
    if name.startswith("emulate:"):
        try:
            fmt = get_format(name.removeprefix("emulate:"))
            round_to_format(torch.zeros(1), fmt)  # fails for formats float32 cannot emulate
        except ValueError as error:
            raise ValueError(f"{name!r}: {error}") from None
        return Policy(name, emulate=fmt, master_weights=True)
    policies = {
        "fp32": Policy("fp32"),
        "tf32": Policy("tf32", tf32=True),
        "fp16-amp": Policy("fp16-amp", autocast_dtype=torch.float16, uses_scaler=True),
        "bf16-amp": Policy("bf16-amp", autocast_dtype=torch.bfloat16),
        "bf16-pure": Policy("bf16-pure", param_dtype=torch.bfloat16, update_rounding="nearest"),
        "bf16-pure:stochastic": Policy("bf16-pure:stochastic", param_dtype=torch.bfloat16, update_rounding="stochastic"),
        "bf16-pure:kahan": Policy("bf16-pure:kahan", param_dtype=torch.bfloat16, update_rounding="kahan"),
        "fp16-master": Policy("fp16-master", param_dtype=torch.float16, master_weights=True, uses_scaler=True),
        "bf16-master": Policy("bf16-master", param_dtype=torch.bfloat16, master_weights=True),
        "fp8": Policy("fp8", fp8=True),
    }
    if name not in policies:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(POLICY_NAMES)} (e.g. 'emulate:fp16', 'emulate:e4m3fn')")
    return policies[name]


class MasterWeights:
    """FP32 master weights that the optimizer owns, and the model's low-precision working copy.

    ``working`` is a torch dtype (the model's parameters are converted to it) or a format that the
    parameters, kept in float32, are rounded to (emulation). Each step: the backward pass fills the
    working gradients; ``grads_to_master()`` copies them to the masters in FP32; the optimizer
    updates the masters; ``to_working()`` writes the rounded masters back into the model.
    """

    def __init__(self, model: torch.nn.Module, working: torch.dtype | str | FloatFormat):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        if isinstance(working, torch.dtype):
            self.dtype, self.format = working, None
            for p in self.params:
                p.data = p.data.to(working)
        else:
            self.dtype, self.format = torch.float32, get_format(working)
        self.to_working()

    @torch.no_grad()
    def to_working(self) -> None:
        for p, m in zip(self.params, self.master):
            p.copy_(m if self.format is None else round_to_format(m, self.format))

    @torch.no_grad()
    def grads_to_master(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None


# --- what autocast does, op by op ---------------------------------------------------------------


@dataclass(frozen=True)
class OpRecord:
    """One call seen under autocast: the floating-point dtypes in, out, and out without autocast."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    without_autocast: tuple[str, ...] | None  # None: the call fails without autocast (mixed dtypes), or was not re-run

    @property
    def category(self) -> str:
        """What autocast changed: ``lowered`` (output in low precision because of autocast), ``fp32`` (output
        in FP32 because of autocast), ``promoted`` (mixed inputs, FP32 out by PyTorch's own type promotion,
        not autocast) or ``unchanged``."""
        if self.outputs != self.without_autocast:
            return "fp32" if set(self.outputs) == {"float32"} else "lowered"
        if len(set(self.inputs)) > 1 and set(self.outputs) == {"float32"}:
            return "promoted"
        return "unchanged"


class AutocastInspector(TorchFunctionMode):
    """Records every torch function called inside it with its floating-point input and output dtypes.

    A ``TorchFunctionMode`` sees calls *before* autocast rewrites them, so each record shows the
    dtypes the caller passed and the dtypes autocast handed back. To tell autocast's doing from
    PyTorch's ordinary type promotion, each call is run a second time with autocast disabled and
    the output dtypes compared (in-place calls are not re-run). Use it inside the autocast context::

        with torch.amp.autocast("cpu", dtype=torch.bfloat16), AutocastInspector() as seen:
            model(x)
        seen.records
    """

    _SKIP = {"__get__", "__getitem__", "size", "dim", "backward"}  # accessors autocast never touches

    def __init__(self):
        super().__init__()
        self.records: list[OpRecord] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        outs = tuple(_float_dtypes(out))
        if name in self._SKIP or not outs:
            return out
        plain = None
        devices = [t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if devices and not name.endswith("_"):
            try:
                with torch.amp.autocast(device_type=devices[0], enabled=False):
                    plain = tuple(_float_dtypes(func(*args, **kwargs)))
            except RuntimeError:  # e.g. a BF16 activation times an FP32 weight: only autocast makes that legal
                plain = None
        self.records.append(OpRecord(name, tuple(_float_dtypes((args, kwargs))), outs, plain if devices else outs))
        return out

    def summary(self) -> dict[str, dict[str, int]]:
        """Op name → {category: count}, in first-seen order."""
        table: dict[str, dict[str, int]] = {}
        for r in self.records:
            row = table.setdefault(r.name, {})
            row[r.category] = row.get(r.category, 0) + 1
        return table


def _float_dtypes(tree) -> list[str]:
    return [str(t.dtype).removeprefix("torch.") for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


# --- memory -----------------------------------------------------------------------------------

# Bytes per parameter for each component, per policy, with AdamW (two moments per parameter).
# "weights" counts every copy that lives through the step: the FP32 master and, where there is one,
# the low-precision working copy (autocast's cast-weight cache lives only through the forward pass,
# so it is listed separately). Activations depend on batch and sequence length, not on N:
# measure them with ``saved_activation_bytes``.
BYTES_PER_PARAMETER: dict[str, dict[str, float]] = {
    "fp32": {"weights": 4, "grads": 4, "optimizer": 8, "autocast_cache": 0},
    "fp16-amp": {"weights": 4, "grads": 4, "optimizer": 8, "autocast_cache": 2},
    "bf16-amp": {"weights": 4, "grads": 4, "optimizer": 8, "autocast_cache": 2},
    "fp16-master": {"weights": 4 + 2, "grads": 2 + 4, "optimizer": 8, "autocast_cache": 0},
    "bf16-master": {"weights": 4 + 2, "grads": 2 + 4, "optimizer": 8, "autocast_cache": 0},
    # mixprec.optim.BF16AdamW keeps FP32 moments (8 bytes); torch.optim.AdamW on BF16 parameters keeps BF16 ones (4)
    "bf16-pure": {"weights": 2, "grads": 2, "optimizer": 8, "autocast_cache": 0},
}


def memory_breakdown(n_params: int, policy: str) -> dict[str, float]:
    """Bytes for weights, gradients, optimizer state and autocast's weight cache, for ``n_params`` parameters."""
    if policy not in BYTES_PER_PARAMETER:
        raise ValueError(f"no memory model for {policy!r}; known: {', '.join(BYTES_PER_PARAMETER)}")
    if n_params < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}")
    return {k: v * n_params for k, v in BYTES_PER_PARAMETER[policy].items()}


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor, policy: str | Policy = "fp32") -> int:
    """Bytes of the tensors autograd saves for the backward pass in one forward pass under ``policy``.

    These saved activations are what the backward needs and what batch size multiplies. Measured
    with ``torch.autograd.graph.saved_tensors_hooks``, so it works on any device; tensors saved
    twice (the same storage) are counted once, and parameters are not counted.
    """
    policy = get_policy(policy)
    device = next(model.parameters()).device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), policy.compute(device):
        logits = model(input_ids.to(device)).logits
        logits.float().logsumexp(-1).mean()  # the loss's own saved tensors: a log-softmax over the vocabulary
    return sum(seen.values())
