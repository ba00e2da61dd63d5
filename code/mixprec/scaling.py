"""Loss scaling, written out: static and dynamic scalers with ``torch.amp.GradScaler``'s interface.

A training step with a scaler reads the same whichever scaler it is:

    scaler.scale(loss).backward()   # gradients come out multiplied by the scale
    scaler.unscale_(optimizer)      # divide them back (once per step), note any inf/NaN
    clip_grad_norm_(...)            # optional, on the true gradients
    scaler.step(optimizer)          # skip the update if any gradient was inf or NaN
    scaler.update()                 # adjust the scale (the dynamic scaler only)

The dynamic rule is GradScaler's: after an overflow, multiply the scale by ``backoff_factor`` and
start counting again; after ``growth_interval`` clean steps in a row, multiply it by
``growth_factor``. Scales are float32, like GradScaler's, so the two agree bit for bit.

The experiments that drive a scaler through training (``scaler_trajectory``,
``first_overflowing_scale``) live in ``mixprec.scale_experiments``.
"""

from __future__ import annotations

import math

import torch


class NoLossScaler:
    """No loss scaling, with the scaler interface: as ``torch.amp.GradScaler(enabled=False)``, every
    method passes through, so a training step has one code path with or without scaling."""

    def scale(self, outputs):
        return outputs

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        return optimizer.step(*args, **kwargs)

    def update(self) -> None:
        pass

    def get_scale(self) -> float:
        return 1.0  # what GradScaler(enabled=False).get_scale() returns

    def is_enabled(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return "NoLossScaler()"


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).smallest_normal)


class ScalerStateError(AssertionError, RuntimeError):
    """``step()`` of an optimizer without gradients, or ``update()`` with no inf checks recorded:
    ``GradScaler`` raises an ``AssertionError`` there; this is one, and a ``RuntimeError`` too, like the
    other misuse errors."""


