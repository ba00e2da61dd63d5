"""Precision in data-parallel training: the storyteller on ``torch.distributed`` with FSDP2 or DDP.

Every rank holds a full model (DDP) or a shard of it (FSDP2, ZeRO-3 style), runs ``mixprec.step.train_step``
on its slice of the global batch, and the ranks agree on the gradients by communicating. Precision
enters in three places: the dtype the parameters are gathered and computed in (FSDP2's ``param_dtype``),
the dtype gradients are reduced in (``reduce_dtype``, or a DDP communication hook), and the dtype
the optimizer's master weights are kept in (FP32: FSDP2's sharded parameters are the masters).

``FSDP2_PRECISION`` maps the book's policies (``mixprec.amp``) onto ``MixedPrecisionPolicy``; the
step itself is the one every trainer of the book calls. Run it with ``torchrun``::

    torchrun --nproc-per-node 2 -m mixprec.distributed train --setting fsdp2,bf16-master --steps 5 --out result.json

or from Python with ``launch(...)``, which starts that command as a subprocess and reads the result.
The backend follows the device: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .amp import get_policy
from .step import train_step

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
STRATEGIES = ("single", "ddp", "fsdp2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The book's policies under FSDP2: the dtype parameters are all-gathered and computed in, and the dtype
# gradients are reduce-scattered in. The sharded FP32 parameters are the master weights in every row;
# the optimizer owns them. Autocast (the *-amp rows) happens inside the step, on FP32 gathered weights.
FSDP2_PRECISION: dict[str, dict[str, torch.dtype | None]] = {
    "fp32": {"param_dtype": None, "reduce_dtype": None},
    "tf32": {"param_dtype": None, "reduce_dtype": None},
    "bf16-amp": {"param_dtype": None, "reduce_dtype": None},
    "fp16-amp": {"param_dtype": None, "reduce_dtype": None},
    "bf16-master": {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32},
    "fp16-master": {"param_dtype": torch.float16, "reduce_dtype": torch.float32},
}
DDP_POLICIES = ("fp32", "tf32", "bf16-amp", "fp16-amp", "bf16-master", "fp16-master")
DDP_HOOKS = ("none", "fp16", "bf16")  # the dtype gradients are all-reduced in ("none": their own, torch's allreduce_hook)


@dataclass(frozen=True)
class Setting:
    """One way to train: ``strategy`` (single, ddp, fsdp2), a book ``policy``, and the communication dtype:
    ``reduce`` (FSDP2: override the policy's reduce dtype) or ``hook`` (DDP: compress the all-reduce to fp16 or bf16;
    ``none`` all-reduces the gradients in their own dtype).

    Written on the command line as ``fsdp2,bf16-master,reduce=bf16`` or ``ddp,fp32,hook=bf16``.
    """

    strategy: str
    policy: str = "fp32"
    reduce: str | None = None
    hook: str = "none"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        valid = FSDP2_PRECISION if self.strategy == "fsdp2" else DDP_POLICIES
        if self.policy not in valid:
            get_policy(self.policy)  # an unknown name: the list of every policy
            why = {"bf16-pure": "it keeps no FP32 master weights, and under FSDP2 the sharded FP32 parameters are the masters: "
                                "use bf16-master (BF16 compute, FP32 masters)"}.get(self.policy.split(":")[0], "")
            if self.policy.startswith("fp8"):
                why = "FP8 training is single-device here; FP8 all-gather is shown with fp8_all_gather (emulated numerics)"
            raise ValueError(f"policy {self.policy!r} is not supported with {self.strategy}{': ' + why if why else ''}; "
                             f"valid: {', '.join(valid)}")
        if self.reduce is not None and (self.strategy != "fsdp2" or self.reduce not in DTYPES):
            raise ValueError(f"reduce is for fsdp2 only, one of {', '.join(DTYPES)}; got reduce={self.reduce!r} with {self.strategy}")
        if self.hook not in DDP_HOOKS or (self.hook != "none" and self.strategy != "ddp"):
            raise ValueError(f"hook is for ddp only, one of {', '.join(DDP_HOOKS)}; got hook={self.hook!r} with {self.strategy}")

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``"fsdp2,bf16-master,reduce=bf16"`` → ``Setting("fsdp2", "bf16-master", reduce="bf16")``."""
        parts = [p.strip() for p in str(text).split(",")]
        options = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
        if len(parts) < 1 or len(parts) > 4 or any("=" not in p for p in parts[2:]) or set(options) - {"reduce", "hook"}:
            raise ValueError(f"a setting is 'strategy[,policy][,reduce=DTYPE][,hook=DTYPE]', e.g. 'fsdp2,bf16-master,reduce=bf16'; got {text!r}")
        return cls(parts[0], parts[1] if len(parts) > 1 else "fp32", **options)

    @property
    def spec(self) -> str:
        extra = f",reduce={self.reduce}" if self.reduce else f",hook={self.hook}" if self.hook != "none" else ""
        return f"{self.strategy},{self.policy}{extra}"

    def mixed_precision(self):
        """FSDP2's ``MixedPrecisionPolicy`` for this setting (FSDP2 only)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.strategy != "fsdp2":
            raise ValueError(f"MixedPrecisionPolicy is FSDP2's; this setting is {self.strategy}")
        row = dict(FSDP2_PRECISION[self.policy])
        if self.reduce is not None:
            row["reduce_dtype"] = DTYPES[self.reduce]
        return MixedPrecisionPolicy(**row, output_dtype=None, cast_forward_inputs=True)

    def communicated_dtypes(self) -> dict[str, torch.dtype]:
        """Collective → the dtype it moves: all-gather and reduce-scatter (FSDP2), all-reduce (DDP)."""
        if self.strategy == "single":
            return {}
        if self.strategy == "ddp":
            master = get_policy(self.policy).master_weights  # *-master: the model's own gradients are low precision
            dtype = DTYPES[self.hook] if self.hook != "none" else (get_policy(self.policy).param_dtype if master else torch.float32)
            return {"all_reduce": dtype}
        mp = self.mixed_precision()
        param = mp.param_dtype or torch.float32
        return {"all_gather": param, "reduce_scatter": mp.reduce_dtype or param}


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for a device type: gloo on CPU, NCCL on CUDA."""
    kind = torch.device(device).type
    if kind not in BACKENDS:
        raise ValueError(f"no distributed backend for device {kind!r} here; supported: {BACKENDS}")
    return BACKENDS[kind]


