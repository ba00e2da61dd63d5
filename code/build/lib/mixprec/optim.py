"""AdamW for weights stored in BF16, with three ways to write the update back.

With BF16 weights an update smaller than half a unit in the last place (ULP) of the weight is
rounded away: ``w + Δw == w``. BF16 has 8 significant bits, so a weight of 1.0 ignores any
update below 2**-8 ≈ 0.0039 in size. Two fixes keep BF16 storage and still let small updates count:

* ``"stochastic"``: round ``w + Δw`` up or down at random, with the probabilities that make the
  expected result exact, so small updates survive on average;
* ``"kahan"``: keep the rounding error of each write in a BF16 compensation buffer and add it
  back next step (Kahan summation applied to the weights).

``"nearest"`` is plain round-to-nearest, what ``torch.optim.AdamW`` does on BF16 parameters.
The moments are kept in FP32 in all three, so that the weight update is the only difference.
"""

from __future__ import annotations

from typing import Literal

import torch

from .formats import BF16, round_to_format

UpdateRounding = Literal["nearest", "stochastic", "kahan"]


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) for BF16 parameters; see the module docstring for ``rounding``."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rounding: UpdateRounding = "nearest", seed: int = 0):
        if rounding not in ("nearest", "stochastic", "kahan"):
            raise ValueError(f"rounding must be 'nearest', 'stochastic' or 'kahan', got {rounding!r}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rounding = rounding
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"BF16AdamW expects bfloat16 parameters, got {p.dtype}")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if self.rounding == "kahan":
                        state["compensation"] = torch.zeros_like(p)  # bf16, like the weights
                state["step"] += 1
                g = p.grad.float()
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1 = 1 - beta1 ** state["step"]
                bias2 = 1 - beta2 ** state["step"]
                w = p.float()
                denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
                update = -group["lr"] * (state["exp_avg"] / bias1 / denom + group["weight_decay"] * w)
                self._write(p, w, update, state)
        return loss

    def _write(self, p: torch.Tensor, w: torch.Tensor, update: torch.Tensor, state: dict) -> None:
        """p ← w + update, rounded to BF16 the chosen way."""
        if self.rounding == "nearest":
            p.copy_(w + update)
        elif self.rounding == "stochastic":
            p.copy_(round_to_format(w + update, BF16, rounding="stochastic", generator=self._generator(p.device)))
        else:  # Kahan: y is the update plus what earlier writes lost; keep what this write loses
            y = update - state["compensation"].float()
            new = (w + y).to(torch.bfloat16)
            state["compensation"].copy_((new.float() - w) - y)
            p.copy_(new)

