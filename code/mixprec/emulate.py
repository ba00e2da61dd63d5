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
  optimizer) stays FP32. With CPU's lists it is tested against CPU's own FP16 and BF16 autocast on the
  storyteller, Llama, BERT, T5 and torch's ``nn`` layers (tests/test_emulate.py); what it cannot
  emulate it names in a warning (see the class).
* ``RoundAllOps(fmt)`` answers "what if *everything* were FP16?": every floating-point result of
  every op, forward and backward, the loss and the loss-scale multiply included, is rounded to any
  ``mixprec.formats`` format. That is not AMP; it is a pure low-precision network.

Both compute each op in float32 and then round its result, i.e. "low-precision storage, FP32
accumulation", as FP16/BF16 tensor cores do; they show the numerics, never the speed.
"""

from __future__ import annotations

import types as types_
import warnings

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
                                     "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__",
                                     "__rtruediv__", "__rdiv__", "softplus", "layer_norm", "rms_norm",
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

# The entries of CUDA's lists that PyTorch's own autocast test lists (torch.testing._internal.autocast_test_lists) do not
# exercise, and why they are here; the tests hold both directions: test lists ⊆ OP_LISTS["cuda"], and the rest is this.
NOT_IN_PYTORCH_TEST_LISTS: dict[str, str] = {
    "__rmatmul__": "b @ a with a Tensor on the right: dispatches to matmul",
    "multi_dot": "the Python name of linalg_multi_dot",
    "scaled_dot_product_attention": "on CUDA's lower-precision list in autocast_mode.cpp; the test lists predate it",
    "__rdiv__": "AMP op reference, 'CUDA Ops that can autocast to float32': dispatches to reciprocal",
    "__rtruediv__": "AMP op reference, 'CUDA Ops that can autocast to float32': dispatches to reciprocal",
    "__rpow__": "AMP op reference, 'CUDA Ops that can autocast to float32': dispatches to pow",
    "cross_entropy": "a Python composite: log_softmax and nll_loss, both on the FP32 list",
    "softmin": "a Python composite: softmax of the negated input",
    "normalize": "a Python composite: norm, on the FP32 list",
    "huber_loss": "on CUDA's FP32 list in autocast_mode.cpp, not in the test lists",
    "frobenius_norm": "on CUDA's FP32 list in autocast_mode.cpp (a norm), not in the test lists",
    "nuclear_norm": "on CUDA's FP32 list in autocast_mode.cpp (a norm), not in the test lists",
    "linalg_vector_norm": "on CUDA's FP32 list in autocast_mode.cpp (a norm), not in the test lists",
    "linalg_matrix_norm": "on CUDA's FP32 list in autocast_mode.cpp (a norm), not in the test lists",
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


def _autocast_nesting() -> int:
    """How many ``torch.autocast`` regions (enabled or not) are open: torch has no getter, so count up and back."""
    level = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return level


def _no_torch_function(*args, **kwargs) -> bool:
    return False


_PATCHED: dict = {}  # Python composite → its copy whose globals say no mode is on (see EmulatedAutocast._enter_composite)


# In-place operators whose name does not end in "_": like ``add_``, they write into their first argument.
_IN_PLACE_DUNDERS = frozenset(("__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ifloordiv__", "__imod__",
                               "__ipow__", "__setitem__"))
# What autocast's lists are called below autograd, where the composite ops that the emulation cannot
# enter (C++ functions such as ``einsum`` or ``lstm``) show the ops they are made of.
_ATEN_NAMES = {"convolution": "conv2d", "_scaled_dot_product_flash_attention_for_cpu": "scaled_dot_product_attention",
               "_softmax": "softmax", "_log_softmax": "log_softmax", "native_layer_norm": "layer_norm",
               "native_group_norm": "group_norm", "nll_loss_forward": "nll_loss", "mkldnn_rnn_layer": "mkldnn_rnn_layer",
               "_fused_rms_norm": "rms_norm"}
# Recurrent layers: autocast lowers them (CUDA through cuDNN's RNN, CPU through oneDNN's ``mkldnn_rnn_layer``), and
# the low-precision kernel rounds the hidden state at every time step, which rounding only the layer's result cannot
# reproduce: the emulation runs them in FP32, says so, and reports their result as FP32.
_RECURRENT = frozenset(("lstm", "gru", "rnn_tanh", "rnn_relu", "mkldnn_rnn_layer"))


class _SeeInside(TorchDispatchMode):
    """Below autograd, watches a C++ composite run: notes any op it is made of that autocast's lists name."""

    def __init__(self, listed: frozenset[str], outer: str):
        super().__init__()
        self.listed, self.outer, self.found = listed, outer, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.found is None and name != self.outer and _ATEN_NAMES.get(name, name) in self.listed:
            self.found = name
        return func(*args, **(kwargs or {}))


