"""Low precision on any hardware: autocast emulated faithfully, and whole-network rounding.

Two emulations, for two different questions:

* ``EmulatedAutocast(dtype, op_lists="cuda")`` answers "what does automatic mixed precision do
  to my model?" on a machine without fast FP16/BF16 (a CPU). It applies autocast's own rules, op
  by op: ops on autocast's lower-precision list (matmuls, linear, attention) get their inputs
  rounded to the format and their output rounded to it; ops on the FP32 list (softmax, layer_norm,
  losses, sums…) run in FP32; every other op keeps the precision its inputs have (FP16 in → FP16
  out; FP16 mixed with FP32 → FP32, as PyTorch's type promotion does). Tensors keep float32
  storage, so the CPU computes at FP32 speed; only their *values* are those of the format.
  The backward is not run under the emulation, as real autocast's is not: every gradient of a
  tensor that autocast would hold in FP16 is rounded to FP16, as the dtype of a real gradient
  follows the dtype of its tensor. Anything outside the forward pass (the loss scale multiply, the
  optimizer) stays FP32.
* ``RoundAllOps(fmt)`` answers "what if *everything* were FP16?": every floating-point result of
  every op, forward and backward, the loss and the loss-scale multiply included, is rounded to any
  ``mixprec.formats`` format. That is not AMP; it is a pure low-precision network.

Both compute each op in float32 and then round its result, i.e. "low-precision storage, FP32
accumulation", as FP16/BF16 tensor cores do; they show the numerics, never the speed.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .formats import FloatFormat, get_format, round_to_format

# --- autocast's op lists -----------------------------------------------------------------------
# Names as Python sees them (torch.*, torch.nn.functional.*, Tensor methods), which is the level
# ``EmulatedAutocast`` intercepts. From PyTorch's aten/src/ATen/autocast_mode.cpp (torch 2.13); the
# test suite holds them against torch.testing._internal.autocast_test_lists. Composite Python
# functions whose decomposition autocast catches are listed by what they decompose into:
# ``cross_entropy`` (log_softmax + nll_loss), ``softmin`` (softmax), ``normalize`` (norm).

_MATMULS = ("addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "conv1d", "conv2d", "conv3d", "conv_tbc",
            "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "_convolution", "convolution", "linear", "matmul", "__matmul__",
            "__rmatmul__", "mm", "prelu", "scaled_dot_product_attention")
_LOSSES = ("binary_cross_entropy_with_logits", "cosine_embedding_loss", "cross_entropy", "hinge_embedding_loss", "huber_loss", "kl_div",
           "l1_loss", "margin_ranking_loss", "mse_loss", "multi_margin_loss", "multilabel_margin_loss", "nll_loss", "nll_loss2d",
           "poisson_nll_loss", "smooth_l1_loss", "soft_margin_loss", "triplet_margin_loss")

OP_LISTS: dict[str, dict[str, frozenset[str]]] = {
    "cuda": {
        "lower": frozenset(_MATMULS + ("cudnn_convolution", "cudnn_convolution_transpose", "einsum", "mv", "linalg_multi_dot",
                                       "multi_dot", "linalg_vecdot", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")),
        "fp32": frozenset(_LOSSES + ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
                                     "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "rms_norm",
                                     "group_norm", "norm", "frobenius_norm", "nuclear_norm", "normalize", "cosine_similarity", "dist",
                                     "pdist", "cdist", "renorm", "logsumexp", "prod", "softmax", "softmin", "log_softmax", "cumprod",
                                     "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum")),
    },
    "cpu": {
        "lower": frozenset(_MATMULS + ("_native_multi_head_attention", "_addmm_activation")),
        "fp32": frozenset(_LOSSES + ("avg_pool3d", "binary_cross_entropy", "grid_sampler", "polar", "prod", "quantile", "nanquantile",
                                     "stft", "cdist", "trace", "view_as_complex", "cholesky", "cholesky_inverse", "cholesky_solve",
                                     "inverse", "lu_solve", "orgqr", "ormqr", "pinverse", "max_pool3d", "max_unpool2d", "max_unpool3d",
                                     "adaptive_avg_pool3d", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
                                     "replication_pad2d", "replication_pad3d", "ctc_loss", "fractional_max_pool2d",
                                     "fractional_max_pool3d", "adaptive_max_pool3d", "qr", "svd", "triangular_solve", "geqrf")),
    },
}

# Ops that only move or select values: their result holds the same precision as their input, and
# needs no rounding (rounding would also break aliasing for the views among them).
_MOVES = frozenset(("view", "reshape", "transpose", "permute", "split", "split_with_sizes", "chunk", "unbind", "squeeze", "unsqueeze",
                    "expand", "expand_as", "contiguous", "__getitem__", "narrow", "select", "flatten", "unflatten", "t", "view_as",
                    "reshape_as", "clone", "detach", "cat", "concat", "concatenate", "stack", "repeat", "flip", "roll", "movedim",
                    "tensor_split", "index_select", "gather", "masked_select", "take", "tril", "triu", "relu", "max", "min",
                    "amax", "amin", "abs", "neg", "__neg__", "pad"))
# Normalisations whose output takes the dtype of their input, whatever their (FP32) weight and bias:
# they do not follow type promotion. (On CUDA's lists they run in FP32 anyway.)
_FOLLOW_INPUT = frozenset(("layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm"))
_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
_IGNORED = frozenset(("__get__", "__set__", "size", "dim", "numel", "is_floating_point", "__len__", "__bool__", "item", "tolist",
                      "data_ptr", "stride", "is_contiguous", "element_size", "__repr__", "__format__", "backward", "requires_grad_"))

_NATIVE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def round_values(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``x`` rounded to ``fmt``, kept in x's dtype; torch's own cast where one exists (exact, and fast)."""
    dtype = _NATIVE.get(fmt.name)
    return x.to(dtype).to(x.dtype) if dtype is not None else round_to_format(x, fmt)