# gloo's collectives, checked on torch 2.13 CPU: FP32, FP16 and BF16 work; FP8 fails with "Invalid scalar type".
GLOO_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int32, torch.int64)


def check_collective_dtype(dtype: torch.dtype, backend: str) -> None:
    """Fail clearly when ``backend`` cannot communicate ``dtype`` (gloo has no FP8: send a uint8 view and its scales)."""
    if backend == "gloo" and dtype not in GLOO_DTYPES:
        hint = " (FP8: send tensor.view(torch.uint8) with its scales, as fp8_all_gather does)" if dtype.itemsize == 1 else ""
        raise TypeError(f"the gloo backend cannot communicate {dtype}{hint}; gloo supports {', '.join(str(d) for d in GLOO_DTYPES)}")


# --- DDP communication hooks --------------------------------------------------------------------


def bf16_allreduce_hook(process_group, bucket):
    """torch's ``bf16_compress_hook`` arithmetic, for where DDP refuses to register torch's own (gloo, no NCCL):
    cast the bucket to BF16, divide by the world size, all-reduce (sum) in BF16, copy back into the FP32 bucket."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()
    return future.then(lambda fut: buffer.copy_(fut.value()[0]))


def register_hook(ddp, hook: str) -> str:
    """Register the DDP communication hook for ``hook`` (none, fp16, bf16); returns which hook runs.

    torch's own hook wherever DDP accepts it; for BF16 where DDP refuses torch's ``bf16_compress_hook`` (it checks
    the hook's name and wants CUDA with NCCL 2.10+), ``bf16_allreduce_hook``: the same arithmetic under another name."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if hook not in DDP_HOOKS:
        raise ValueError(f"hook must be one of {', '.join(DDP_HOOKS)}, got {hook!r}")
    torch_hook = {"none": default_hooks.allreduce_hook, "fp16": default_hooks.fp16_compress_hook,
                  "bf16": default_hooks.bf16_compress_hook}[hook]
    try:
        ddp.register_comm_hook(None, torch_hook)
        return f"torch {torch_hook.__name__}"
    except (RuntimeError, TypeError, ValueError) as error:  # torch 2.13 gloo: TypeError "BF16 all reduce communication hook required CUDA 11+ and NCCL 2.10+"
        if hook != "bf16":
            raise
        ddp.register_comm_hook(None, bf16_allreduce_hook)  # another name: DDP refuses the name bf16_compress_hook
        return f"mixprec bf16_allreduce_hook (DDP refused torch's: {str(error).splitlines()[0][:120]})"


# --- communication volume -----------------------------------------------------------------------


def shard_units(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """FSDP2 units of the storyteller: one per transformer block, then the root (embeddings, final norm).

    The order is that of the forward pass; the last entry is the root, whose parameters stay gathered
    between forward and backward (FSDP2 does not reshard the root after forward)."""
    blocks = list(model.transformer.h)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    units = [(f"transformer.h.{i}", list(b.parameters())) for i, b in enumerate(blocks)]
    return units + [("root", [p for p in model.parameters() if id(p) not in in_blocks])]


def shard(model: torch.nn.Module, mp_policy) -> torch.nn.Module:
    """FSDP2 for the storyteller: each transformer block its own unit, then the root (embeddings, final norm).

    Each unit's parameters are gathered just before it runs and freed after; ``mp_policy`` (a
    ``MixedPrecisionPolicy``) says in which dtype they are gathered and their gradients reduced."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    return model


def per_rank_state(setting: Setting | str, world_size: int) -> list[tuple[str, str, str]]:
    """What each rank keeps between steps, as (what, dtype, share of the model): the rows of the data-parallel schematic."""
    setting = Setting.parse(setting) if isinstance(setting, str) else setting
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    policy = get_policy(setting.policy)
    short = {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16"}
    if setting.strategy == "fsdp2":
        part = f"1/{world_size}"
        working = short[setting.mixed_precision().param_dtype or torch.float32]
        return [("weights = master", "FP32", part), ("gradients", "FP32", part), ("Adam m, v", "FP32", part),
                ("gathered unit", working, "1 block")]
    rows = [("weights", short[policy.param_dtype] if policy.master_weights else "FP32", "all")]
    if policy.master_weights:
        rows.append(("master", "FP32", "all"))
    return rows + [("gradients", rows[0][1], "all"), ("Adam m, v", "FP32", "all")]


ZERO_STAGES = {0: "DDP: nothing sharded", 1: "optimizer state sharded", 2: "+ gradients sharded", 3: "+ weights sharded (FSDP2)"}


def zero_bytes_per_parameter(precision: str, world_size: int) -> dict[int, dict[str, float]]:
    """Bytes each rank keeps per model parameter at each ZeRO stage (Rajbhandari et al. 2020), for a policy.

    Components: ``weights`` (the working copy, in the policy's dtype), ``gradients`` (same dtype) and
    ``optimizer`` (AdamW's m and v in FP32, plus the FP32 master copy where the policy has one). Stage 1 shards
    the optimizer over the ``world_size`` ranks, stage 2 the gradients too, stage 3 the weights too. Activations
    and communication buffers are not counted."""
    policy = get_policy(precision)
    policy.check_trainable()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    working = policy.param_dtype.itemsize
    full = {"weights": working, "gradients": working, "optimizer": 8 + (4 if policy.master_weights else 0)}
    sharded_from = {"optimizer": 1, "gradients": 2, "weights": 3}
    return {stage: {k: v / world_size if stage >= sharded_from[k] else v for k, v in full.items()} for stage in ZERO_STAGES}


def _padded_numel(p: torch.Tensor, world: int) -> int:
    """FSDP2 shards dim 0, padded to a multiple of the world size."""
    rows = p.shape[0] if p.dim() else 1
    return math.ceil(rows / world) * world * (p.numel() // max(rows, 1))


def communication_per_step(model: torch.nn.Module, setting: Setting | str, world_size: int) -> dict[str, int]:
    """Bytes each rank hands to each collective in one training step, computed from the model alone.

    DDP: one all-reduce of every gradient. FSDP2: an all-gather of each unit's shard in the forward and
    again in the backward (the root's once), and a reduce-scatter of each unit's full gradient. These are
    the tensors the collectives are given; a ring algorithm puts (W-1)/W of an all-gather's or
    reduce-scatter's full size on the wire per rank, twice that for an all-reduce (``ring_wire_bytes``).
    """
    setting = Setting.parse(setting) if isinstance(setting, str) else setting
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    dtypes = setting.communicated_dtypes()
    if setting.strategy == "ddp":
        return {"all_reduce": sum(p.numel() for p in model.parameters()) * dtypes["all_reduce"].itemsize}
    if setting.strategy == "single":
        return {}
    units = shard_units(model)
    gather = reduce = 0
    for i, (_, params) in enumerate(units):
        padded = sum(_padded_numel(p, world_size) for p in params)
        gathers = 1 if i == len(units) - 1 else 2
        gather += gathers * padded // world_size * dtypes["all_gather"].itemsize
        reduce += padded * dtypes["reduce_scatter"].itemsize
    return {"all_gather": gather, "reduce_scatter": reduce}


def ring_wire_bytes(payload: dict[str, int], world_size: int) -> int:
    """Bytes one rank sends in a ring algorithm, from the collectives' payloads (``communication_per_step``)."""
    w = world_size
    return round(payload.get("all_reduce", 0) * 2 * (w - 1) / w + payload.get("reduce_scatter", 0) * (w - 1) / w
                 + payload.get("all_gather", 0) * (w - 1))


@contextlib.contextmanager
def count_collectives():
    """Count what this rank hands to ``all_reduce``, ``all_gather_single`` and ``reduce_scatter_single``.

    Yields a dict collective → bytes, filled while the context is open. FSDP2 and the DDP hooks call these
    functions through the ``torch.distributed`` module, so patching its attributes sees every call."""
    counts = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    names = {"all_reduce": "all_reduce", "all_gather_single": "all_gather", "reduce_scatter_single": "reduce_scatter"}
    originals = {name: getattr(dist, name) for name in names}

    def counting(name, original):
        signature = inspect.signature(original)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            tensor = bound.get("tensor", bound.get("input", bound.get("input_tensor")))
            counts[names[name]] += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


# --- reduction precision ------------------------------------------------------------------------


def ring_allreduce_sum(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum over ranks (dim 0 of ``values``) as a ring all-reduce computes it, every partial sum held in ``dtype``.

    The ring splits the vector into one chunk per rank; chunk ``c`` starts at rank ``c+1`` and travels the
    ring, each rank adding its own values and storing the result in ``dtype`` before passing it on. So every
    element is a sequential sum of N terms, each chunk starting at a different rank. Returned in float64."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.is_floating_point():
        raise ValueError("values must be a 2-D floating-point tensor (ranks, elements)")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    n, numel = values.shape
    chunk = torch.arange(numel) * n // numel  # the chunk each element belongs to
    v = values.to(dtype)
    total = torch.zeros(numel, dtype=dtype)
    for hop in range(n):
        total = total + v[(chunk + 1 + hop) % n, torch.arange(numel)]  # each addition rounds to dtype
    return total.double()


def reduction_error(n_ranks: int, dtype: torch.dtype, numel: int = 4096, seed: int = 0, signal: float = 1.0, noise: float = 1.0) -> dict[str, float]:
    """Relative error of the averaged gradient when N ranks' gradients are summed in ``dtype`` along a ring.

    Each rank's gradient is a common signal plus its own noise (``signal``·s + ``noise``·z_r), drawn in FP32.
    ``ring``: ring all-reduce with partial sums in ``dtype``, divided by N; ``rounded``: the exact mean
    rounded once to ``dtype`` (the error no reduction can avoid). Errors are norms relative to the exact mean."""
    if isinstance(n_ranks, bool) or not isinstance(n_ranks, int) or n_ranks < 1:
        raise ValueError(f"n_ranks must be an integer >= 1, got {n_ranks!r}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be an integer >= 1, got {numel!r}")
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(numel, generator=g)
    values = signal * common + noise * torch.randn(n_ranks, numel, generator=g)
    exact = values.double().sum(0) / n_ranks
    ring = ring_allreduce_sum(values, dtype) / n_ranks
    norm = exact.norm().item()
    return {"ring": ((ring - exact).norm() / norm).item(),
            "rounded": ((exact.to(dtype).double() - exact).norm() / norm).item()}


# --- FP8 all-gather ------------------------------------------------------------------------------


def fp8_all_gather(shard: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather a weight in FP8 (E4M3) and return the full tensor dequantized, as torchao's float8 all-gather
    under FSDP2 does, in the numerics of ``mixprec.fp8``: one scale for the whole weight, from the amax of all
    shards (one all-reduce of a scalar), each rank casts its shard with it and sends the FP8 bytes as a ``uint8``
    view (gloo has no FP8 type); every rank dequantizes the gathered bytes with the same scale."""
    from .fp8 import E4M3, _quantize, scale_from_amax

    world = dist.get_world_size(group)
    amax = shard.detach().abs().amax().float().reshape(1)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)  # the whole weight's amax: one scale on every rank
    scale = scale_from_amax(amax[0], E4M3)
    data = _quantize(shard, scale, E4M3).values.to(torch.float8_e4m3fn).view(torch.uint8)  # exact: values on E4M3's grid
    check_collective_dtype(data.dtype, dist.get_backend(group))
    gathered = [torch.empty_like(data) for _ in range(world)]
    dist.all_gather(gathered, data.contiguous(), group=group)
    return torch.cat([d.view(torch.float8_e4m3fn).float() for d in gathered]) / scale


# --- the trainer ---------------------------------------------------------------------------------


def step_policy(setting: Setting):
    """The policy ``train_step`` runs for ``setting``: under FSDP2 the sharded FP32 parameters are the masters and
    ``MixedPrecisionPolicy`` makes the low-precision working copy, so the step keeps no second master copy."""
    policy = get_policy(setting.policy)
    if setting.strategy == "fsdp2":
        return dataclasses.replace(policy, param_dtype=torch.float32, master_weights=False)
    return policy


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def train(setting: Setting | str, steps: int = 5, global_batch: int = 8, block_size: int = 32, size: str = "tiny",
          n_stories: int = 200, seed: int = 0, lr: float | None = None, device: str | None = None, progress: bool = False) -> dict:
    """Train a fresh storyteller under ``setting`` on this process's rank; returns what the run measured.

    Every rank draws the same global batch of ``global_batch`` windows and trains on its own contiguous slice of
    it, so the ranks together see exactly what one process would (``single`` runs the whole batch here, without
    ``torch.distributed``). ``ddp`` and ``fsdp2`` need an initialized process group (``torchrun``, ``launch``).
    ``device``: ``"cpu"`` or ``"cuda"`` for ``single`` (default: CUDA when there is a GPU); a process group
    uses its backend's device (NCCL: this rank's GPU; gloo: the CPU).
    The step is ``mixprec.step.train_step``; the losses reported are the global batch's mean, every step.
    """
    import time

    from .story import SIZES, build_model, encode, load_stories, train_tokenizer
    from .story.train import lm_loss, warmup_cosine

    setting = Setting.parse(setting) if isinstance(setting, str) else setting
    for name, value, low in (("steps", steps, 1), ("global_batch", global_batch, 1), ("block_size", block_size, 2), ("n_stories", n_stories, 20)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {sorted(SIZES)}")
    distributed = dist.is_available() and dist.is_initialized()
    if setting.strategy != "single" and not distributed:
        raise RuntimeError(f"{setting.strategy} needs a process group: start it with torchrun (or mixprec.distributed.launch)")
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if setting.strategy == "single" and world > 1:
        raise ValueError(f"strategy 'single' runs in one process; this group has {world}: use ddp or fsdp2")
    if global_batch % world:
        raise ValueError(f"global_batch {global_batch} must be a multiple of the world size {world} (equal slices per rank)")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    if distributed:
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
    else:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stories = load_stories("offline", n=n_stories, seed=seed)
    tokenizer = train_tokenizer(stories.train)
    data = encode(stories, tokenizer)
    model = build_model(size, len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id).to(device)
    predicted = communication_per_step(model, setting, world)
    n_params = sum(p.numel() for p in model.parameters())
    notes = []
    if setting.strategy == "fsdp2":
        mp = setting.mixed_precision()
        shard(model, mp)
        notes.append(f"FSDP2 MixedPrecisionPolicy(param_dtype={mp.param_dtype}, reduce_dtype={mp.reduce_dtype})")
    policy = step_policy(setting)
    setup = policy.setup(model.train(), lr=lr if lr is not None else SIZES[size].lr, weight_decay=SIZES[size].weight_decay,
                         loss_fn=lm_loss, schedule=warmup_cosine(max(1, steps // 10), steps), clip=1.0, device=device, seed=seed)
    if setting.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        setup.forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        notes.append(f"DDP hook: {register_hook(setup.forward, setting.hook)}")
    notes += setup.notes
    generator = torch.Generator().manual_seed(seed)
    share = global_batch // world
    history = {"loss": [], "grad_norm": [], "skipped": [], "step_time": [], "communicated": []}
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=setting.spec, leave=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        x, y = data.batch(global_batch, block_size, generator)  # the same global batch on every rank
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        start = time.perf_counter()
        with count_collectives() if distributed else contextlib.nullcontext({}) as counts:
            result = train_step(setup, x, y)
        history["step_time"].append(time.perf_counter() - start)
        loss = torch.tensor([result.loss], dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(loss)  # the global batch's mean: every rank's slice has as many tokens
        history["loss"].append(loss.item() / world)
        history["grad_norm"].append(result.grad_norm)
        history["skipped"].append(result.skipped)
        history["communicated"].append({k: v for k, v in counts.items() if v})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    state = [t for s in setup.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    memory = {"parameters": _local_bytes(model.parameters()),
              "master_weights": _local_bytes(setup.master.master) if setup.master is not None else 0,
              "gradients": _local_bytes(p for p in setup.optimizer.param_groups[0]["params"]),  # one per master, same size
              "optimizer_state": _local_bytes(state)}
    if device.type == "cuda":
        memory["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return {"setting": setting.spec, "strategy": setting.strategy, "policy": setting.policy, "world_size": world,
            "communicated_dtypes": {k: str(v).removeprefix("torch.") for k, v in setting.communicated_dtypes().items()},
            "predicted_bytes": predicted, "memory_per_rank": memory, "notes": notes,
            "parameters": n_params, **history}


# --- the launcher ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """``torchrun --nproc-per-node N -m mixprec.distributed train --setting ... --out result.json``."""
    from . import cli, hw

    parser = cli.Parser(prog="torchrun --nproc-per-node N -m mixprec.distributed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the storyteller under one or more settings, one after another")
    t.add_argument("--setting", action="append", required=True, type=_setting_arg,
                   help="strategy,policy[,reduce=DTYPE][,hook=DTYPE], e.g. fsdp2,bf16-master or ddp,fp32,hook=bf16; repeatable")
    t.add_argument("--steps", type=cli.at_least(1), default=5)
    t.add_argument("--global-batch", type=cli.at_least(1), default=8)
    t.add_argument("--block-size", type=cli.at_least(2), default=32)
    t.add_argument("--size", default="tiny")
    t.add_argument("--stories", type=cli.at_least(20), default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=cli.positive_float, default=None)
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one GPU per process with NCCL where there are GPUs, else CPU processes with gloo")
    t.add_argument("--out", type=Path, help="write the JSON result here (rank 0)")
    t.add_argument("--progress", action="store_true", help="a progress bar on rank 0")
    args = parser.parse_args(argv)
    if args.out is not None:
        cli.check_out_file(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    launched = "WORLD_SIZE" in os.environ
    if launched:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    world = dist.get_world_size() if launched else 1
    try:
        runs = [train(s, steps=args.steps, global_batch=args.global_batch, block_size=args.block_size, size=args.size,
                      n_stories=args.stories, seed=args.seed, lr=args.lr, progress=args.progress) for s in args.setting]
    finally:
        if launched:
            dist.destroy_process_group()
    command = ["torchrun", f"--nproc-per-node {world}", "-m", "mixprec.distributed", *(sys.argv[1:] if argv is None else argv)]
    result = {**hw.provenance(device, argv=command), "command": " ".join(command), "world_size": world, "backend": backend if launched else None,
              "steps": args.steps, "global_batch": args.global_batch, "block_size": args.block_size, "size": args.size, "runs": runs}
    if int(os.environ.get("RANK", 0)) == 0 and args.out is not None:
        cli.write_out_file(args.out, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def _setting_arg(text: str) -> Setting:
    import argparse

    try:
        return Setting.parse(text)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def free_port() -> int:
    """A TCP port that nothing on this machine listens on now (for the rendezvous of a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(settings: list[str | Setting], nproc: int = 2, steps: int = 5, global_batch: int = 8, block_size: int = 32,
           size: str = "tiny", n_stories: int = 200, seed: int = 0, lr: float | None = None, timeout: float = 300,
           device: str = "auto", out: str | Path | None = None) -> dict:
    """Run ``torchrun --nproc-per-node nproc -m mixprec.distributed train ...`` as a subprocess and return its JSON result.

    The subprocess is ``sys.executable -m torch.distributed.run`` with this process's environment, on a free
    local port. ``device``: ``auto`` (NCCL on the GPUs where there are some, else gloo on the CPU), ``cpu`` or ``cuda``.
    A failure (or more than ``timeout`` seconds) raises ``RuntimeError`` with the end of its output."""
    import tempfile

    if isinstance(settings, (str, Setting)):
        settings = [settings]
    specs = [(Setting.parse(s) if isinstance(s, str) else s).spec for s in settings]  # checked here, before any process starts
    if not specs:
        raise ValueError("settings must name at least one setting, e.g. ['fsdp2,fp32']")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out) if out is not None else Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), "-m", "mixprec.distributed", "train", "--steps", str(steps),
                   "--global-batch", str(global_batch), "--block-size", str(block_size), "--size", size, "--stories", str(n_stories),
                   "--seed", str(seed), "--device", device, "--out", str(target), *(a for s in specs for a in ("--setting", s))]
        if lr is not None:
            command += ["--lr", str(lr)]
        try:
            done = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            tail = (error.stderr or b"")[-3000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise RuntimeError(f"torchrun did not finish within {timeout} s: {' '.join(command)}\n{tail}") from None
        if done.returncode != 0 or not target.exists():
            raise RuntimeError(f"torchrun failed (exit status {done.returncode}): {' '.join(command)}\n"
                               f"{(done.stderr or done.stdout)[-3000:]}")
        return json.loads(target.read_text())


if __name__ == "__main__":
    main()