class EmulatedAutocast(TorchFunctionMode):
    """Context manager: ``torch.amp.autocast``'s numerics on any device, with float32 storage.

    ``dtype``: ``torch.float16`` or ``torch.bfloat16`` (or the names ``"fp16"``, ``"bf16"``).
    ``op_lists``: whose rules to follow, ``"cuda"`` (what readers' GPUs do; the default) or ``"cpu"``.
    ``held_in(t)`` tells what dtype a tensor would have under real autocast; ``counts`` how many
    results were lowered, kept in FP32 by the list, or rounded because their inputs were low.

    It intercepts calls at the Python level (``__torch_function__``), above autograd, as autocast
    itself sits above autograd; Python composites (``F.multi_head_attention_forward``,
    ``Tensor.__rtruediv__``…) are entered, so the ops they call are seen one by one. A C++ composite
    that is not on a list cannot be entered: if it turns out to contain a listed op (``einsum`` on
    CPU's lists, ``lstm``), it ran in FP32, and the emulation warns by name and reports its result
    as FP32 (``opaque`` lists them). Regions nest as autocast's do: the innermost wins, and a
    ``torch.autocast(..., enabled=False)`` block inside stops the lists (as Hugging Face models use it
    to force FP32), while a real ``torch.autocast`` opened inside takes over.
    """

    _active: list[EmulatedAutocast] = []  # the emulations entered and not left, innermost last

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
        self.opaque: dict[str, str] = {}  # C++ composite → the listed op found inside it (it ran in FP32)
        self._cache: dict[int, torch.Tensor] = {}  # like autocast's cache of cast weights, for one region
        self._entering: set = set()

    def __enter__(self):
        # the innermost region wins: a real autocast around this one is switched off inside it
        self._real_off = [torch.amp.autocast(d, enabled=False) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        for region in self._real_off:
            region.__enter__()
        self._nesting = _autocast_nesting()
        self._fast_path_hook = (torch.nn.modules.module.register_module_forward_pre_hook(self._fused_path_warning)
                                if self.op_lists == "cpu" else None)
        EmulatedAutocast._active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        EmulatedAutocast._active.remove(self)
        if self._fast_path_hook is not None:
            self._fast_path_hook.remove()
        for region in reversed(self._real_off):
            region.__exit__(*exc)
        self._cache.clear()

    def _fused_path_warning(self, module, args):
        """CPU autocast leaves torch's fused inference path of ``nn.TransformerEncoderLayer`` on (only CUDA's autocast
        turns it off); the emulation, as any ``__torch_function__`` mode, makes torch take the unfused path. The fused
        kernel adds the residual in place into the low-precision attention output, so its result is held in low
        precision where the unfused path's is FP32: say so, by name."""
        if isinstance(module, torch.nn.TransformerEncoderLayer) and not module.training and self._state() == "on":
            self._opaque("TransformerEncoderLayer", "_transformer_encoder_layer_fwd", None,
                         why="in eval mode CPU autocast may take torch's fused path, which holds its result in low "
                             "precision; the emulation takes the unfused path (FP32 residual stream)")

    def _state(self) -> str:
        """``"on"``; ``"lists off"`` inside ``autocast(enabled=False)``; ``"off"`` under an inner emulation or real autocast."""
        if not EmulatedAutocast._active or EmulatedAutocast._active[-1] is not self:
            return "off"
        if _autocast_nesting() == self._nesting:
            return "on"
        return "off" if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda") else "lists off"

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

    def _enter_composite(self, func, args, kwargs):
        """Run a Python composite with the emulation on, so the ops it calls are intercepted one by one.

        Its body starts with "if a mode is on, hand me to the mode"; a copy of it whose globals answer
        no runs the body itself. If the copy still hands itself over (the check lives elsewhere), the
        second arrival runs it as one opaque call."""
        code = getattr(func, "__code__", None)
        if code is None:
            return None
        patched = _PATCHED.get(func)
        if patched is None:
            names = dict(func.__globals__, has_torch_function=_no_torch_function, has_torch_function_unary=_no_torch_function,
                         has_torch_function_variadic=_no_torch_function)
            patched = type(func)(code, names, func.__name__, func.__defaults__, func.__closure__)
            patched.__kwdefaults__ = func.__kwdefaults__
            _PATCHED[func] = patched
        self._entering.add(func)
        torch.overrides._push_mode(self)
        try:
            return (patched(*args, **kwargs),)
        finally:
            torch.overrides._pop_mode()
            self._entering.discard(func)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        state = self._state()
        if state == "off" or name in _IGNORED:
            return func(*args, **kwargs)
        if state == "on" and name in self.lower:
            self.counts["lowered"] += 1
            args, kwargs = tree_map(self._lower, (args, kwargs))
            return tree_map(self._round_out, func(*args, **kwargs))
        if state == "on" and name in self.fp32:
            self.counts["fp32"] += 1
            args, kwargs = tree_map(_upcast, (args, kwargs))
            return func(*args, **kwargs)
        if name in _RECURRENT:
            return self._opaque(name, name, func(*args, **kwargs))
        entered = None
        if isinstance(func, types_.FunctionType) and func not in self._entering and name not in _CASTS and name not in _MOVES:
            entered = self._enter_composite(func, args, kwargs)
        if entered is not None:
            return entered[0]
        if state == "on" and name not in _MOVES and name not in _CASTS and name != "to" and not isinstance(func, types_.FunctionType):
            watcher = _SeeInside(self.lower | self.fp32 | _RECURRENT, name)
            with watcher:
                out = func(*args, **kwargs)
            if watcher.found is not None:
                return self._opaque(name, watcher.found, out)
        else:
            out = func(*args, **kwargs)
        return self._follow(name, args, kwargs, out)

    def _opaque(self, name: str, inside: str, out, why: str = ""):
        if name not in self.opaque:
            self.opaque[name] = inside
            why = why or (f"autocast would run {inside!r} inside it in {'FP32' if inside in self.fp32 else 'low precision'}; "
                          "it ran in FP32 and its result is reported as FP32")
            warnings.warn(f"EmulatedAutocast cannot emulate {name!r}: {why}", stacklevel=4)
        return tree_map(lambda t: t.view_as(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)

    def _follow(self, name, args, kwargs, out):
        """An op on no list: an explicit cast decides; otherwise the precision of its inputs, as type promotion does."""
        cast = _CASTS.get(name) or (name == "to" and next((a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.dtype)), None))
        like = args[1] if name in ("type_as", "to") and len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        if like is not None and isinstance(out, torch.Tensor) and out.is_floating_point():  # x.type_as(h): the dtype h is held in
            cast = held_in(like)
            if self._is_low(like) and out.dtype == torch.float32:
                return self._round_out(out if out is not args[0] else out.view_as(out))
        if cast:  # an explicit cast ends the low precision: x.float() under autocast is FP32
            if cast == torch.float32 and isinstance(out, torch.Tensor) and out is args[0]:
                return out.view_as(out)  # a distinct tensor object, so the input keeps its own dtype
            return out
        if (name.endswith("_") and not name.startswith("__")) or name in _IN_PLACE_DUNDERS:
            target = args[0] if args else None
            if self._is_low(target) and target.dtype == torch.float32:  # written into a low tensor: stored in its format
                with torch.no_grad():
                    target.data.copy_(round_values(target.data, self.fmt))
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
