"""Run a model with every operation's result rounded to a chosen format, on any hardware.

``EmulatedPrecision(fmt)`` is a ``TorchDispatchMode``: it sits below autograd, so it sees every
ATen operation of the forward *and* the backward pass, and rounds each floating-point result to
``fmt`` with ``mixprec.formats.round_to_format``. Each operation still computes in float32, then
stores its result in ``fmt``: the same "low-precision storage, FP32 accumulation" that tensor cores
do for FP16, BF16 and FP8 matmuls. So a CPU can show what FP16 or FP8 training does *numerically*
(underflow, overflow, lost bits); it cannot show the speed.

Results that are views of an input (``view``, ``transpose``…) are left alone: they share memory
with something already rounded. Results of in-place operations are rounded in place.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .formats import FloatFormat, get_format, round_to_format


class EmulatedPrecision(TorchDispatchMode):
    """Context manager: inside it, every float32 result of every op is rounded to ``fmt``.

    ``ops`` counts the operations whose results were rounded, by name, for the curious.
    """

    def __init__(self, fmt: str | FloatFormat):
        super().__init__()
        self.fmt = get_format(fmt)
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema_returns = func._schema.returns
        aliased = any(r.alias_info is not None and not r.alias_info.is_write for r in schema_returns)
        if aliased:
            return out
        in_place = any(r.alias_info is not None and r.alias_info.is_write for r in schema_returns)
        rounded_any = False

        def round_tensor(t):
            nonlocal rounded_any
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() == 0:
                return t
            rounded_any = True
            if in_place:
                return t.copy_(round_to_format(t, self.fmt))
            return round_to_format(t, self.fmt)

        out = tree_map(round_tensor, out)
        if rounded_any:
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
        return out
