"""Find where the numbers go wrong: the first non-finite op, per-layer statistics, monitors, plots.

``trace_nonfinite(model, step)`` runs one forward/backward and names the first operation whose
result holds an inf or a NaN: which module, which ATen op, and whether it was the forward or the
backward pass. It is a ``TorchDispatchMode``, so it sees every op of both passes, and it tags each
autograd node with the module that created it during the forward; in the backward,
``torch._C._current_autograd_node()`` says which node is running, hence which module's backward.

``tensor_stats`` and ``LayerMonitor`` describe tensors by what a low-precision format would do to
them: the fraction above its max, below its smallest normal number, and flushed to zero.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .formats import FloatFormat, get_format, zone_edges, zone_fractions

OUTSIDE = "(模型之外)"  # ops run outside every module of the model, e.g. the loss
_MODULE_TAG = "mixprec_module"


# --- the first non-finite op ----------------------------------------------------------------------

@dataclass(frozen=True)
class NonFinite:
    """Where the first inf or NaN appeared."""

    phase: Literal["forward", "backward"]
    module: str  # qualified name in the model ("" is the model itself); OUTSIDE for ops outside it
    op: str  # ATen op, e.g. "exp", "div", "_softmax"
    kind: Literal["inf", "nan", "inf+nan"]
    inputs_finite: bool  # False: a non-finite value came in (an input or a parameter), this op only passed it on
    backward_node: str | None  # the autograd node running, in the backward pass (e.g. "SoftmaxBackward0")
    op_index: int  # how many ops ran before it in this trace
    shape: tuple[int, ...]
    dtype: str  # the dtype the result is held in
    # The cast that stored the op's finite result in a narrower format and made it non-finite: ``_to_copy`` for
    # autocast's own casts and for ``EmulatedAutocast``'s rounding (which computes in FP32 and then rounds). The
    # fields above then describe the op whose result did not fit, as a real FP16 kernel would have produced the inf.
    rounded_by: str | None = None

    def __str__(self) -> str:
        where = "前向" if self.phase == "forward" else f"反向（{self.backward_node}）"
        module = self.module if self.module != "" else "(整个模型)"
        source = "" if self.inputs_finite else "；它的输入已经不是有限值"
        return f"{where}：模块 {module} 的 {self.op} 第一个产生了 {self.kind}（第 {self.op_index} 个运算，{self.dtype}{list(self.shape)}）{source}"


def _nonfinite_kind(tensors: list[torch.Tensor]) -> str | None:
    has_inf = any(bool(torch.isinf(t).any()) for t in tensors)
    has_nan = any(bool(torch.isnan(t).any()) for t in tensors)
    if has_inf and has_nan:
        return "inf+nan"
    return "inf" if has_inf else ("nan" if has_nan else None)


def _float_tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _TagNodes(TorchFunctionMode):
    """In the forward, write the running module's name into each new autograd node's metadata."""

    def __init__(self, current_module: Callable[[], str]):
        super().__init__()
        self.current_module = current_module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        module = self.current_module()
        # A composite function (cross_entropy = log_softmax + nll_loss) makes several nodes: walk back
        # from its output and tag every node not tagged yet; older nodes are tagged already.
        todo = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or _MODULE_TAG in node.metadata:
                continue
            node.metadata[_MODULE_TAG] = module
            todo.extend(next_node for next_node, _ in node.next_functions)
        return out


class _FirstNonFinite(TorchDispatchMode):
    """Checks every op's result; remembers which op produced each storage, so that when a cast to a narrower format
    is what turns a finite result into an inf, the op whose result did not fit is reported, not the cast."""

    _CASTS = frozenset(("_to_copy", "to", "copy_", "_to_dtype"))

    def __init__(self, current_module: Callable[[], str]):
        super().__init__()
        self.current_module = current_module
        self.found: NonFinite | None = None
        self.count = 0
        self.producers: dict[int, tuple] = {}  # storage address → (phase, module, op, node, index, shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += 1
        if self.found is not None:
            return out
        name = func.overloadpacket.__name__
        node = torch._C._current_autograd_node()
        phase, module, node_name = ("forward", self.current_module(), None) if node is None else \
            ("backward", node.metadata.get(_MODULE_TAG, OUTSIDE), node.name())
        outputs = _float_tensors(out)
        kind = _nonfinite_kind(outputs) if outputs else None
        if kind is not None:
            inputs = _float_tensors((args, kwargs))
            finite_in = _nonfinite_kind(inputs) is None
            dtype = str(outputs[0].dtype).removeprefix("torch.")
            source = None
            if name in self._CASTS and finite_in and inputs and outputs[0].dtype.itemsize < inputs[0].dtype.itemsize:
                source = self.producers.get(inputs[0].untyped_storage().data_ptr())
            if source is not None:
                self.found = NonFinite(*source[:3], kind, True, source[3], source[4], source[5], dtype, rounded_by=name)
            else:
                self.found = NonFinite(phase, module, name, kind, finite_in, node_name, self.count - 1,
                                       tuple(outputs[0].shape), dtype)
            return out
        if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):  # views: their base's
            for t in outputs:
                self.producers[t.untyped_storage().data_ptr()] = (phase, module, name, node_name, self.count - 1, tuple(t.shape))
        return out


def trace_nonfinite(model: torch.nn.Module, step: Callable[[], object]) -> NonFinite | None:
    """Run ``step()`` (one forward and backward of ``model``) and return the first op that made an inf or NaN.

    ``step`` does what a training step does up to ``backward()``: autocast, a loss scaler and the
    loss are all allowed. Returns None when every op's result was finite. Costs a check of every
    op's output, so it is for debugging one step, not for every step of a run.
    """
    if not callable(step):
        raise TypeError("step must be a callable that runs the forward and backward pass")
    stack: list[str] = []
    current = lambda: stack[-1] if stack else OUTSIDE  # noqa: E731
    handles = []

    def enter(name):
        return lambda module, args: stack.append(name)  # a pre-hook returning None leaves the inputs alone

    def leave(module, args, output):
        stack.pop()  # and returning None leaves the output alone

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    watcher = _FirstNonFinite(current)
    try:
        with _TagNodes(current), watcher:
            step()
    finally:
        for h in handles:
            h.remove()
    return watcher.found


# --- statistics of one tensor -------------------------------------------------------------------

@dataclass(frozen=True)
class TensorStats:
    """A tensor seen through a low-precision format. Fractions are of all elements."""

    numel: int
    min: float  # over the finite values
    max: float
    abs_mean: float
    nonfinite: float  # inf or NaN already
    above_max: float  # |x| > the format's largest finite value (values up to half an ULP above still round down to it)
    below_min_normal: float  # 0 < |x| < smallest normal number: subnormal or flushed
    flushed: float  # x != 0 but rounds to 0 in the format
    format: str

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def tensor_stats(x: torch.Tensor, fmt: str | FloatFormat = "fp16") -> TensorStats:
    """Min, max, mean |x|, and the fractions of ``x`` that ``fmt`` cannot hold as normal numbers."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"tensor_stats needs a floating-point tensor, got {type(x).__name__}")
    f = get_format(fmt)
    v = x.detach().flatten()
    v = v if v.dtype == torch.float64 else v.float()  # float64 keeps 1e-300 and 1e300: judge them as they are
    n = v.numel()
    if n == 0:
        raise ValueError("tensor_stats needs a non-empty tensor")
    finite = torch.isfinite(v)
    fv = v[finite]
    a = v.abs()
    nonzero_finite = finite & (v != 0)
    return TensorStats(
        numel=n,
        min=float(fv.min()) if fv.numel() else math.nan,
        max=float(fv.max()) if fv.numel() else math.nan,
        abs_mean=float(fv.abs().mean()) if fv.numel() else math.nan,
        nonfinite=float((~finite).sum()) / n,
        above_max=float((finite & (a > f.max)).sum()) / n,
        below_min_normal=float((nonzero_finite & (a < f.min_normal)).sum()) / n,
        flushed=zone_fractions(v, 1.0, f)["flushed"],
        format=f.name,
    )


