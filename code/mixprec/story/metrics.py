"""How good, and how far from FP32, a model's stories are."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def perplexity(mean_loss: float) -> float:
    """exp of the mean next-token cross-entropy (in nats), e.g. from ``story.train.evaluate``.

    A loss beyond float range (about 709.8 nats) gives inf, NaN gives NaN; a negative loss is an error
    (a cross-entropy cannot be negative).
    """
    if isinstance(mean_loss, torch.Tensor) and mean_loss.numel() == 1:
        mean_loss = mean_loss.item()
    if isinstance(mean_loss, bool) or not isinstance(mean_loss, (int, float)):
        raise TypeError(f"mean_loss must be a number (nats), got {mean_loss!r}")
    if mean_loss < 0:
        raise ValueError(f"mean_loss is a cross-entropy and cannot be negative, got {mean_loss!r}")
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def unigram_entropy(ids: torch.Tensor) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores all context."""
    counts = torch.bincount(ids.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) per position, in nats, from two sets of logits (..., vocab); computed in FP64."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    log_p_ref = F.log_softmax(reference_logits.double(), dim=-1)
    log_p = F.log_softmax(logits.double(), dim=-1)
    if torch.isnan(log_p_ref).any() or torch.isnan(log_p).any():
        raise ValueError("logits contain NaN, or a position whose logits are all -inf (no token possible)")
    p_ref = log_p_ref.exp()
    # A token the reference rules out (-inf logit, p_ref = 0) adds nothing, even where p rules it out too
    # (0 · (-inf + inf) would be NaN); one the reference allows and p rules out makes the KL infinite.
    return torch.where(p_ref > 0, p_ref * (log_p_ref - log_p), torch.zeros_like(p_ref)).sum(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position, computed in FP64: lower is "sharper"."""
    log_p = F.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def next_token_logits(prepared, input_ids: torch.Tensor) -> torch.Tensor:
    """FP32 copy of the logits an ``InferenceModel`` gives on ``input_ids`` (batch, positions, vocab), on the CPU."""
    device = next(prepared.model.parameters()).device
    with prepared.context():
        return prepared.model(input_ids.to(device)).logits.float().cpu()


def next_token_kl(reference, other, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position KL of ``other``'s next-token distribution against ``reference``'s, on the same prefixes.

    Both are ``InferenceModel``s (``story.generate.for_inference``); returns (batch, positions).
    """
    return token_kl(next_token_logits(reference, input_ids), next_token_logits(other, input_ids))


@dataclass(frozen=True)
class Agreement:
    fraction: float  # positions where both sequences have the same token, over the shorter length
    first_divergence: int | None  # index of the first differing token; None if one is a prefix of the other


def greedy_agreement(reference: Sequence[int], other: Sequence[int]) -> Agreement:
    """Token-by-token agreement of two generated sequences (e.g. greedy FP32 and greedy BF16)."""
    n = min(len(reference), len(other))
    if n == 0:
        return Agreement(float("nan"), None)
    same = [a == b for a, b in zip(reference[:n], other[:n])]
    first = next((i for i, s in enumerate(same) if not s), None)
    return Agreement(sum(same) / n, first)


def distinct_n(texts: Sequence[str] | str, n: int = 2) -> float:
    """Distinct n-grams of words over all n-grams, pooled over ``texts`` (Li et al., 2016); 1.0 means no repeats."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    texts = [texts] if isinstance(texts, str) else texts
    grams = Counter()
    for text in texts:
        words = text.split()
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0
