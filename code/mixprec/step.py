"""One mixed-precision training step, the same for every policy, and the history every trainer keeps.

``train_step`` is the whole recipe; the story trainer, the debugging clinic, the benchmarks and the
loss-scaler trajectory all call it, with the ``TrainingSetup`` that ``Policy.setup`` builds. The
policy (``mixprec.amp.Policy``) decides every precision question; the step only keeps the order
that mixed precision needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._pytree import tree_map

from .amp import TrainingSetup, get_policy


@dataclass(frozen=True)
class StepResult:
    """What one step did: its loss, the gradient norm (unscaled, before clipping), the loss scale it
    used (None without scaling), whether the update was skipped, and the learning rate."""

    loss: float
    grad_norm: float
    loss_scale: float | None
    skipped: bool
    lr: float


def forward_backward(model: torch.nn.Module, inputs, targets, loss_fn: Callable, precision="fp32", device: torch.device | str | None = None,
                     scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The forward under the policy's autocast, the loss in FP32 and the backward of ``scale(loss)`` outside
    autocast; returns the (unscaled) loss. ``train_step`` is this plus the optimizer's side.

    ``precision``: a policy name or ``mixprec.amp.Policy``. ``device``: default the model's; the inputs
    and targets (tensors, or tuples and dicts of them) are moved there.
    """
    policy = get_policy(precision)
    device = torch.device(device) if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs, targets = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, (inputs, targets))
    with policy.whole_step(device):  # TF32 and whole-network rounding, where the policy has them
        with policy.forward(device):  # autocast, native or emulated, covers the forward pass only
            output = model(inputs)
        loss = loss_fn(output, targets)  # in FP32: the loss functions upcast what they are given
        (loss if scale is None else scale(loss)).backward()  # outside autocast, as PyTorch recommends
    return loss


def train_step(setup: TrainingSetup, inputs, targets, after_backward: Callable[[torch.nn.Module], None] | None = None) -> StepResult:
    """One optimizer step of ``setup.model`` on one batch; ``setup`` comes from ``Policy.setup`` (see ``mixprec.amp``).

    The scaler has ``torch.amp.GradScaler``'s interface; a disabled one (``NoLossScaler``) makes this
    plain training. The schedule advances only when the optimizer really stepped.
    ``after_backward(model)`` runs between backward and unscaling (to plant a fault, say).
    An empty batch is refused: its loss is NaN and the step would still count.
    """
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0 and inputs.shape[0] == 0:
        raise ValueError(f"train_step needs at least one example; got an empty batch (inputs of shape {tuple(inputs.shape)})")
    loss = forward_backward(setup.forward, inputs, targets, setup.loss_fn, setup.policy, setup.device, setup.scaler.scale)
    if after_backward is not None:
        after_backward(setup.model)
    if setup.master is not None:
        setup.master.grads_to_master()  # low-precision gradients into the FP32 masters
    setup.scaler.unscale_(setup.optimizer)  # the true gradients, before clipping, so the threshold means what it says
    params = [p for group in setup.optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, setup.clip if setup.clip is not None else math.inf))
    enabled = getattr(setup.scaler, "is_enabled", lambda: True)()  # a reader's own scaler may not have is_enabled
    scale = setup.scaler.get_scale() if enabled else None
    skipped = enabled and not math.isfinite(grad_norm)
    lr = setup.optimizer.param_groups[0]["lr"]
    setup.scaler.step(setup.optimizer)  # skipped when a gradient is inf or NaN
    setup.scaler.update()
    if setup.schedule is not None and not skipped:
        setup.schedule.step()  # a skipped step must not eat into the warm-up or the decay
    setup.optimizer.zero_grad(set_to_none=True)
    if setup.master is not None:
        setup.master.to_working()
    return StepResult(loss.item(), grad_norm, scale, skipped, lr)


@dataclass
class TrainHistory:
    """Everything a training run measured, one entry per step (and per evaluation)."""

    precision: str
    device: str = ""
    parameters: int = 0
    tokens_per_step: int = 0
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)  # before clipping, after unscaling
    loss_scale: list[float | None] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)  # seconds
    tokens_per_s: list[float] = field(default_factory=list)
    peak_memory: list[int | None] = field(default_factory=list)  # bytes, GPU only
    mfu: list[float | None] = field(default_factory=list)  # model FLOPs utilisation, GPU only
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    zero_grad_fraction: list[float] = field(default_factory=list)  # per step, where recorded: gradient values exactly 0 before unscaling

    def append(self, result: StepResult, step_time: float = float("nan"), peak_memory: int | None = None,
               mfu: float | None = None) -> None:
        """Record one step's result (and, where measured, its time, memory and MFU)."""
        self.step.append(len(self.step))
        self.loss.append(result.loss)
        self.grad_norm.append(result.grad_norm)
        self.loss_scale.append(result.loss_scale)
        self.skipped.append(result.skipped)
        self.lr.append(result.lr)
        self.step_time.append(step_time)
        self.tokens_per_s.append(self.tokens_per_step / step_time if step_time > 0 else float("nan"))
        self.peak_memory.append(peak_memory)
        self.mfu.append(mfu)

    @property
    def final_val_loss(self) -> float | None:
        return self.val_loss[-1] if self.val_loss else None

    @property
    def skipped_fraction(self) -> float:
        return sum(self.skipped) / max(1, len(self.skipped))

    def median_tokens_per_s(self, skip_first: int = 2) -> float:
        """Median throughput, leaving out the first steps (warm-up, compilation)."""
        rates = self.tokens_per_s[skip_first:] or self.tokens_per_s
        return sorted(rates)[len(rates) // 2]

    def as_dict(self) -> dict:
        return asdict(self)