# --- a monitor over training ---------------------------------------------------------------------

@dataclass(frozen=True)
class LayerRecord:
    step: int
    kind: Literal["activation", "gradient"]
    name: str  # module name (activations: its output) or parameter name (gradients)
    stats: TensorStats


class LayerMonitor:
    """Records ``tensor_stats`` of chosen modules' outputs and of parameter gradients, step by step.

    Use as a context manager around training. Activations are recorded by forward hooks whenever
    ``monitor.step`` is set (set it to the step number, or None to pause); call
    ``record_gradients(step)`` after the backward pass (after ``scaler.unscale_``, so that the
    gradients are the true ones, not the scaled ones). Empty tensors (an empty batch) have no
    statistics and are not recorded.
    """

    def __init__(self, model: torch.nn.Module, modules: Iterable[str] | None = None, fmt: str | FloatFormat = "fp16",
                 every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        named = dict(model.named_modules())
        if modules is None:
            modules = [n for n, m in named.items() if n and not list(m.children())]  # the leaves
        modules = list(modules)
        unknown = [m for m in modules if m not in named]
        if unknown:
            raise ValueError(f"no modules named {unknown} in the model; some valid names: {list(named)[1:8]}")
        self.model, self.fmt, self.every = model, get_format(fmt), every
        self.modules = modules
        self.records: list[LayerRecord] = []
        self.step: int | None = None
        self._handles = [named[n].register_forward_hook(self._hook(n)) for n in modules]

    def _hook(self, name: str):
        def record(module, args, output):
            if self.step is None or self.step % self.every:
                return
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():  # an empty batch has no statistics
                self.records.append(LayerRecord(self.step, "activation", name, tensor_stats(out, self.fmt)))
        return record

    def record_gradients(self, step: int) -> None:
        if step % self.every:
            return
        for name, p in self.model.named_parameters():
            if p.grad is not None and p.grad.numel():
                self.records.append(LayerRecord(step, "gradient", name, tensor_stats(p.grad, self.fmt)))

    def series(self, kind: str, metric: str) -> dict[str, tuple[list[int], list[float]]]:
        """{name: (steps, values)} of one statistic, e.g. ``series("gradient", "flushed")``."""
        if metric not in TensorStats.__dataclass_fields__:
            raise ValueError(f"unknown metric {metric!r}; valid: {list(TensorStats.__dataclass_fields__)}")
        out: dict[str, tuple[list[int], list[float]]] = {}
        for r in self.records:
            if r.kind == kind:
                steps, values = out.setdefault(r.name, ([], []))
                steps.append(r.step)
                values.append(getattr(r.stats, metric))
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> LayerMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- plots -----------------------------------------------------------------------------------

def plot_series(series: dict[str, tuple[list[int], list[float]]], ax=None, log: bool = True, title: str = "", ylabel: str = ""):
    """One line per layer over steps (from ``LayerMonitor.series``)."""
    import matplotlib.pyplot as plt

    from . import plots

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    for name, (steps, values) in series.items():
        ax.plot(steps, values, label=name, linewidth=1.2)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel=plots.label("步", "step"), ylabel=ylabel, title=title)
    ax.legend(fontsize=7, ncol=2)
    return ax


