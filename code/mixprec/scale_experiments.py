"""Loss-scale experiments: drive a scaler through training, and measure the largest scale a model survives.

The scalers themselves are in ``mixprec.scaling``; these experiments run them through the one
training step (``mixprec.step``) under a precision policy (``mixprec.amp``).
"""

from __future__ import annotations

import torch

from .amp import get_policy
from .step import forward_backward, train_step


def scaler_trajectory(scaler, steps: int = 300, poison: dict[int, float] | None = None, seed: int = 0) -> tuple[list[tuple[float, bool]], torch.nn.Module]:
    """Drive ``scaler`` through ``steps`` steps of training a small fixed model; returns ``[(scale, stepped), ...]`` and the model.

    ``poison`` maps step numbers to a value (inf or NaN) planted in one gradient at that step, as an
    overflow would. Two scalers that behave alike give equal trajectories and bit-identical models.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    setup = get_policy("fp32").setup(model, lr=1e-2, betas=(0.9, 0.999), loss_fn=lambda out, _: out.pow(2).mean(), scaler=scaler,
                                     device="cpu")
    log = []
    for step in range(steps):
        x = torch.randn(8, 6, generator=generator)

        def plant(m, step=step):
            if poison and step in poison:
                m[0].weight.grad[0, 0] = poison[step]

        result = train_step(setup, x, None, after_backward=plant)
        log.append((result.loss_scale, not result.skipped))
    return log, model


def first_overflowing_scale(model: torch.nn.Module, inputs, targets, loss_fn, precision="fp16-amp", exponents=range(0, 41),
                            device: torch.device | str | None = None) -> int | None:
    """The smallest ``e`` in ``exponents`` for which a loss scale of 2**e makes some gradient inf or NaN.

    Measured, not predicted: one forward and backward per scale, under ``precision`` (a policy name or
    a ``mixprec.amp.Policy``), exactly as ``mixprec.step.train_step`` runs them, on ``device`` (default:
    the model's; the batch is moved there). None if no scale in ``exponents`` overflows. The model's
    weights are not changed; its gradients are cleared.
    """
    policy = get_policy(precision)
    for e in exponents:
        model.zero_grad(set_to_none=True)
        forward_backward(model, inputs, targets, loss_fn, policy, device, lambda loss, e=e: loss * 2.0**e)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        if not finite:
            return e
    return None
