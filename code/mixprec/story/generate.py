"""Story generation at a chosen inference precision, without touching the caller's model.

Converting a model in place (``model.half()`` … ``model.float()``) to compare precisions is a trap:
the round trip FP32 → FP16 → FP32 rounds every weight, so every later "FP32" result comes from
FP16 weights. ``for_inference`` therefore returns a converted *copy* when a conversion is needed.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from ..amp import Policy, get_policy


@dataclass
class InferenceModel:
    """A model ready to run at one precision: the model (maybe a converted copy) and the policy to run it under."""

    model: torch.nn.Module
    precision: str
    policy: Policy = field(default_factory=lambda: get_policy("fp32"))

    @contextlib.contextmanager
    def context(self):
        """Inference mode, plus the policy's autocast (native or emulated) or rounding."""
        device = next(self.model.parameters()).device
        with torch.inference_mode(), self.policy.compute(device):
            yield


def for_inference(model: torch.nn.Module, precision: str | Policy | None = None) -> InferenceModel:
    """``model`` prepared for inference under a precision policy (``mixprec.amp``, default ``fp32``); the caller's model is never modified.

    An ``InferenceModel`` is returned as it is when ``precision`` is ``None`` or its own policy;
    another precision is refused (it was prepared once: converting it again would stack conversions).

    Every policy name works, with the same meaning as in training: ``fp16``/``bf16`` (inference
    policies) run a copy with all weights converted (pure low precision); ``fp16-amp``/``bf16-amp``
    run the model itself under autocast, native on a GPU, emulated elsewhere; ``fp8-weight`` runs a
    copy whose weight matrices are rounded to E4M3 with one scale per tensor (weight-only FP8,
    emulated; activations stay FP32); ``round-all:<format>`` rounds every op result. A conversion is
    always made on a copy (``Policy.inference_model``).
    """
    if isinstance(model, InferenceModel):
        if precision is None or get_policy(precision).name == model.precision:
            return model
        raise ValueError(f"this model is already prepared for inference at {model.precision!r}, not {precision!r}: "
                         f"prepare the original model with for_inference(model, {precision!r}), or leave precision out")
    policy = get_policy("fp32" if precision is None else precision)  # unknown names fail with the list of valid ones
    return InferenceModel(policy.inference_model(model), policy.name, policy)


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


def check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation that cannot fit: an empty prompt, or prompt + new tokens past the context window.

    ``model`` is a transformers model or an ``InferenceModel``; its ``config.n_positions`` is the
    window (a GPT-2 has no positions beyond it: the position embedding lookup would fail).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty: give at least one token of text (e.g. 'Once upon a time')")
    n_positions = getattr(getattr(getattr(model, "model", model), "config", None), "n_positions", None)
    if isinstance(n_positions, int) and prompt_tokens + max_new_tokens > n_positions:
        room = n_positions - prompt_tokens
        fix = f"ask for at most {room} new tokens" if room >= 1 else f"shorten the prompt to fewer than {n_positions} tokens"
        raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context window of {n_positions} positions: {fix}")


def generate(model, tokenizer, prompt: str, precision: str | None = None, seed: int = 0, max_new_tokens: int = 100, greedy: bool = False,
             temperature: float = 1.0, top_k: int | None = None) -> Generation:
    """Continue ``prompt`` with ``model.generate`` (KV cache on) at ``precision``; stops at EOS.

    Sampling is seeded with ``seed`` without disturbing the caller's random state. ``model`` may
    be an ``InferenceModel`` from ``for_inference`` to avoid copying it on every call (``precision``
    then defaults to its own; another one is refused), else ``precision`` defaults to ``fp32``. Only tokens
    actually generated are counted, not padding after EOS.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if not greedy and not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
    inputs = tokenizer(prompt, return_tensors="pt")
    check_context(model, inputs["input_ids"].shape[1], max_new_tokens)
    prepared = for_inference(model, precision)
    device = next(prepared.model.parameters()).device
    inputs = inputs.to(device)
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
