"""Summing many numbers in a low-precision accumulator: plain, and Kahan-compensated."""

from __future__ import annotations

from typing import Literal

import torch

Method = Literal["naive", "kahan"]


def running_sum(values: torch.Tensor, dtype: torch.dtype, method: Method = "naive") -> torch.Tensor:
    """Partial sums of ``values`` along dim 0 with the accumulator kept in ``dtype``; returned as float64.

    ``values`` may have extra dimensions: each column is an independent sum, all advanced together.
    ``"kahan"`` carries the rounding error of every addition in a second variable (the compensation)
    and feeds it back into the next one (Kahan 1965), so the sum stays accurate in a short format.
    """
    if method not in ("naive", "kahan"):
        raise ValueError(f"method must be 'naive' or 'kahan', got {method!r}")
    if not values.is_floating_point() or values.dim() == 0:
        raise ValueError("values must be a floating-point tensor with at least one dimension")
    v = values.to(dtype)
    total = torch.zeros(v.shape[1:], dtype=dtype)
    compensation = torch.zeros_like(total)
    partial = torch.empty(v.shape, dtype=torch.float64)
    for i in range(v.shape[0]):
        if method == "naive":
            total = total + v[i]
        else:
            y = v[i] - compensation
            t = total + y
            compensation = (t - total) - y  # what the addition just lost, in the same precision
            total = t
        partial[i] = total.double()
    return partial


def kahan_sum(values: torch.Tensor, dtype: torch.dtype) -> float:
    """Kahan-compensated sum of a 1-D tensor with a ``dtype`` accumulator."""
    return float(running_sum(values, dtype, "kahan")[-1])