def _number(name: str, value, *, integer: bool = False) -> float | int:
    """``value`` as a real number (bool is not a number here), or a ``TypeError`` naming ``name``."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        if not integer and isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            return float(value)
        expected = "an int" if integer else "a float"
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    return value


def _scale_value(name: str, value) -> float:
    """A loss scale: positive, finite and a normal float32 (what the scale is stored in)."""
    value = float(_number(name, value))
    if not (math.isfinite(value) and FLOAT32_TINY <= value <= FLOAT32_MAX):
        raise ValueError(f"{name} must be a positive finite number representable in float32 "
                         f"({FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}), got {value!r}")
    return value


class StaticLossScaler:
    """A fixed loss scale. Steps with an inf or NaN gradient are still skipped; the scale never changes.

    Misuse is refused as ``torch.amp.GradScaler`` refuses it: unscaling FP16 gradients
    (``ValueError``), ``unscale_()`` twice or after ``step()``, ``step()`` twice before ``update()``
    (``RuntimeError``), ``step()`` of an optimizer none of whose parameters has a gradient, or ``update()``
    with no step or unscale of an optimizer with gradients since the last one (``ScalerStateError``).
    """

    def __init__(self, scale: float = 2.0**16):
        self._scale = torch.tensor(_scale_value("scale", scale), dtype=torch.float32)
        self._unscaled: dict[int, bool] = {}  # optimizer id -> found inf/NaN during unscale_
        self._stepped: set[int] = set()  # optimizers stepped since the last update()

    # --- the GradScaler interface -----------------------------------------------------------
    def scale(self, outputs):
        """``outputs`` (a tensor, or a list or tuple of tensors) times the current scale."""
        if isinstance(outputs, torch.Tensor):
            return outputs * self._scale.to(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise ValueError(f"outputs must be a Tensor or an iterable of Tensors, got {type(outputs).__name__}")

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale, in place, and remember whether any was inf or NaN."""
        if id(optimizer) in self._stepped:
            raise RuntimeError("unscale_() is being called after step().")
        if id(optimizer) in self._unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if any(g.dtype == torch.float16 for g in grads):  # checked first: nothing is divided if any is refused
            raise ValueError("Attempting to unscale FP16 gradients. Keep FP32 parameters (autocast) or FP32 master "
                             "weights and unscale their gradients, as torch.amp.GradScaler requires.")
        inv_scale = self._scale.double().reciprocal().float()  # as GradScaler computes it
        found_inf = False
        for g in grads:
            if not torch.isfinite(g).all():
                found_inf = True
            g.mul_(inv_scale.to(g.device))
        self._unscaled[id(optimizer)] = found_inf if grads else None  # None: nothing was checked

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """``optimizer.step()`` unless an inf or NaN gradient was found; unscales first if not done yet."""
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        if id(optimizer) in self._stepped:
            raise RuntimeError("step() has already been called since the last update().")
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        if self._unscaled[id(optimizer)] is None:  # GradScaler: "No inf checks were recorded for this optimizer."
            raise ScalerStateError("No inf checks were recorded for this optimizer: step() was called while none of its "
                                   "parameters has a gradient (a second step() after train_step or zero_grad(), or a step() before backward()).")
        self._stepped.add(id(optimizer))
        if self._unscaled[id(optimizer)]:
            return None
        return optimizer.step(*args, **kwargs)

    def update(self) -> None:
        """End the step: adjust the scale (if dynamic) from whether any optimizer found inf/NaN."""
        if all(found is None for found in self._unscaled.values()):  # GradScaler: "No inf checks were recorded prior to update."
            raise ScalerStateError("No inf checks were recorded prior to update(): no optimizer with gradients was stepped "
                                   "or unscaled since the last update().")
        found_inf = any(self._unscaled.values())
        self._unscaled.clear()
        self._stepped.clear()
        self._update_scale(found_inf)

    def get_scale(self) -> float:
        return float(self._scale)

    def is_enabled(self) -> bool:
        return True

    def state_dict(self) -> dict:
        return {"scale": self.get_scale()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output, validated: nothing changes unless all of it is valid."""
        self._scale.fill_(self._validated_state(state)["scale"])

    def _validated_state(self, state: dict) -> dict:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        if not state:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled instance of GradScaler.")
        missing = sorted(set(self.state_dict()) - set(state) - {"min_scale"})
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: state is missing {missing} (was it saved from another kind of scaler?)")
        return {**state, "scale": _scale_value("state['scale']", state["scale"])}

    # --- what differs between scalers -----------------------------------------------------------
    def _update_scale(self, found_inf: bool) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.get_scale():g})"


class DynamicLossScaler(StaticLossScaler):
    """GradScaler's dynamic rule (see the module docstring), optionally never going below ``min_scale``."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000,
                 min_scale: float | None = None):
        super().__init__(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval, self.min_scale = self._validated_options(
            growth_factor, backoff_factor, growth_interval, min_scale, float(self._scale))
        self._growth_tracker = 0  # clean steps since the last change

    @staticmethod
    def _validated_options(growth_factor, backoff_factor, growth_interval, min_scale, scale, prefix=""):
        growth_factor = float(_number(prefix + "growth_factor", growth_factor))
        backoff_factor = float(_number(prefix + "backoff_factor", backoff_factor))
        growth_interval = _number(prefix + "growth_interval", growth_interval, integer=True)
        if not (math.isfinite(growth_factor) and 1.0 < growth_factor <= FLOAT32_MAX):
            raise ValueError(f"{prefix}growth_factor must be a finite number > 1, got {growth_factor!r}")
        if not (0.0 < backoff_factor < 1.0) or float(torch.tensor(backoff_factor, dtype=torch.float32)) in (0.0, 1.0):
            raise ValueError(f"{prefix}backoff_factor must be in (0, 1) (and not round to 0 or 1 in float32), got {backoff_factor!r}")
        if growth_interval < 1:
            raise ValueError(f"{prefix}growth_interval must be a positive integer, got {growth_interval!r}")
        if min_scale is not None:
            min_scale = _scale_value(prefix + "min_scale", min_scale)
            if min_scale > scale:
                raise ValueError(f"{prefix}min_scale must be in (0, init_scale={scale:g}], got {min_scale!r}")
        return growth_factor, backoff_factor, growth_interval, min_scale

    def _update_scale(self, found_inf: bool) -> None:
        if found_inf:
            new = self._scale * self.backoff_factor  # float32 arithmetic, like GradScaler
            if self.min_scale is not None:
                new = torch.clamp(new, min=self.min_scale)
            self._scale.copy_(new)
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            new = self._scale * self.growth_factor
            if torch.isfinite(new):
                self._scale.copy_(new)
            self._growth_tracker = 0

    def state_dict(self) -> dict:
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self._growth_tracker, "min_scale": self.min_scale}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output (ours or ``GradScaler``'s), validated: nothing changes unless all of it is valid."""
        state = self._validated_state(state)
        options = self._validated_options(state["growth_factor"], state["backoff_factor"], state["growth_interval"],
                                          state.get("min_scale"), state["scale"], prefix="state: ")
        tracker = _number("state['_growth_tracker']", state["_growth_tracker"], integer=True)
        if not 0 <= tracker < options[2]:
            raise ValueError(f"state['_growth_tracker'] must be in [0, growth_interval={options[2]}), got {tracker}")
        self._scale.fill_(state["scale"])
        self.growth_factor, self.backoff_factor, self.growth_interval, self.min_scale = options
        self._growth_tracker = tracker