def plot_log2_histogram(tensors: dict[str, torch.Tensor], fmt: str | FloatFormat = "fp16", ax=None, bins: int = 80):
    """Histograms of log2|x| of each tensor, with the format's subnormal and overflow zones shaded."""
    import matplotlib.pyplot as plt

    from . import plots

    f = get_format(fmt)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    for name, t in tensors.items():
        v = t.detach().float().flatten().cpu()
        v = v[torch.isfinite(v) & (v != 0)].abs().log2()
        if v.numel():
            ax.hist(v.numpy(), bins=bins, histtype="step", linewidth=1.3, label=name, density=True)
    edges = zone_edges(f)
    left, right = ax.get_xlim()
    plots.shade_zones(ax, f, left=min(left, edges["flushed_below"] - 1), right=max(right, edges["overflow_from"] + 1), normal=False)
    ax.set(xlabel="log₂|x|", ylabel=plots.label("密度", "density"))
    ax.legend(fontsize=7)
    return ax


def plot_loss_scale(loss_scale: list[float | None], skipped: list[bool], ax=None, title: str = ""):
    """The loss scale over steps on a log2 axis, with skipped steps marked."""
    import matplotlib.pyplot as plt

    from . import plots

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.8))
    steps = [i for i, s in enumerate(loss_scale) if s is not None and s > 0]  # a collapsed scale reaches 0
    scales = [math.log2(loss_scale[i]) for i in steps]
    ax.plot(steps, scales, color="#1f77b4", linewidth=1.2, label=plots.label("log₂ 缩放因子", "log₂ scale"))
    skips = [i for i in steps if skipped[i]]
    ax.plot(skips, [math.log2(loss_scale[i]) for i in skips], "x", color="#d62728", markersize=4,
            label=plots.label(f"跳过的步（{len(skips)}）", f"skipped steps ({len(skips)})"))
    ax.set(xlabel=plots.label("步", "step"), ylabel="log₂ S", title=title)
    ax.legend(fontsize=8)
    return ax


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖ (Frobenius norms), computed in float64: the book's one error metric."""
    approx, exact = torch.as_tensor(approx), torch.as_tensor(exact)
    if approx.shape != exact.shape:
        raise ValueError(f"relative_error needs tensors of the same shape, got {tuple(approx.shape)} and {tuple(exact.shape)}")
    reference = exact.detach().double()
    scale = reference.norm()
    if scale == 0:
        raise ValueError("relative_error: the exact tensor is all zeros, so a relative error is undefined")
    return float((approx.detach().double() - reference).norm() / scale)


@contextlib.contextmanager
def capture(model: torch.nn.Module, names, what: str = "input"):
    """Record the first input (``what="input"``), the output (``"output"``) or both (``"both"``: an
    ``(input, output)`` pair) of the named modules during the block.

    Yields a dict ``{name: value}`` (detached; the last call wins); the hooks are removed on exit::

        with debug.capture(model, ["transformer.h.1.mlp.c_fc"]) as seen:
            model(x)
        seen["transformer.h.1.mlp.c_fc"]
    """
    if what not in ("input", "output", "both"):
        raise ValueError(f"what must be 'input', 'output' or 'both', got {what!r}")
    names = [names] if isinstance(names, str) else list(names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in the model")
    seen: dict = {}

    def hook(name):
        def record(module, inputs, output):
            inp, out = inputs[0].detach(), (output[0] if isinstance(output, tuple) else output).detach()
            seen[name] = {"input": inp, "output": out, "both": (inp, out)}[what]
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
