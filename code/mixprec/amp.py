"""Precision policies: every decision about precision in a training (or inference) step, as data.

A policy is data (``Policy``); ``get_policy(name)`` parses a name:

=========================  ======================================================================
``fp32``                   everything FP32
``tf32``                   FP32 storage; FP32 matmuls on TF32 tensor cores (CUDA Ampere+; no effect on CPU)
``fp16-amp``               FP32 weights; the forward pass under FP16 autocast; ``torch.amp.GradScaler``
``bf16-amp``               FP32 weights; the forward pass under BF16 autocast; no scaler needed
``bf16-pure``              BF16 weights and compute; ``bf16-pure:stochastic`` / ``bf16-pure:kahan`` change
                           how updates are written back (``mixprec.optim.BF16AdamW``)
``fp16-master``            mixed precision by hand: the model in FP16, an FP32 master copy that the
``bf16-master``            optimizer updates (``MasterWeights``); GradScaler for FP16
``fp8:<recipe>``           BF16 autocast plus FP8 linear layers with a ``mixprec.fp8`` recipe (``tensorwise``,
                           ``rowwise``, ``rowwise_with_gw_hp``, ``blockwise``, ``mxfp8``; plain ``fp8`` is
                           tensorwise), on every device: torchao's linears under native autocast on FP8 GPUs
                           where torchao has the recipe; the emulated ``mixprec.fp8.Float8Linear`` elsewhere
                           (under emulated BF16 autocast on a CPU, as ``bf16-amp``)
``fp4:<nvfp4|mxfp4>``      BF16 autocast plus emulated FP4 linear layers (``mixprec.fp4``), following the NVFP4
                           pretraining recipe: 16×16 weight blocks, a random Hadamard transform on the weight
                           gradient's inputs, stochastic rounding of gradients, the first and last blocks in BF16;
                           switches after a colon turn a component off: ``:no-hadamard``, ``:no-2d``, ``:no-sr``,
                           ``:all-layers`` (e.g. ``fp4:nvfp4:no-sr``)
``round-all:<format>``     NOT mixed precision: every op result, forward and backward, the loss and the
                           loss-scale multiply included, rounded to any ``mixprec.formats`` format
                           ("what if everything were FP16"); FP32 master weights, rounded working copy
``fp16``, ``bf16``          inference only: a copy of the model with every weight converted (pure low precision)
``fp8-weight``             inference only: a copy whose weight matrices are rounded to E4M3, one scale per
                           tensor (weight-only FP8, emulated; activations stay FP32)
``nvfp4-weight``,          inference only: a copy whose linear layers (not the output layer) hold NVFP4 or
``mxfp4-weight``           MXFP4 weights (``mixprec.fp4.quantize_for_inference``, emulated; activations FP32)
``nvfp4-w4a4``,            inference only: as above, and every such layer's input quantized to the same format
``mxfp4-w4a4``
=========================  ======================================================================

A policy name means the same arithmetic on every device; only the kernels differ, and the notes of
``Policy.setup`` say which ran. AMP means the same thing on every device. On a GPU, ``fp16-amp`` and ``bf16-amp`` run
``torch.amp.autocast``. Where the hardware has no fast FP16/BF16 (a CPU), they run
``mixprec.emulate.EmulatedAutocast`` with CUDA's op lists: the numerics a reader's GPU would
produce, at FP32 speed. The suffixes ``:native`` (this device's own autocast, e.g. CPU FP16
autocast, slow) and ``:cpu-lists`` (the emulation with CPU autocast's op lists) choose otherwise.

``Policy.setup(model, lr=...)`` builds everything a training step needs into one ``TrainingSetup``
(the working model, FP32 master weights, optimizer, loss scaler, learning-rate schedule, device,
notes); ``mixprec.step.train_step(setup, inputs, targets)`` runs one step of it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from .emulate import EmulatedAutocast, RoundAllOps, held_in
from .formats import FloatFormat, get_format, round_to_format
from .fp4 import INFERENCE_KINDS as FP4_INFERENCE_KINDS
from .fp4 import Float4Cast, FP4Recipe, convert_to_fp4, quantize_for_inference
from .fp8 import RECIPES, convert_to_fp8, quantize_tensorwise
from .optim import BF16AdamW
from .scaling import NoLossScaler

BASE_POLICIES = ("fp32", "tf32", "fp16-amp", "bf16-amp", "bf16-pure", "bf16-pure:stochastic", "bf16-pure:kahan", "fp16-master",
                 "bf16-master", "fp8")
FP8_POLICIES = tuple(f"fp8:{recipe}" for recipe in RECIPES)
FP4_POLICIES = ("fp4:nvfp4", "fp4:mxfp4")  # each takes the recipe's switches: fp4:nvfp4:no-hadamard...
AUTOCAST_VARIANTS = ("fp16-amp:native", "fp16-amp:cpu-lists", "bf16-amp:native", "bf16-amp:cpu-lists")
INFERENCE_POLICIES = ("fp16", "bf16", "fp8-weight", "nvfp4-weight", "mxfp4-weight", "nvfp4-w4a4", "mxfp4-w4a4")  # inference only: training refuses them
POLICY_NAMES = BASE_POLICIES + FP8_POLICIES + FP4_POLICIES + AUTOCAST_VARIANTS + INFERENCE_POLICIES + ("round-all:<format>",)


def _check_scaler(scaler) -> None:
    if scaler is not None and scaler is not False and not all(callable(getattr(scaler, m, None)) for m in _SCALER_METHODS):
        raise TypeError(f"scaler must be None, False or have GradScaler's methods ({', '.join(_SCALER_METHODS)}), "
                        f"got {scaler!r} ({type(scaler).__name__})")


@dataclass(frozen=True)
class Policy:
    """What one training step computes in, stores weights in, updates with and scales the loss with.

    ``autocast``: how ``autocast_dtype`` is applied: ``"auto"`` (native on CUDA, emulated with
    CUDA's op lists elsewhere), ``"native"`` (``torch.amp.autocast`` on this device),
    ``"emulate-cuda"`` or ``"emulate-cpu"`` (``EmulatedAutocast`` with that device's op lists).
    """

    name: str
    autocast_dtype: torch.dtype | None = None  # the forward pass runs under autocast to this dtype, or none
    autocast: str = "auto"
    param_dtype: torch.dtype = torch.float32  # dtype the model's weights are stored in
    tf32: bool = False
    round_all: FloatFormat | None = None  # whole-network rounding (not AMP)
    fp8: str | None = None  # an FP8 recipe name (mixprec.fp8.RECIPES) for the linear layers
    fp4: FP4Recipe | None = None  # an FP4 recipe (mixprec.fp4.FP4Recipe) for the linear layers
    update_rounding: str | None = None  # bf16-pure: "nearest", "stochastic" or "kahan"
    master_weights: bool = False  # FP32 master copy owned by the optimizer; the model holds the working copy
    uses_scaler: bool = False  # a GradScaler by default
    weights_fp8: bool = False  # inference: weight matrices rounded to E4M3, one scale per tensor
    weights_fp4: str | None = None  # inference: linear layers' weights in "nvfp4" or "mxfp4" (mixprec.fp4)
    activations_fp4: bool = False  # inference, with weights_fp4: those layers' inputs quantized too
    inference_only: bool = False  # fp16, bf16, fp8-weight, *fp4-*: a way to run a trained model, not to train one

    def __post_init__(self):
        if self.autocast not in ("auto", "native", "emulate-cuda", "emulate-cpu"):
            raise ValueError(f"autocast must be 'auto', 'native', 'emulate-cuda' or 'emulate-cpu', got {self.autocast!r}")
        if self.fp8 is not None and self.fp8 not in RECIPES:
            raise ValueError(f"fp8 must be None or an FP8 recipe ({', '.join(RECIPES)}), got {self.fp8!r}")
        if self.fp4 is not None and not isinstance(self.fp4, FP4Recipe):
            raise TypeError(f"fp4 must be None or a mixprec.fp4.FP4Recipe (e.g. FP4Recipe.from_name('nvfp4')), got {self.fp4!r}")
        if self.fp8 is not None and self.fp4 is not None:
            raise ValueError("a policy has FP8 or FP4 linear layers, not both")
        if self.weights_fp4 not in (None, *FP4_INFERENCE_KINDS):
            raise ValueError(f"weights_fp4 must be None, 'nvfp4' or 'mxfp4', got {self.weights_fp4!r}")
        if self.activations_fp4 and self.weights_fp4 is None:
            raise ValueError("activations_fp4 needs weights_fp4 (W4A4: weights and activations in FP4)")
        if self.autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {self.autocast_dtype!r}")
        if not isinstance(self.param_dtype, torch.dtype) or not self.param_dtype.is_floating_point:
            raise ValueError(f"param_dtype must be a floating-point torch dtype (torch.float32, torch.bfloat16...), got {self.param_dtype!r}")
        if self.update_rounding not in (None, "nearest", "stochastic", "kahan"):
            raise ValueError(f"update_rounding must be None, 'nearest', 'stochastic' or 'kahan', got {self.update_rounding!r}")
        if self.round_all is not None and not isinstance(self.round_all, FloatFormat):
            object.__setattr__(self, "round_all", get_format(self.round_all))  # a name such as "fp16": the format itself

    def autocast_mode(self, device: torch.device) -> str | None:
        """How autocast runs on ``device``: ``"native"``, ``"emulate-cuda"``, ``"emulate-cpu"``, or None."""
        if self.autocast_dtype is None:
            return None
        if self.autocast == "auto":
            return "native" if torch.device(device).type == "cuda" else "emulate-cuda"
        return self.autocast

    def forward(self, device: torch.device | str):
        """The context the forward pass runs in: autocast, native or emulated (backward and loss stay outside)."""
        device = torch.device(device)
        mode = self.autocast_mode(device)
        if mode is None:
            return contextlib.nullcontext()
        if mode == "native":
            return torch.amp.autocast(device_type=device.type, dtype=self.autocast_dtype)
        return EmulatedAutocast(self.autocast_dtype, op_lists=mode.removeprefix("emulate-"))

    @contextlib.contextmanager
    def whole_step(self, device: torch.device | str):
        """The context the whole step (forward, loss, backward) runs in: TF32 matmuls, whole-network rounding."""
        device = torch.device(device)
        with contextlib.ExitStack() as stack:
            if self.tf32 and device.type == "cuda":
                stack.enter_context(_tf32_matmuls())
            if self.round_all is not None:
                stack.enter_context(RoundAllOps(self.round_all))
            yield

    @contextlib.contextmanager
    def compute(self, device: torch.device | str):
        """Both contexts at once, for passes without a backward (evaluation, inference)."""
        with self.whole_step(device), self.forward(device):
            yield

    # --- what the trainer asks the policy -----------------------------------------------------
    def setup(self, model: torch.nn.Module, *, lr: float, loss_fn: Callable | None = None, weight_decay: float = 0.0,
              betas: tuple[float, float] = (0.9, 0.95), schedule: Callable[[int], float] | None = None, scaler=None,
              clip: float | None = 1.0, device: torch.device | str | None = None, seed: int = 0, compile: bool = False) -> TrainingSetup:
        """Everything one training step needs under this policy, in one object (see ``TrainingSetup``).

        ``model`` is converted in place (moved to ``device``, weights to the policy's dtype, FP8 linear
        layers swapped in): pass a copy if you need the original. ``loss_fn(output, targets)`` (default:
        ``output`` itself is the loss). ``schedule``: a learning-rate multiplier per update (``LambdaLR``),
        or None for a constant rate. ``scaler``: a loss scaler with ``torch.amp.GradScaler``'s interface;
        None for the policy's default (a GradScaler where the policy needs one), False for none.
        ``clip``: the gradient-norm threshold, or None for no clipping. ``device``: default the model's.
        Every option is checked before anything is done to the model.
        """
        self.check_trainable()
        check_optimizer_options(lr=lr, weight_decay=weight_decay, betas=betas, clip=clip)
        _check_scaler(scaler)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be None or a function update -> learning-rate multiplier, got {type(schedule).__name__}")
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        device = torch.device(device)
        model.to(device)
        notes = []
        if self.fp8:
            notes.append(f"fp8 linears: {convert_to_fp8(model, device, self.fp8)}")
        if self.fp4:
            notes.append(f"fp4 linears: emulated {self.fp4.name}, {len(convert_to_fp4(model, self.fp4))} layers")
        mode = self.autocast_mode(device)
        if mode is not None:
            kernels = "native torch.amp.autocast" if mode == "native" else f"emulated with {mode.removeprefix('emulate-')} op lists, FP32 storage"
            notes.append(f"autocast {str(self.autocast_dtype).removeprefix('torch.')}: {kernels}")
        if self.tf32 and device.type != "cuda":
            notes.append("tf32 has no effect on a CPU: this run is plain fp32")
        master = None
        if self.master_weights:
            master = MasterWeights(model, self.round_all or self.param_dtype)
        elif self.param_dtype != torch.float32:
            model.to(self.param_dtype)
        optimizer = self.optimizer(master.master if master else model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas,
                                   seed=seed)
        return TrainingSetup(
            policy=self, model=model, forward=torch.compile(model) if compile else model, loss_fn=loss_fn or (lambda output, _: output),
            optimizer=optimizer, scaler=self.scaler(device, scaler), master=master, clip=clip, device=device, notes=notes,
            schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule) if schedule is not None else None)

    def check_trainable(self) -> None:
        """Refuse to train under an inference-only policy (``fp16``, ``bf16``, ``fp8-weight``), naming the training ones."""
        if self.inference_only:
            instead = {torch.bfloat16: "bf16-pure, bf16-master or bf16-amp", torch.float16: "fp16-master or fp16-amp"}.get(self.param_dtype, "fp8")
            raise ValueError(f"{self.name!r} is an inference policy (a converted copy of a trained model); to train use {instead} "
                             f"(training policies: {', '.join(n for n in POLICY_NAMES if n not in INFERENCE_POLICIES)})")

    def optimizer(self, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), seed: int = 0) -> torch.optim.Optimizer:
        """AdamW over ``params`` (the masters, with master weights), writing updates the way the policy says."""
        check_optimizer_options(lr=lr, weight_decay=weight_decay, betas=betas)
        if self.update_rounding is not None:
            return BF16AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, rounding=self.update_rounding, seed=seed)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)

    def scaler(self, device: torch.device | str, scaler=None):
        """The loss scaler: ``scaler`` if given (``False``: none), else a GradScaler where the policy needs one.

        "None" is a disabled scaler with the same interface, as ``GradScaler(enabled=False)``.
        """
        _check_scaler(scaler)
        if scaler is False or (scaler is None and not self.uses_scaler):
            return NoLossScaler()
        if scaler is None:
            return torch.amp.GradScaler(torch.device(device).type)
        return scaler

    def inference_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` ready to run under ``compute``: itself, or a converted copy (the caller's model is never changed)."""
        if self.param_dtype == torch.float32 and not self.fp8 and not self.fp4 and not self.weights_fp8 and not self.weights_fp4:
            return model
        model = copy.deepcopy(model)
        if self.fp8:
            convert_to_fp8(model, next(model.parameters()).device, self.fp8)
        if self.fp4:
            convert_to_fp4(model, self.fp4)
        if self.weights_fp8:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.copy_(quantize_tensorwise(p).dequantize())
        if self.weights_fp4:
            quantize_for_inference(model, self.weights_fp4, activations=self.activations_fp4)
        return model.to(self.param_dtype) if self.param_dtype != torch.float32 else model

    def peak_dtype(self) -> str:
        """Which datasheet peak (``mixprec.hw.peak_tflops``) the matmuls of this policy run at, for MFU."""
        if self.fp8:
            return "fp8"
        if self.fp4:
            return "fp32"  # emulated: the matmuls really run in FP32
        if self.round_all is not None or self.weights_fp8 or self.weights_fp4:
            return "fp32"  # emulations: the matmuls really run in FP32
        dtype = self.autocast_dtype or self.param_dtype
        if dtype != torch.float32:
            return "fp16" if dtype == torch.float16 else "bf16"
        return "tf32" if self.tf32 else "fp32"

    def describe(self) -> dict[str, str]:
        """What this policy computes in, stores and updates, in short technical terms: the same on every device."""
        low = {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}
        if self.round_all is not None:
            compute = f"every op rounded to {self.round_all.name} (forward and backward)"
        elif self.fp8:
            compute = f"FP8 linears ({self.fp8}) + BF16 autocast"
        elif self.fp4:
            compute = f"FP4 linears ({self.fp4.name}, emulated) + BF16 autocast"
        elif self.autocast_dtype is not None:
            compute = f"{low[self.autocast_dtype]} autocast" + (" (CPU op lists)" if self.autocast == "emulate-cpu" else "")
        elif self.tf32:
            compute = "FP32; TF32 matmuls (CUDA)"
        elif self.weights_fp8:
            compute = "FP32, weights rounded to E4M3"
        elif self.weights_fp4:
            operands = "weights and inputs" if self.activations_fp4 else "weights"
            compute = f"FP32, linear layers' {operands} in {self.weights_fp4.upper()} (emulated)"
        else:
            compute = low[self.param_dtype]
        weights = f"FP32 ({self.round_all.name} values)" if self.round_all is not None else low[self.param_dtype]
        update = {None: "AdamW", "nearest": "BF16AdamW", "stochastic": "BF16AdamW (stochastic)", "kahan": "BF16AdamW (Kahan)"}[self.update_rounding]
        return {"compute": compute, "weights": weights, "master": "FP32" if self.master_weights else "-",
                "update": "-" if self.inference_only else update, "loss scaling": "GradScaler" if self.uses_scaler else "-"}

    def bytes_per_parameter(self) -> dict[str, float]:
        """Bytes per parameter that live through a step with AdamW: weights (every copy), gradients,
        optimizer state, and the cast copies of the weights that autocast caches during the forward."""
        if self.round_all is not None:  # what the emulated format would take, were it stored natively
            low = (1 + self.round_all.exponent_bits + self.round_all.mantissa_bits) / 8
            return {"weights": 4 + low, "grads": 4, "optimizer": 8, "autocast_cache": 0}
        low = torch.finfo(self.param_dtype).bits / 8
        if self.inference_only:  # no gradients, no optimizer; fp8-weight's and *fp4-*'s values, were they stored natively
            if self.weights_fp4:  # the quantized matrices: 4 bits a value plus an 8-bit scale per 16 (NVFP4) or 32 (MXFP4)
                low = (4 + 8 / Float4Cast(self.weights_fp4).k_multiple) / 8
            return {"weights": 1 if self.weights_fp8 else low, "grads": 0, "optimizer": 0, "autocast_cache": 0}
        if self.master_weights:
            # grads_to_master converts one gradient at a time and frees the low-precision one: the
            # peak is the FP32 gradients plus one tensor, not both full sets
            return {"weights": 4 + low, "grads": 4, "optimizer": 8, "autocast_cache": 0}
        if self.update_rounding is not None:
            # BF16AdamW keeps FP32 moments (8 bytes); Kahan adds a BF16 compensation buffer
            return {"weights": low, "grads": low, "optimizer": 8 + (2 if self.update_rounding == "kahan" else 0), "autocast_cache": 0}
        if self.param_dtype != torch.float32:  # prepare() converts the model; torch's AdamW keeps its moments in that dtype
            cache = 2 if self.autocast_dtype is not None and self.autocast_dtype != self.param_dtype else 0
            return {"weights": low, "grads": low, "optimizer": 2 * low, "autocast_cache": cache}
        # autocast's cache: the low-precision copy of each weight a matmul casts, alive through the step;
        # counted for every parameter, an upper bound (embeddings and LayerNorm weights are never cast).
        # FP8 linears add nothing that lives through the step: torchao's Float8Linear and mixprec's save the
        # high-precision input and weight and cast them again in the backward, so each FP8 copy (and its
        # scales) is transient, one layer at a time. Under BF16 autocast the layers left in high precision
        # (the tied output layer) are cached like bf16-amp's, which this upper bound covers.
        cache = {None: 0, torch.float16: 2, torch.bfloat16: 2}[self.autocast_dtype]
        return {"weights": 4, "grads": 4, "optimizer": 8, "autocast_cache": cache}


_SCALER_METHODS = ("scale", "unscale_", "step", "update", "get_scale")


def check_optimizer_options(*, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), clip: float | None = None) -> None:
    """Refuse, in one line, a learning rate, weight decay, betas or clipping threshold that training cannot use."""
    def real(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    if not real(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not real(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(real(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two finite numbers in [0, 1), got {betas!r}")
    if clip is not None and (not real(clip) or clip <= 0):
        raise ValueError(f"clip must be None (no clipping) or a finite number > 0, got {clip!r}")


@dataclass
class TrainingSetup:
    """Everything one training step needs, built by ``Policy.setup``; ``mixprec.step.train_step(setup, x, y)`` runs a step."""

    policy: Policy
    model: torch.nn.Module  # the working copy: the caller's model, converted in place for the policy
    forward: torch.nn.Module  # what the forward pass calls: the model, or torch.compile(model)
    loss_fn: Callable  # loss_fn(output, targets), computed outside autocast
    optimizer: torch.optim.Optimizer  # over the master weights where the policy has them
    scaler: object  # GradScaler's interface; NoLossScaler when the policy scales nothing
    master: MasterWeights | None  # FP32 masters of a *-master or round-all policy
    clip: float | None  # gradient-norm threshold (None: no clipping)
    device: torch.device
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None  # advances only when the optimizer really stepped
    notes: list[str] = field(default_factory=list)  # which kernels really run here (native or emulated), never a different arithmetic


@contextlib.contextmanager
def _tf32_matmuls():
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def _autocast_policy(name: str, dtype: torch.dtype, autocast: str) -> Policy:
    return Policy(name, autocast_dtype=dtype, autocast=autocast, uses_scaler=dtype == torch.float16)


def get_policy(name: str | Policy) -> Policy:
    """The policy called ``name``; unknown names fail with the list of valid ones."""
    if isinstance(name, Policy):
        return name
    if not isinstance(name, str):
        raise TypeError(f"precision must be a policy name (e.g. 'bf16-amp'), got {type(name).__name__}")
    if name.startswith("round-all:"):
        try:
            fmt = get_format(name.removeprefix("round-all:"))
            round_to_format(torch.zeros(1), fmt)  # fails for formats float32 cannot emulate
        except ValueError as error:
            raise ValueError(f"{name!r}: {error}") from None
        return Policy(name, round_all=fmt, master_weights=True)
    policies = {
        "fp32": Policy("fp32"),
        "tf32": Policy("tf32", tf32=True),
        "bf16-pure": Policy("bf16-pure", param_dtype=torch.bfloat16, update_rounding="nearest"),
        "bf16-pure:stochastic": Policy("bf16-pure:stochastic", param_dtype=torch.bfloat16, update_rounding="stochastic"),
        "bf16-pure:kahan": Policy("bf16-pure:kahan", param_dtype=torch.bfloat16, update_rounding="kahan"),
        "fp16-master": Policy("fp16-master", param_dtype=torch.float16, master_weights=True, uses_scaler=True),
        "bf16-master": Policy("bf16-master", param_dtype=torch.bfloat16, master_weights=True),
        # FP8 linear layers inside BF16 autocast, as torchao's FP8 training runs, on every device
        "fp8": Policy("fp8", fp8="tensorwise", autocast_dtype=torch.bfloat16),
        **{name: Policy(name, fp8=name.removeprefix("fp8:"), autocast_dtype=torch.bfloat16) for name in FP8_POLICIES},
        **{name: Policy(name, fp4=FP4Recipe.from_name(name.removeprefix("fp4:")), autocast_dtype=torch.bfloat16)
           for name in FP4_POLICIES},
        "fp16": Policy("fp16", param_dtype=torch.float16, inference_only=True),
        "bf16": Policy("bf16", param_dtype=torch.bfloat16, inference_only=True),
        "fp8-weight": Policy("fp8-weight", weights_fp8=True, inference_only=True),
        **{f"{kind}-weight": Policy(f"{kind}-weight", weights_fp4=kind, inference_only=True) for kind in FP4_INFERENCE_KINDS},
        **{f"{kind}-w4a4": Policy(f"{kind}-w4a4", weights_fp4=kind, activations_fp4=True, inference_only=True)
           for kind in FP4_INFERENCE_KINDS},
    }
    for prefix, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for suffix, autocast in (("", "auto"), (":native", "native"), (":cpu-lists", "emulate-cpu")):
            policies[f"{prefix}-amp{suffix}"] = _autocast_policy(f"{prefix}-amp{suffix}", dtype, autocast)
    if name.startswith(("fp4:nvfp4:", "fp4:mxfp4:")):  # a recipe with switches: fp4:nvfp4:no-hadamard
        try:
            return Policy(name, fp4=FP4Recipe.from_name(name.removeprefix("fp4:")), autocast_dtype=torch.bfloat16)
        except ValueError as error:
            raise ValueError(f"{name!r}: {error}") from None
    if name not in policies:
        hint = " (whole-network rounding is now 'round-all:<format>')" if name.startswith("emulate:") else ""
        raise ValueError(f"unknown precision {name!r}{hint}; valid: {', '.join(POLICY_NAMES)} (e.g. 'round-all:fp16', 'round-all:e4m3fn')")
    return policies[name]


class MasterWeights:
    """FP32 master weights that the optimizer owns, and the model's low-precision working copy.

    ``working`` is a torch dtype (the model's parameters are converted to it) or a format that the
    parameters, kept in float32, are rounded to (emulation). Each step: the backward pass fills the
    working gradients; ``grads_to_master()`` copies them to the masters in FP32; the optimizer
    updates the masters; ``to_working()`` writes the rounded masters back into the model.
    """

    def __init__(self, model: torch.nn.Module, working: torch.dtype | str | FloatFormat):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        if isinstance(working, torch.dtype):
            self.dtype, self.format = working, None
            for p in model.parameters():  # frozen ones too: the model computes in one dtype; only trained ones get masters
                p.data = p.data.to(working)
        else:
            self.dtype, self.format = torch.float32, get_format(working)
            with torch.no_grad():  # frozen ones too: the model computes on the format's grid; only trained ones get masters
                for p in model.parameters():
                    if not p.requires_grad and p.is_floating_point():
                        p.copy_(round_to_format(p.float(), self.format).to(p.dtype))
        self.to_working()

    @torch.no_grad()
    def to_working(self) -> None:
        for p, m in zip(self.params, self.master):
            p.copy_(m if self.format is None else round_to_format(m, self.format))

    @torch.no_grad()
    def grads_to_master(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None


# --- what autocast does, op by op ---------------------------------------------------------------


@dataclass(frozen=True)
class OpRecord:
    """One call seen under autocast: the floating-point dtypes in, out, and out without autocast."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    without_autocast: tuple[str, ...] | None  # None: the call fails without autocast, or was not re-run (in place)

    @property
    def category(self) -> str:
        """What autocast changed: ``lowered`` (output in low precision because of autocast), ``fp32`` (output
        in FP32 because of autocast), ``promoted`` (mixed inputs, FP32 out by PyTorch's own type promotion,
        not autocast), ``unchanged``, ``in-place`` (writes into its input, whose dtype autocast never changes;
        not re-run) or ``unknown`` (the re-run without autocast failed although the inputs share one dtype:
        an op without a meta kernel, such as the data-dependent ``masked_select`` or ``unique``)."""
        if self.without_autocast is None:
            if self.name.endswith("_") and not self.name.startswith("__"):
                return "in-place"
            if len(set(self.inputs)) <= 1:  # not mixed dtypes that only autocast makes legal: the re-run itself failed
                return "unknown"
        if self.outputs != self.without_autocast:
            return "fp32" if set(self.outputs) == {"float32"} else "lowered"
        if len(set(self.inputs)) > 1 and set(self.outputs) == {"float32"}:
            return "promoted"
        return "unchanged"


class AutocastInspector(TorchFunctionMode):
    """Records every torch function called inside it with its floating-point input and output dtypes.

    A ``TorchFunctionMode`` sees calls *before* autocast rewrites them, so each record shows the
    dtypes the caller passed and the dtypes autocast handed back. To tell autocast's doing from
    PyTorch's ordinary type promotion, each call is run a second time with autocast disabled, on
    *meta* copies of its tensors (shape and dtype, no data, no random-number generator), and the
    output dtypes compared: nothing runs twice on real data, so BatchNorm's running statistics,
    in-place ops and dropout behave exactly as without the inspector. Use it inside autocast::

        with torch.amp.autocast("cpu", dtype=torch.bfloat16), AutocastInspector() as seen:
            model(x)
        seen.records
    """

    _SKIP = {"__get__", "__getitem__", "size", "dim", "backward"}  # accessors autocast never touches
    # explicit conversions: autocast never changes what they return, and a device move has no meta twin
    _CONVERSIONS = {"to", "cpu", "cuda", "type", "type_as", "float", "half", "bfloat16", "double"}

    def __init__(self):
        super().__init__()
        self.records: list[OpRecord] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        outs = tuple(_float_dtypes(out))
        if name in self._SKIP or not outs:
            return out
        plain = None
        devices = [t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in self._CONVERSIONS:
            plain = outs
        elif devices and not name.endswith("_"):
            try:
                with torch.no_grad(), torch.amp.autocast(device_type=devices[0], enabled=False):
                    plain = tuple(_float_dtypes(func(*tree_map(_meta, args), **tree_map(_meta, kwargs))))
            except Exception:  # mixed dtypes that only autocast makes legal, or an op without a meta kernel
                plain = None
        self.records.append(OpRecord(name, tuple(_float_dtypes((args, kwargs))), outs, plain if devices else outs))
        return out

    def summary(self) -> dict[str, dict[str, int]]:
        """Op name → {category: count}, in first-seen order."""
        table: dict[str, dict[str, int]] = {}
        for r in self.records:
            row = table.setdefault(r.name, {})
            row[r.category] = row.get(r.category, 0) + 1
        return table


def _meta(value):
    return value.detach().to("meta") if isinstance(value, torch.Tensor) else value


def _float_dtypes(tree) -> list[str]:
    return [str(t.dtype).removeprefix("torch.") for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


# --- memory -----------------------------------------------------------------------------------

MEMORY_POLICIES = BASE_POLICIES + FP8_POLICIES[1:] + ("round-all:fp16", "round-all:bf16")

# Bytes per parameter for each component, per policy, with AdamW (two moments per parameter); the
# policies own it (``Policy.bytes_per_parameter``). Activations depend on batch and sequence length,
# not on N: measure them with ``saved_activation_bytes``.
BYTES_PER_PARAMETER: dict[str, dict[str, float]] = {name: get_policy(name).bytes_per_parameter() for name in MEMORY_POLICIES}


def memory_breakdown(n_params: int, precision: str | Policy) -> dict[str, float]:
    """Bytes for weights, gradients, optimizer state and autocast's weight cache, for ``n_params`` parameters."""
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 0:
        raise ValueError(f"n_params must be an integer >= 0, got {n_params!r}")
    try:
        per_parameter = get_policy(precision).bytes_per_parameter()
    except ValueError as error:
        raise ValueError(f"no memory model for {precision!r}: {error}") from None
    return {k: v * n_params for k, v in per_parameter.items()}


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor, precision: str | Policy = "fp32") -> int:
    """Bytes of the tensors autograd saves for the backward pass in one forward pass under ``precision`` (a policy).

    These saved activations are what batch size multiplies. Measured with
    ``torch.autograd.graph.saved_tensors_hooks``, so it works on any device; tensors saved twice (the
    same storage) are counted once, and parameters are not counted. Autocast's low-precision copies of
    the weights are saved by the matmuls and counted here too (``bytes_per_parameter`` counts them as
    ``autocast_cache``). ``saved_activation_breakdown`` says which module saved what.
    """
    return sum(saved_activation_breakdown(model, input_ids, precision).values())


def saved_activation_breakdown(model: torch.nn.Module, input_ids: torch.Tensor,
                               precision: str | Policy = "fp32") -> dict[tuple[str, str], int]:
    """``saved_activation_bytes`` split by who saved it: (class of the innermost module running, or ``"loss"``;
    the dtype the tensor is held in) → bytes. The loss is a log-softmax over the vocabulary on FP32 logits."""
    policy = get_policy(precision)
    device = next(model.parameters()).device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[tuple[str, str], int]] = {}
    running: list[str] = []

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            # emulated autocast stores low-precision values in float32: count what it emulates
            owner = (running[-1] if running else "loss", str(held_in(t)).removeprefix("torch."))
            seen[storage.data_ptr()] = owner, storage.nbytes() * held_in(t).itemsize // t.dtype.itemsize
        return t

    handles = [h for m in model.modules() for h in (
        m.register_forward_pre_hook(lambda m, a: running.append(type(m).__name__)),
        m.register_forward_hook(lambda m, a, o: running.pop() and None, always_call=True))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), policy.whole_step(device):
            with policy.forward(device):
                logits = model(input_ids.to(device)).logits
            # Under real autocast ``.float()`` of a low-precision tensor allocates an FP32 copy; an emulated one is already
            # float32 storage (``.float()`` would return it), so make that copy explicitly.
            full = logits.clone() if held_in(logits) != logits.dtype else logits.float()
            full.logsumexp(-1).mean()  # the loss's own saved tensors: a log-softmax over the vocabulary
    finally:
        for h in handles:
            h.remove()
    table: dict[tuple[str, str], int] = {}
    for owner, nbytes in seen.values():
        table[owner] = table.get(owner, 0) + nbytes
    return table
