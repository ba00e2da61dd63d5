"""The storyteller's training loop: batches, schedule, evaluation and timing around ``mixprec.step.train_step``.

Every precision question is the policy's (``mixprec.amp``); every step is ``train_step``'s. This
file only feeds batches, times steps and evaluates.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import hw
from ..amp import Policy, get_policy
from ..step import TrainHistory, train_step
from .data import TokenData


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` updates, then cosine decay to ``min_ratio`` at ``total``."""
    if not (isinstance(min_ratio, (int, float)) and 0 <= min_ratio <= 1):
        raise ValueError(f"min_lr_ratio must be a number in [0, 1] (the final learning rate over the peak), got {min_ratio!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0 (updates), got {warmup!r}")

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter plus attention, 12·layers·block·width (PaLM, appendix B).

    Position embeddings are looked up, not multiplied, so they are left out; the token embedding
    counts, because the tied output layer multiplies by it.
    """
    config = model.config
    matmul_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * matmul_params + 12 * config.n_layer * block_size * config.n_embd


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, computed in FP32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_loss(output, targets: torch.Tensor) -> torch.Tensor:
    """``cross_entropy`` of a transformers model output (its ``.logits``) against the next tokens."""
    return cross_entropy(output.logits, targets)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, precision: Policy | str = "fp32", device: torch.device | str | None = None) -> float:
    """Mean loss over ``batches`` (from ``TokenData.eval_windows``), run under the policy's compute context."""
    policy = get_policy(precision)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with policy.whole_step(device):
            with policy.forward(device):
                output = model(x.to(device))
            loss = lm_loss(output, y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate needs at least one batch (e.g. data.eval_windows(batch_size, block_size, n) with n >= 1)")
    return total / count


def train(
    model: torch.nn.Module,
    data: TokenData,
    precision: str | Policy = "fp32",
    steps: int = 300,
    batch_size: int = 16,
    block_size: int = 128,
    lr: float = 1e-2,
    warmup: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
    seed: int = 0,
    scaler=None,
    eval_every: int | None = None,
    eval_batches: int = 8,
    device: str | torch.device | None = None,
    compile: bool = False,
    progress: bool = True,
    after_backward: Callable[[int, torch.nn.Module], None] | None = None,
    record_zero_grads: bool = False,
) -> TrainHistory:
    """Train ``model`` in place on ``data`` under a precision policy; returns the ``TrainHistory``.

    precision: a name from ``mixprec.amp.POLICY_NAMES``, e.g. ``"bf16-amp"`` or ``"round-all:fp16"``.
        ``bf16-pure`` and ``*-master`` convert the model's weights to low precision, ``round-all:*``
        rounds them, and ``fp8`` replaces its linear layers: pass a copy if you need the original.
    scaler: a loss scaler with the ``torch.amp.GradScaler`` interface (scale, unscale_, step, update,
        get_scale). None: the policy's default (a GradScaler for ``fp16-amp``, none otherwise).
        False: no scaling, even for ``fp16-amp`` (a disabled scaler, ``NoLossScaler``).
    lr, weight_decay: the defaults suit the ``tiny`` size; ``story.SIZES[size]`` has settings for the others.
    clip: the gradient-norm threshold, or None for no clipping.
    eval_every: evaluate on the validation windows every this many steps (and always at the end).
    after_backward: called as ``after_backward(step, model)`` between backward and unscaling; a hook
        for experiments, e.g. planting an inf in a gradient.
    record_zero_grads: record in ``history.zero_grad_fraction`` the fraction of parameter-gradient
        values that are exactly 0 after each backward pass, before unscaling (what underflow flushed).
    """
    policy = get_policy(precision)
    if steps < 1 or batch_size < 1 or block_size < 2:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and block_size >= 2; got {steps}, {batch_size}, {block_size}")
    if block_size > model.config.n_positions:
        raise ValueError(f"block_size {block_size} exceeds the model's n_positions {model.config.n_positions}")
    if isinstance(eval_batches, bool) or not isinstance(eval_batches, int) or eval_batches < 1:  # the final evaluation needs one
        raise ValueError(f"eval_batches must be an integer >= 1 (the validation batches evaluated), got {eval_batches!r}")
    eval_set = data.eval_windows(batch_size, block_size, eval_batches)  # before any step: a too-short stream fails now
    warmup = max(1, steps // 10) if warmup is None else warmup
    torch.manual_seed(seed)
    setup = policy.setup(model.train(), lr=lr, weight_decay=weight_decay, loss_fn=lm_loss, schedule=warmup_cosine(warmup, steps, min_lr_ratio),
                         scaler=scaler, clip=clip, device=device if device is not None else hw.default_device(), seed=seed, compile=compile)
    device = setup.device
    history = TrainHistory(policy.name, hw.device_info(device).name, sum(p.numel() for p in model.parameters()), batch_size * block_size,
                           notes=list(setup.notes))
    peak = hw.peak_tflops(history.device, policy.peak_dtype()) if device.type == "cuda" else None
    flops = flops_per_token(model, block_size)
    generator = torch.Generator().manual_seed(seed)
    bar = _progress(steps, policy.name) if progress else None
    for step in range(steps):
        x, y = (t.to(device, non_blocking=True) for t in data.batch(batch_size, block_size, generator))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        hook = _after_backward_hook(step, history, after_backward, record_zero_grads)
        result = train_step(setup, x, y, after_backward=hook)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        history.append(result, elapsed, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                       flops * history.tokens_per_step / elapsed / (peak * 1e12) if peak else None)
        if (eval_every and (step + 1) % eval_every == 0) or step == steps - 1:
            history.val_step.append(step)
            history.val_loss.append(evaluate(model, eval_set, policy, device))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return history


_TRAIN_DEFAULTS = {name: p.default for name, p in inspect.signature(train).parameters.items() if p.default is not inspect.Parameter.empty}


def _after_backward_hook(step: int, history: TrainHistory, after_backward, record_zero_grads: bool):
    """What ``train_step`` calls between backward and unscaling: the zero-gradient count, then the user's hook."""
    if not (after_backward or record_zero_grads):
        return None

    def hook(model):
        if record_zero_grads:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            zeros = sum(int((g == 0).sum()) for g in grads)
            history.zero_grad_fraction.append(zeros / max(1, sum(g.numel() for g in grads)))
        if after_backward:
            after_backward(step, model)

    return hook


def _progress(total: int, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, leave=False)


def gradient_sample(model: torch.nn.Module, data: TokenData, batches: int = 4, batch_size: int = 16, block_size: int = 128,
                    seed: int = 0) -> torch.Tensor:
    """Every parameter-gradient value of ``batches`` separate FP32 backward passes, as one flat tensor.

    The model's weights are not changed; its ``.grad`` fields are cleared afterwards.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(batches):
        x, y = (t.to(device) for t in data.batch(batch_size, block_size, generator))
        model.zero_grad(set_to_none=True)
        cross_entropy(model(x).logits, y).backward()
        values.append(torch.cat([p.grad.detach().flatten().float().cpu() for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    return torch.cat(values)


def compare(setups: dict[str, str | dict], data: TokenData, vocab_size: int, eos_token_id: int = 0, size: str = "tiny",
            seed: int = 0, models: dict | None = None, **train_options) -> dict[str, TrainHistory]:
    """Train one fresh model per setup, all from the same initial weights, batches and seed; returns the histories.

    ``setups`` maps a label to a policy name, or to a dict of ``train`` options (``precision``,
    ``scaler``, ``lr``, ``after_backward``…) that override ``train_options`` for that setup. Pass a
    dict as ``models`` to keep the trained models, under the same labels.

    A run is a pure function of its settings, the data and the library, so each is cached on disk
    (``mixprec.cache``) like the storyteller: a chapter and its Colab notebook, or two chapters that
    train the same baseline, train it once; two processes that need the same runs at the same time
    split them. Not cached: a run with a setting that cannot be keyed (a callable ``after_backward``;
    ``record_zero_grads`` can be), or a kept model whose policy changes its structure or dtypes (FP8
    layers, low-precision weights).
    """
    if not isinstance(setups, dict) or not setups:
        raise ValueError("setups must be a non-empty dict {label: policy name or dict of train options}")
    from ..cache import split_with_other_processes

    options = {name: {"seed": seed, **train_options, **({"precision": setup} if isinstance(setup, str) else dict(setup))}
               for name, setup in setups.items()}
    done = split_with_other_processes(
        {name: lambda wait, name=name: _one_run(size, vocab_size, eos_token_id, seed, data, options[name], keep_model=models is not None,
                                                wait=wait)
         for name in setups})
    if models is not None:
        models.update({name: done[name][1] for name in setups})
    return {name: done[name][0] for name in setups}


def _one_run(size: str, vocab_size: int, eos_token_id: int, seed: int, data: TokenData, options: dict, keep_model: bool,
             wait: bool = True):
    """One ``compare`` run: (history, model or None), from the cache where it can be keyed; ``BUSY`` if
    ``wait`` is False and another process is training it now."""
    from ..cache import CacheKeyError, cached, key_value, write_json
    from .model import build_model

    def fresh():
        return build_model(size, vocab_size, seed=seed, eos_token_id=eos_token_id)

    def run():
        model = fresh()
        return train(model, data, **options), model

    policy = get_policy(options.get("precision", "fp32"))
    plain = policy.fp8 is None and policy.fp4 is None and policy.param_dtype == torch.float32 and not policy.master_weights
    # Keyed with train()'s defaults filled in and the device resolved, so that the same run asked for in
    # other words (lr=1e-2 spelt out or left to the default) is trained once; how progress is shown changes nothing.
    keyed = {**_TRAIN_DEFAULTS, **options, "device": str(torch.device(options.get("device") or hw.default_device()))}
    config = {"size": size, "vocab_size": vocab_size, "eos_token_id": eos_token_id, "init_seed": seed, "data": data.fingerprint(),
              "options": {k: v for k, v in keyed.items() if k != "progress"}}
    try:
        key_value(config, "compare")
    except CacheKeyError:
        return run()
    if keep_model and not plain:
        return run()

    def build(directory):
        history, model = run()
        write_json(directory / "history.json", history.as_dict())
        write_json(directory / "mode.json", {"training": model.training})
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / "model.pt")
        return history, model

    def load(directory):
        import json

        history = TrainHistory(**json.loads((directory / "history.json").read_text()))
        if not keep_model:
            return history, None
        model = fresh()
        model.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
        model.train(json.loads((directory / "mode.json").read_text())["training"])  # as train() left it
        return history, model.to(options.get("device") or hw.default_device())

    return cached("compare", config, build, load, wait=wait)
