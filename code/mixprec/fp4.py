"""FP4: NVFP4 and MXFP4 block quantizers, the 16×16 Hadamard transform, and FP4 linear layers.

Both formats store each value as E2M1 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) and
give every block of values a shared scale; they differ in the block and the scale:

* NVFP4: 16 values share a UE4M3 scale (an FP8 number, with three mantissa bits), and the whole
  tensor one FP32 scale, ``amax / (448 · 6)``, which brings the block scales into E4M3's range;
* MXFP4 (OCP MX v1.0): 32 values share an E8M0 scale, a power of two, chosen from the block's amax
  by one of the rules of ``mixprec.fp8.scale_from_amax`` (``floor`` is the specification's).

``quantize_nvfp4`` and ``quantize_mxfp4`` compute what torchao's ``NVFP4Tensor.to_nvfp4`` and
``MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32)`` compute, bit for bit, in the same order of
float32 operations (tests/test_fp4.py). ``Float4Cast`` quantizes one operand of one matrix product,
so FP4 training reuses ``mixprec.fp8``'s linear layer, with the NVFP4 pretraining recipe's switches
(arXiv 2509.25149 §4): 16×16 weight blocks, a random Hadamard transform on the weight gradient's
inputs, stochastic rounding of gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import E2M1, E4M3, pack_e2m1, round_to_format
from .fp8 import scale_from_amax

NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
MX_SCALINGS = ("floor", "rceil", "ceil", "even")
E2M1_MAX = E2M1.max  # 6
_E4M3_TINY = 2.0**-6  # torchao clamps NVFP4 block scales to [2**-6, 448] (torch.finfo(float8_e4m3fn).tiny)


@dataclass(frozen=True)
class FP4Tensor:
    """E2M1 values (in float32) and the scales that give the numbers back: ``x ≈ values · scale``.

    ``block_scale`` has one entry per block (UE4M3 for NVFP4, E8M0 for MXFP4), ``tensor_scale`` is
    NVFP4's FP32 per-tensor scale (1 where there is none).
    """

    values: torch.Tensor
    block_scale: torch.Tensor  # broadcastable against values
    tensor_scale: torch.Tensor
    kind: str

    def dequantize(self) -> torch.Tensor:
        return self.values * (self.tensor_scale * self.block_scale)

    def packed(self) -> torch.Tensor:
        """The values as ``torch.float4_e2m1fn_x2`` (blocks holding NaN have no E2M1 code: refused)."""
        return pack_e2m1(self.values)


def _check(x: torch.Tensor, block: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} takes a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(f"{what}: the last dimension of shape {tuple(x.shape)} must be a multiple of the block size {block}")


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _tiles(x: torch.Tensor, size: int) -> torch.Tensor:
    """A 2-D tensor as (rows/size, size, cols/size, size) tiles."""
    rows, cols = x.shape
    return x.detach().float().reshape(rows // size, size, cols // size, size)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 per-tensor scale, ``amax / (448 · 6)``: the block with the tensor's amax gets block scale 448.

    A tensor of zeros gets 1 (torchao divides 0 by 0 there and returns NaN).
    """
    amax = x.detach().float().abs().amax()
    scale = amax / (E4M3.max * E2M1_MAX)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize_nvfp4(x: torch.Tensor, per_tensor_scale: bool = True, block_2d: bool = False,
                   rounding: str = "nearest", generator: torch.Generator | None = None, block: int = NVFP4_BLOCK) -> FP4Tensor:
    """NVFP4: every 16 values along the last dimension (or every 16×16 tile, ``block_2d``) share a UE4M3 scale.

    The block scale is the block's amax / 6, divided by the FP32 tensor scale and rounded to E4M3
    (clamped to [2**-6, 448], as torchao does); the values are divided by both scales, clamped to
    ±6 and rounded to E2M1 (``rounding``: ``"nearest"``, or ``"stochastic"`` for gradients).
    Rules for non-finite input: an inf saturates to ±6 times its block's scale; with
    ``per_tensor_scale`` it makes the tensor scale inf and everything NaN; a NaN makes its block
    (or, with ``per_tensor_scale``, the tensor) NaN. ``block``: 16 in NVFP4; other sizes are for study.
    """
    _check_block(block)
    _check(x, block, "quantize_nvfp4")
    if block_2d and (x.dim() != 2 or x.shape[0] % block):
        raise ValueError(f"2-D blocks need a 2-D tensor whose sizes are multiples of {block}, got shape {tuple(x.shape)}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    xb = _tiles(x, block) if block_2d else _blocks(x, block)
    amax = xb.abs().amax(dim=(1, 3) if block_2d else -1, keepdim=True)
    tensor_scale = nvfp4_tensor_scale(x) if per_tensor_scale else torch.ones((), device=x.device)
    block_scale = round_to_format((amax / E2M1_MAX / tensor_scale).clamp(_E4M3_TINY, E4M3.max), E4M3)
    scaled = (xb * ((1.0 / tensor_scale) / block_scale)).clamp(-E2M1_MAX, E2M1_MAX)
    values = round_to_format(scaled, E2M1, rounding, generator)
    shape = x.shape
    return FP4Tensor(values.reshape(shape), block_scale.expand_as(xb).reshape(shape), tensor_scale, "nvfp4")


def quantize_mxfp4(x: torch.Tensor, scaling: str = "floor", rounding: str = "nearest",
                   generator: torch.Generator | None = None, block: int = MXFP4_BLOCK) -> FP4Tensor:
    """MXFP4: every 32 values along the last dimension share a power-of-two (E8M0) scale.

    ``scaling`` picks the exponent from the block's amax (``mixprec.fp8.scale_from_amax``, torchao's
    ``ScaleCalculationMode``): ``floor`` (OCP MX v1.0) puts amax in [4, 8), so values above 6 are
    clamped; ``rceil`` in (3, 6], nothing clamped; ``ceil`` in (2, 4]; ``even`` rounds amax to
    E2M1's one mantissa bit first, then floors. The scale's range is 2**-127 .. 2**127 (torchao
    0.18 quantizes the tiniest blocks with 2**-126 but stores 2**-127; see tests/test_fp4.py).
    A block holding NaN comes back NaN (E8M0's NaN scale); an inf saturates to 6 times its scale.
    ``block``: 32 in the specification; other sizes are for study.
    """
    _check_block(block)
    _check(x, block, "quantize_mxfp4")
    if scaling not in MX_SCALINGS:
        raise ValueError(f"scaling must be one of {MX_SCALINGS}, got {scaling!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    xb = _blocks(x, block)
    inverse = scale_from_amax(xb.abs().amax(dim=-1, keepdim=True), E2M1, scaling)  # 2**-e: x · inverse goes into E2M1
    scaled = (xb * inverse).clamp(-E2M1_MAX, E2M1_MAX)
    values = round_to_format(scaled, E2M1, rounding, generator)
    shape = x.shape
    return FP4Tensor(values.reshape(shape), (1.0 / inverse).expand_as(xb).reshape(shape),
                     torch.ones((), device=x.device), "mxfp4")


def clipped_block_fraction(x: torch.Tensor, scaling: str = "floor") -> float:
    """The fraction of MXFP4 blocks whose largest magnitude is clamped (lands above 6 after scaling)."""
    _check(x, MXFP4_BLOCK, "clipped_block_fraction")
    amax = _blocks(x, MXFP4_BLOCK).abs().amax(dim=-1)
    return (amax * scale_from_amax(amax, E2M1, scaling) > E2M1_MAX).float().mean().item()


def sqnr_db(x: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σx² / Σ(x - approx)²)."""
    x, approx = x.detach().double(), approx.detach().double()
    noise = (x - approx).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(x.pow(2).sum().item() / noise)


# --- the random Hadamard transform -----------------------------------------------------------

def hadamard_matrix(n: int = 16, seed: int = 0) -> torch.Tensor:
    """An n×n random Hadamard transform ``H · diag(signs) / sqrt(n)``: orthogonal, so ``Q @ Q.T = I``.

    H is Sylvester's ±1 Hadamard matrix, ``signs`` one fixed random ±1 vector (from ``seed``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n!r}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return h * signs.float() / math.sqrt(n)


def hadamard_transform(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Every ``len(q)`` consecutive values along the last dimension multiplied by ``q``: ``x_block @ q``."""
    n = q.shape[0]
    _check(x, n, "hadamard_transform")
    return (x.float().reshape(*x.shape[:-1], -1, n) @ q.to(x.device)).reshape(x.shape)


# --- training in FP4: one operand's cast, the recipe's switches, and the layers --------------

_HADAMARD = hadamard_matrix(16, seed=0)  # one fixed random sign vector, as the NVFP4 recipe uses


@dataclass(frozen=True)
class Float4Cast:
    """How one operand of one matrix product goes to FP4; used where ``mixprec.fp8.CastConfig`` is.

    ``kind``: ``"nvfp4"`` or ``"mxfp4"``. ``block_2d``: 16×16 tiles (NVFP4 weights), so that the
    forward and the backward see the same quantized weight. ``stochastic``: stochastic rounding of
    the E2M1 values (gradients). ``hadamard``: multiply every 16 values along K by the random
    Hadamard matrix first; both operands of a product must have it, and then the product is unchanged
    (Q Qᵀ = I) while outliers are spread over 16 values.
    """

    kind: str = "nvfp4"
    block_2d: bool = False
    stochastic: bool = False
    hadamard: bool = False
    scaling: str = "floor"  # MXFP4's scale rule

    def __post_init__(self):
        if self.kind not in ("nvfp4", "mxfp4"):
            raise ValueError(f"kind must be 'nvfp4' or 'mxfp4', got {self.kind!r}")
        if self.block_2d and self.kind != "nvfp4":
            raise ValueError("2-D blocks are NVFP4's (16×16); MX blocks are 1×32 by the specification")
        if self.scaling not in MX_SCALINGS:
            raise ValueError(f"scaling must be one of {MX_SCALINGS}, got {self.scaling!r}")

    @property
    def fmt(self) -> str:  # not None: this operand is quantized (fp8.Float8LinearConfig checks it)
        return "e2m1"

    @property
    def k_multiple(self) -> int:
        return NVFP4_BLOCK if self.kind == "nvfp4" else MXFP4_BLOCK

    def cast(self, x: torch.Tensor, k_dim: int) -> torch.Tensor:
        """What the product sees: ``x`` (2-D) quantized along dimension ``k_dim`` and dequantized, in FP32."""
        t = x.float() if k_dim in (1, -1) else x.float().t()  # K last
        if self.hadamard:
            t = hadamard_transform(t, _HADAMARD)
        rounding = "stochastic" if self.stochastic else "nearest"
        if self.kind == "nvfp4":
            q = quantize_nvfp4(t, block_2d=self.block_2d, rounding=rounding)
        else:
            q = quantize_mxfp4(t, self.scaling, rounding=rounding)
        out = q.dequantize()
        return out if k_dim in (1, -1) else out.t()


@dataclass(frozen=True)
class FP4Recipe:
    """The NVFP4 pretraining recipe (arXiv 2509.25149 §4) as switches; each can be turned off by name.

    ``hadamard``: the 16×16 random Hadamard transform on both inputs of the weight-gradient product
    only. ``weight_2d``: 16×16 weight blocks (NVFP4 only). ``stochastic_rounding``: on gradients
    only. ``all_layers``: every linear layer in FP4; otherwise the first and the last transformer
    block stay in BF16 (a model of two blocks keeps only its last one, so that something is left in
    FP4). The output layer, tied to the embedding, always stays high precision, as do embeddings,
    norms and attention's score products (they are not linear layers).
    """

    kind: str = "nvfp4"
    hadamard: bool = True
    weight_2d: bool = True
    stochastic_rounding: bool = True
    all_layers: bool = False

    SWITCHES = {"no-hadamard": "hadamard", "no-2d": "weight_2d", "no-sr": "stochastic_rounding", "all-layers": "all_layers"}

    def __post_init__(self):
        if self.kind not in ("nvfp4", "mxfp4"):
            raise ValueError(f"kind must be 'nvfp4' or 'mxfp4', got {self.kind!r}")

    @classmethod
    def from_name(cls, name: str) -> FP4Recipe:
        """``"nvfp4"``, ``"mxfp4"``, with switches after colons: ``"nvfp4:no-hadamard:no-sr"``."""
        kind, *switches = name.split(":")
        options = {}
        for switch in switches:
            if switch not in cls.SWITCHES:
                raise ValueError(f"unknown FP4 switch {switch!r} in {name!r}; valid: {', '.join(cls.SWITCHES)}")
            options[cls.SWITCHES[switch]] = switch == "all-layers"
        return cls(kind, **options)

    @property
    def name(self) -> str:
        off = [s for s, field in self.SWITCHES.items() if s != "all-layers" and not getattr(self, field)]
        return ":".join([self.kind, *off, *(["all-layers"] if self.all_layers else [])])

    def linear_config(self):
        """The six operands' casts, as a ``mixprec.fp8.Float8LinearConfig`` (the layer is fp8's)."""
        from .fp8 import Float8LinearConfig

        k = self.kind
        act = Float4Cast(k)
        weight = Float4Cast(k, block_2d=self.weight_2d and k == "nvfp4")
        grad = Float4Cast(k, stochastic=self.stochastic_rounding)
        return Float8LinearConfig(
            cast_config_input=act, cast_config_input_for_grad_weight=Float4Cast(k, hadamard=self.hadamard),
            cast_config_weight=weight, cast_config_weight_for_grad_input=weight,
            cast_config_grad_output=grad,
            cast_config_grad_output_for_grad_weight=Float4Cast(k, stochastic=self.stochastic_rounding, hadamard=self.hadamard),
            recipe=self.name)

    def in_fp4(self, fqn: str, n_blocks: int) -> bool:
        """Whether the linear layer called ``fqn`` runs in FP4 under this recipe."""
        if fqn.endswith("lm_head"):
            return False
        if self.all_layers:
            return True
        block = next((int(p) for prev, p in zip(fqn.split("."), fqn.split(".")[1:]) if prev == "h" and p.isdigit()), None)
        kept = {n_blocks - 1} if n_blocks <= 2 else {0, n_blocks - 1}
        return block not in kept


def convert_to_fp4(model: torch.nn.Module, recipe: FP4Recipe | str = "nvfp4") -> list[str]:
    """Swap ``model``'s linear layers for emulated FP4 ones (``mixprec.fp8.Float8Linear`` with FP4 casts), in place.

    Returns the names of the layers now in FP4. Layers whose sizes are not multiples of the block
    stay in high precision.
    """
    from .fp8 import Float8Linear, swap_linears

    recipe = FP4Recipe.from_name(recipe) if isinstance(recipe, str) else recipe
    config = recipe.linear_config()
    n_blocks = getattr(getattr(model, "config", None), "n_layer", 0)
    multiple = config.cast_config_input.k_multiple

    def keep(linear, fqn):
        fits = linear.in_features % multiple == 0 and linear.out_features % multiple == 0
        return not (fits and recipe.in_fp4(fqn, n_blocks))

    return swap_linears(model, lambda linear: Float8Linear.from_float(linear, config), skip=keep)


# --- inference: FP4 weights, and optionally FP4 activations ---------------------------------------

INFERENCE_KINDS = ("nvfp4", "mxfp4")


class FP4InferenceLinear(torch.nn.Module):
    """A linear layer for inference whose weight is stored in FP4; with ``activations``, its input is quantized too.

    Blocks run along the input dimension (the product's K) for both operands, as FP4 tensor cores
    take them. The weight is quantized once and kept dequantized; the product runs in the input's
    dtype (emulation: the values are FP4's, the arithmetic is not). ``mx_scaling``: MXFP4's scale rule
    (``floor`` is OCP's; torchao's inference configs default to ``rceil``).
    """

    def __init__(self, linear: torch.nn.Linear, kind: str, activations: bool = False, mx_scaling: str = "floor"):
        super().__init__()
        self.kind, self.activations = kind, activations
        self.cast = Float4Cast(kind, scaling=mx_scaling)  # the training layers' operand cast, round to nearest
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = self.cast.cast(linear.weight, -1).to(linear.weight.dtype)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations:
            x = self.cast.cast(x, -1).to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}, " \
               f"{'weights and activations' if self.activations else 'weights only'}"


def quantize_for_inference(model: torch.nn.Module, kind: str = "nvfp4", activations: bool = False,
                           include=lambda fqn: not fqn.endswith("lm_head"), mx_scaling: str = "floor") -> list[str]:
    """Swap ``model``'s linear layers (and GPT-2's ``Conv1D``) for ``FP4InferenceLinear`` in place; returns their names.

    ``include(fqn)`` picks the layers (default: every one but the output layer, which GPT-2 ties to
    the embedding; embeddings and norms are not linear layers and stay as they are). A layer whose
    input size is not a multiple of the block is refused, not silently left out.
    """
    from .fp8 import swap_linears

    if kind not in INFERENCE_KINDS:
        raise ValueError(f"kind must be one of {INFERENCE_KINDS}, got {kind!r}")
    block = Float4Cast(kind).k_multiple

    def make(linear):
        if linear.in_features % block:
            raise ValueError(f"{kind} needs input sizes that are multiples of {block}; a layer has {linear.in_features}")
        return FP4InferenceLinear(linear, kind, activations, mx_scaling)

    return swap_linears(model, make, skip=lambda linear, fqn: not include(fqn))
