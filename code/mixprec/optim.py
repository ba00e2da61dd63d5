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

``state_dict()`` holds everything a run needs to resume bit for bit: the FP32 moments (in FP32;
``torch.optim.Optimizer.load_state_dict`` alone would cast them to the parameters' BF16), the Kahan
compensation buffers, and the state of the stochastic-rounding generators.
"""

from __future__ import annotations

import math
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
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in (lr, eps, weight_decay))
        if not finite or not all(0 <= b < 1 for b in betas):  # NaN fails every comparison: test for what is valid
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

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["bf16adamw"] = {"rounding": self.rounding, "seed": self.seed,
                              "generators": {str(device): g.get_state() for device, g in self._generators.items()}}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``'s output exactly: moments stay FP32, Kahan buffers BF16, generators resume."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError("state_dict must be the dict returned by BF16AdamW.state_dict()")
        state_dict = dict(state_dict)
        extra = state_dict.pop("bf16adamw", None)
        if extra is None:
            raise ValueError("this state_dict was not saved by BF16AdamW (no 'bf16adamw' entry): its rounding state is unknown")
        if extra.get("rounding") != self.rounding:
            raise ValueError(f"state_dict was saved with rounding={extra.get('rounding')!r}, this optimizer uses rounding={self.rounding!r}")
        saved = state_dict["state"]
        super().load_state_dict(state_dict)  # groups and steps; its tensors are cast to BF16 and replaced below
        params = [p for group in self.param_groups for p in group["params"]]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        expected = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "compensation": torch.bfloat16}
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            for key, dtype in expected.items():
                if key == "compensation" and self.rounding != "kahan":
                    continue
                value = saved[i].get(key)
                if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.shape != p.shape:
                    raise ValueError(f"state of parameter {i}: {key!r} must be a {dtype} tensor of shape {tuple(p.shape)}, "
                                     f"got {value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
                self.state[p][key] = value.to(p.device, copy=True)
        self.seed = extra["seed"]
        self._generators = {}
        for device, generator_state in extra.get("generators", {}).items():
            self._generator(torch.device(device)).set_state(generator_state)

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

