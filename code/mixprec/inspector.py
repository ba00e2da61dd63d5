"""The autocast inspector without side effects: the second, autocast-free run of each op happens on meta tensors.

``mixprec.amp.AutocastInspector`` tells autocast's doing from PyTorch's own type promotion by
running each call a second time with autocast disabled. Run on the real tensors, that second call
repeats every side effect: BatchNorm's running statistics are updated twice, in-place ops applied
twice, dropout draws from the random-number generator twice (shifting every later random number).
This version runs the second call on *meta* copies of the tensors (shape and dtype, no data, no
generator), so the reader's model computes exactly what it computes without the inspector.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves, tree_map

from .amp import AutocastInspector as _RecordingInspector
from .amp import OpRecord, _float_dtypes


def _meta(value):
    return value.detach().to("meta") if isinstance(value, torch.Tensor) else value


class AutocastInspector(_RecordingInspector):
    """``mixprec.amp.AutocastInspector``, re-running each call on meta tensors: no op runs twice on real data."""

    # Explicit conversions: autocast never changes what they return, and a device move has no meta twin.
    _CONVERSIONS = {"to", "cpu", "cuda", "type", "type_as", "float", "half", "bfloat16", "double"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        outs = tuple(_float_dtypes(out))
        if name in self._SKIP or not outs:
            return out
        devices = [t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        plain = None
        if name in self._CONVERSIONS:
            plain = outs
        elif devices and not name.endswith("_"):
            try:
                with torch.no_grad(), torch.amp.autocast(device_type=devices[0], enabled=False):
                    plain = tuple(_float_dtypes(func(*tree_map(_meta, args), **tree_map(_meta, kwargs))))
            except Exception:  # mixed dtypes only autocast makes legal, or an op without a meta kernel
                plain = None
        self.records.append(OpRecord(name, tuple(_float_dtypes((args, kwargs))), outs, plain if devices else outs))
        return out
