"""Inference speed per precision, measured honestly, and a generator that picks its precision by budget.

``time_generation`` runs ``model.generate`` on a batch of copies of one prompt and counts only the
tokens each sequence really generated (up to and including EOS), never the padding after it.
``AdaptiveGenerator`` is the corrected form of the sources' "adaptive precision" generator: it keeps
one model copy per precision instead of converting a single model back and forth (which rounds the
FP32 weights for good), measures each precision's speed and distance from FP32 on this hardware, and
chooses by the caller's latency or quality budget.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .generate import InferenceModel, check_context, for_inference, until_eos
from .metrics import next_token_kl


@dataclass(frozen=True)
class GenerationTiming:
    precision: str
    batch_size: int
    seconds: float  # wall-clock of one generate() call, median over repeats
    generated_tokens: int  # summed over the batch, each sequence up to and including its EOS
    peak_memory: int | None  # bytes, CUDA only
    weight_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    @property
    def latency_per_token(self) -> float:
        """Seconds per generation step, seen by one reader waiting for their story."""
        return self.seconds / max(1, self.generated_tokens / self.batch_size)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def count_generated(new_tokens: torch.Tensor, eos_token_id: int) -> int:
    """Tokens actually generated in a (batch, steps) block: each row up to and including its first EOS."""
    return sum(len(until_eos(row, eos_token_id)) for row in new_tokens.tolist())


def time_generation(model, tokenizer, prompt: str, precision: str | None = None, batch_size: int = 1, max_new_tokens: int = 64,
                    repeat: int = 3, seed: int = 0) -> GenerationTiming:
    """Median wall-clock time of sampling ``batch_size`` continuations of ``prompt`` at ``precision``.

    One warm-up call first; on a GPU the clock is read after ``torch.cuda.synchronize``. ``precision``
    defaults to an ``InferenceModel``'s own (another one is refused: the timing would be mislabelled), else ``fp32``.
    """
    if batch_size < 1 or max_new_tokens < 1 or repeat < 1:
        raise ValueError(f"batch_size, max_new_tokens and repeat must be >= 1; got {batch_size}, {max_new_tokens}, {repeat}")
    prepared = for_inference(model, precision)
    precision = prepared.precision
    device = next(prepared.model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    check_context(prepared, ids.shape[1], max_new_tokens)
    ids = ids.to(device).repeat(batch_size, 1)
    options = dict(max_new_tokens=max_new_tokens, do_sample=True, top_k=0, pad_token_id=tokenizer.eos_token_id,
                   eos_token_id=tokenizer.eos_token_id, attention_mask=torch.ones_like(ids))
    times, counts = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), prepared.context():
        for i in range(repeat + 1):
            torch.manual_seed(seed + i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = prepared.model.generate(ids, **options)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:  # the first call is the warm-up
                times.append(time.perf_counter() - start)
                counts.append(count_generated(out[:, ids.shape[1]:], tokenizer.eos_token_id))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    middle = sorted(range(repeat), key=lambda i: times[i])[repeat // 2]
    return GenerationTiming(precision, batch_size, times[middle], counts[middle], peak, weight_bytes(prepared.model))


# --- choosing a precision by budget -------------------------------------------------------------

@dataclass(frozen=True)
class PrecisionProfile:
    """What one precision costs and how far it is from FP32, measured on this machine."""

    precision: str
    tokens_per_s: float  # batch 1, sampled generation
    kl_to_fp32: float  # mean next-token KL (nats) to the FP32 model on the calibration prompts
    weight_bytes: int


class AdaptiveGenerator:
    """Generate stories at the precision that fits a latency or quality budget on this hardware.

    One model copy per precision is made once and kept (``for_inference``); the FP32 model is never
    converted. ``calibrate`` measures each precision; ``choose`` then picks:

    - with ``latency_budget_s``: the closest to FP32 among those expected to finish in time, or the
      fastest if none does;
    - without it: the fastest whose KL to FP32 is at most ``max_kl``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")):
        if "fp32" not in precisions:
            raise ValueError("precisions must include 'fp32', the reference the others are measured against")
        self.tokenizer = tokenizer
        self.models: dict[str, InferenceModel] = {p: for_inference(model, p) for p in precisions}
        self.profiles: dict[str, PrecisionProfile] = {}

    def calibrate(self, prompts: list[str], new_tokens: int = 32, repeat: int = 3) -> list[PrecisionProfile]:
        if not prompts:
            raise ValueError("calibrate needs at least one prompt")
        ids = [self.tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
        for name, prepared in self.models.items():
            speed = time_generation(prepared, self.tokenizer, prompts[0], name, 1, new_tokens, repeat)
            kl = statistics.mean(float(next_token_kl(self.models["fp32"], prepared, i).mean()) for i in ids)
            self.profiles[name] = PrecisionProfile(name, speed.tokens_per_s, kl, speed.weight_bytes)
        return list(self.profiles.values())

    def choose(self, new_tokens: int, latency_budget_s: float | None = None, max_kl: float = 1e-2) -> str:
        if not self.profiles:
            raise RuntimeError("call calibrate(prompts) first: the choice rests on measurements of this machine")
        profiles = list(self.profiles.values())
        if latency_budget_s is not None:
            in_time = [p for p in profiles if new_tokens / p.tokens_per_s <= latency_budget_s]
            if not in_time:
                return max(profiles, key=lambda p: p.tokens_per_s).precision
            return min(in_time, key=lambda p: p.kl_to_fp32).precision
        good = [p for p in profiles if p.kl_to_fp32 <= max_kl] or [self.profiles["fp32"]]
        return max(good, key=lambda p: p.tokens_per_s).precision

    def generate(self, prompt: str, new_tokens: int = 100, latency_budget_s: float | None = None, max_kl: float = 1e-2,
                 seed: int = 0):
        """(the ``Generation``, the precision chosen)."""
        from .generate import generate

        precision = self.choose(new_tokens, latency_budget_s, max_kl)
        return generate(self.models[precision], self.tokenizer, prompt, seed=seed, max_new_tokens=new_tokens), precision
