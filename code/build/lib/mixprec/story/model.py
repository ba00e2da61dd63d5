"""The storyteller: a ``transformers`` GPT-2 in named sizes, with PyTorch's fused attention (SDPA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Size:
    """Shape of a GPT-2 (``vocab_size`` None means "the tokenizer's"), and training settings that suit it."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    lr: float  # peak learning rate
    weight_decay: float
    vocab_size: int | None = None


SIZES: dict[str, Size] = {
    # tiny trains in about a minute on 2 CPU cores. Eight heads and no weight decay: with four heads, or
    # with decay, whether it learns to repeat the hero's name within that minute depended on the seed.
    "tiny": Size(n_layer=2, n_head=8, n_embd=128, n_positions=256, lr=1e-2, weight_decay=0.0),
    "small": Size(n_layer=6, n_head=10, n_embd=640, n_positions=512, lr=1e-3, weight_decay=0.1),  # ~30M parameters
    "gpt2-124m": Size(n_layer=12, n_head=12, n_embd=768, n_positions=1024, lr=6e-4, weight_decay=0.1, vocab_size=50257),  # GPT-2 small
}


def build_model(size: str = "tiny", vocab_size: int | None = None, seed: int = 0, eos_token_id: int = 0):
    """A freshly initialised ``GPT2LMHeadModel`` of a named size, in float32, with SDPA attention.

    vocab_size: the tokenizer's vocabulary; ``gpt2-124m`` keeps GPT-2's 50257 rows so that its
        parameter count and FLOPs are those of the real model (rows past the tokenizer stay unused).
    Dropout is off: the runs are short and it would only add noise to precision comparisons.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {sorted(SIZES)}")
    shape = SIZES[size]
    vocab = shape.vocab_size or vocab_size
    if vocab is None:
        raise ValueError(f"size {size!r} needs vocab_size (the tokenizer's len())")
    if shape.vocab_size and vocab_size and vocab_size > shape.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} exceeds {size}'s {shape.vocab_size}")
    config = GPT2Config(
        vocab_size=vocab, n_positions=shape.n_positions, n_embd=shape.n_embd, n_layer=shape.n_layer, n_head=shape.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied input/output embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def load_pretrained_gpt2(name: str = "gpt2"):
    """OpenAI's pretrained GPT-2 and its tokenizer from the Hugging Face hub (needs the network).

    Raises RuntimeError with the reason when it cannot be loaded; the chapters then fall back to the
    storyteller trained here.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    try:
        model = GPT2LMHeadModel.from_pretrained(name, attn_implementation="sdpa", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:  # offline, or the hub refused
        raise RuntimeError(f"could not load pretrained {name!r} from the hub ({type(error).__name__}: {error})") from error
    tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