class _Round(torch.autograd.Function):
    """Rounds values to a format; the gradient that flows back is rounded to the same format, as the
    gradient of a real FP16 tensor is an FP16 tensor."""

    @staticmethod
    def forward(ctx, x, fmt):
        ctx.fmt = fmt
        return round_values(x, fmt)

    @staticmethod
    def backward(ctx, grad):
        return round_values(grad, ctx.fmt), None


def _upcast(t):
    """A real FP16/BF16 tensor as float32 (exact); anything else unchanged."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t


def held_in(t: torch.Tensor) -> torch.dtype:
    """The dtype a tensor would have under the autocast that ``EmulatedAutocast`` emulates."""
    return getattr(t, "_mixprec_held_in", t.dtype)


class EmulatedAutocast(TorchFunctionMode):
    """Context manager: ``torch.amp.autocast``'s numerics on any device, with float32 storage.

    ``dtype``: ``torch.float16`` or ``torch.bfloat16`` (or the names ``"fp16"``, ``"bf16"``).
    ``op_lists``: whose rules to follow, ``"cuda"`` (what readers' GPUs do; the default) or ``"cpu"``.
    ``held_in(t)`` tells what dtype a tensor would have under real autocast; ``counts`` how many
    results were lowered, kept in FP32 by the list, or rounded because their inputs were low.
    """

    def __init__(self, dtype: torch.dtype | str = torch.float16, op_lists: str = "cuda"):
        super().__init__()
        names = {"fp16": torch.float16, "bf16": torch.bfloat16, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"EmulatedAutocast emulates float16 or bfloat16 autocast: dtype must be torch.float16, torch.bfloat16, "
                             f"'fp16' or 'bf16', got {dtype!r}")
        if op_lists not in OP_LISTS:
            raise ValueError(f"op_lists must be one of {sorted(OP_LISTS)}, got {op_lists!r}")
        self.dtype = names[dtype]
        self.fmt = get_format("fp16" if self.dtype == torch.float16 else "bf16")
        self.op_lists = op_lists
        self.lower, self.fp32 = OP_LISTS[op_lists]["lower"], OP_LISTS[op_lists]["fp32"]
        self.counts = {"lowered": 0, "fp32": 0, "low": 0}
        self._cache: dict[int, torch.Tensor] = {}  # like autocast's cache of cast weights, for one region

    def __exit__(self, *exc):
        self._cache.clear()
        return super().__exit__(*exc)

    def _is_low(self, t) -> bool:
        return isinstance(t, torch.Tensor) and held_in(t) == self.dtype

    def _mark(self, t: torch.Tensor) -> torch.Tensor:
        t._mixprec_held_in = self.dtype
        return t

    def _lower(self, t):
        """An input of a lower-list op: cast to the low format (cached for weights, as autocast does)."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64 or self._is_low(t):
            return _upcast(t)
        cacheable = t.is_leaf and t.requires_grad and torch.is_grad_enabled()
        if cacheable and id(t) in self._cache:
            return self._cache[id(t)]
        low = self._mark(_Round.apply(t, self.fmt))
        if cacheable:
            self._cache[id(t)] = low
        return low

    def _round_out(self, t):
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
            return self._mark(_Round.apply(t, self.fmt))
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _IGNORED:
            return func(*args, **kwargs)
        if name in self.lower:
            self.counts["lowered"] += 1
            args, kwargs = tree_map(self._lower, (args, kwargs))
            return tree_map(self._round_out, func(*args, **kwargs))
        if name in self.fp32:
            self.counts["fp32"] += 1
            args, kwargs = tree_map(_upcast, (args, kwargs))
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        cast = _CASTS.get(name) or (name == "to" and next((a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.dtype)), None))
        if cast:  # an explicit cast ends the low precision: x.float() under autocast is FP32
            if cast == torch.float32 and isinstance(out, torch.Tensor) and out is args[0]:
                return out.view_as(out)  # a distinct tensor object, so the input keeps its own dtype
            return out
        if name in _FOLLOW_INPUT:
            return tree_map(self._round_out, out) if args and self._is_low(args[0]) else out
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not tensors or not any(self._is_low(t) or t.dtype == self.dtype for t in tensors):
            return out
        ranked = [t for t in tensors if t.dim() > 0] or tensors  # 0-dim tensors do not decide the dtype, as in type promotion
        if not all(self._is_low(t) or t.dtype == self.dtype for t in ranked):
            return out  # low mixed with FP32: promoted to FP32
        if name in _MOVES:
            return tree_map(lambda t: self._mark(t) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t, out)
        if name.endswith("_") and not name.startswith("__") and isinstance(out, torch.Tensor):  # in place on a low tensor
            with torch.no_grad():
                out.data.copy_(round_values(out.data, self.fmt))
            return out
        self.counts["low"] += 1
        return tree_map(self._round_out, out)


class RoundAllOps(TorchDispatchMode):
    """Context manager: inside it, every float32 result of every op is rounded to ``fmt``.

    A ``TorchDispatchMode`` sits below autograd, so it sees every ATen operation of the forward
    *and* the backward pass, the loss and the loss-scale multiply included. Results that are views
    of an input (``view``, ``transpose``…) are left alone: they share memory with something already
    rounded; results of in-place operations are rounded in place. ``ops`` counts the rounded
    operations by name.
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
