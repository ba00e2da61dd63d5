"""Story generation at a chosen inference precision, without touching the caller's model.

Converting a model in place (``model.half()`` … ``model.float()``) to compare precisions is a trap:
the round trip FP32 → FP16 → FP32 rounds every weight, so every later "FP32" result comes from
FP16 weights. ``for_inference`` therefore returns a converted *copy* when a conversion is needed.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch

from ..emulate import EmulatedPrecision
from ..formats import E4M3, get_format

INFERENCE_PRECISIONS = ("fp32", "fp16", "bf16", "fp16-amp", "bf16-amp", "fp8-weight", "emulate:<format>")


@dataclass
class InferenceModel:
    """A model ready to run at one precision: the model (maybe a converted copy) and the context to run it in."""

    model: torch.nn.Module
    precision: str
    emulate: str | None = None
    autocast_dtype: torch.dtype | None = None

    @contextlib.contextmanager
    def context(self):
        """Inference mode, plus autocast or emulation where the precision asks for it."""
        device = next(self.model.parameters()).device
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.autocast_dtype is not None:
                stack.enter_context(torch.amp.autocast(device_type=device.type, dtype=self.autocast_dtype))
            if self.emulate is not None:
                stack.enter_context(EmulatedPrecision(self.emulate))
            yield


def for_inference(model: torch.nn.Module, precision: str = "fp32") -> InferenceModel:
    """``model`` prepared for inference at ``precision``; the caller's model is never modified.

    ``fp16``/``bf16``: a copy with all weights converted (pure low precision).
    ``fp16-amp``/``bf16-amp``: the model itself, run under autocast.
    ``fp8-weight``: a copy whose weight matrices are rounded to E4M3 with one scale per tensor
    (weight-only FP8, emulated; activations stay FP32).
    ``emulate:<format>``: the model itself, every op result rounded to the format.
    """
    if isinstance(model, InferenceModel):
        return model
    if precision == "fp32":
        return InferenceModel(model, precision)
    if precision in ("fp16", "bf16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return InferenceModel(copy.deepcopy(model).to(dtype), precision)
    if precision in ("fp16-amp", "bf16-amp"):
        return InferenceModel(model, precision, autocast_dtype=torch.float16 if precision == "fp16-amp" else torch.bfloat16)
    if precision == "fp8-weight":
        from ..fp8 import quantize_tensorwise

        quantized = copy.deepcopy(model)
        with torch.no_grad():
            for p in quantized.parameters():
                if p.dim() == 2:
                    p.copy_(quantize_tensorwise(p, E4M3).dequantize())
        return InferenceModel(quantized, precision)
    if precision.startswith("emulate:"):
        fmt = get_format(precision.removeprefix("emulate:")).name
        return InferenceModel(model, precision, emulate=fmt)
    raise ValueError(f"unknown inference precision {precision!r}; valid: {', '.join(INFERENCE_PRECISIONS)}")


def until_eos(token_ids: list[int], eos_token_id: int) -> list[int]:
    """The tokens really generated: up to and including the first EOS; what ``generate`` pads after it is dropped."""
    return token_ids[: token_ids.index(eos_token_id) + 1] if eos_token_id in token_ids else token_ids


@dataclass(frozen=True)
class Generation:
    text: str  # the continuation only, without the prompt
    prompt: str
    token_ids: list[int]  # generated tokens, up to and including EOS if it came
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")


def generate(model, tokenizer, prompt: str, precision: str = "fp32", seed: int = 0, max_new_tokens: int = 100, greedy: bool = False,
             temperature: float = 1.0, top_k: int | None = None) -> Generation:
    """Continue ``prompt`` with ``model.generate`` (KV cache on) at ``precision``; stops at EOS.

    Sampling is seeded with ``seed`` without disturbing the caller's random state. ``model`` may
    be an ``InferenceModel`` from ``for_inference`` to avoid copying it on every call. Only tokens
    actually generated are counted, not padding after EOS.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    prepared = for_inference(model, precision)
    device = next(prepared.model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    options = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    options.update(do_sample=False) if greedy else options.update(do_sample=True, temperature=temperature, top_k=top_k or 0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), prepared.context():
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = prepared.model.generate(**inputs, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    new = until_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), tokenizer.eos_token_id)
    return Generation(tokenizer.decode(new, skip_special_tokens=True), prompt, new, seconds)
