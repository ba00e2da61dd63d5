"""The storyteller: corpus, tokenizer, GPT-2 model, trainer, generation and metrics.

``storyteller()`` is the shortcut the chapters use: it returns a trained model, cached on disk.
"""

from __future__ import annotations

import json

from ..cache import cache_key
from ..step import TrainHistory
from .corpus import GrammarScore, StoryData, generate_stories, grammar_score, load_stories, split_sentences
from .data import TokenData, encode
from .generate import Generation, InferenceModel, for_inference, generate
from .inference import AdaptiveGenerator, GenerationTiming, PrecisionProfile, count_generated, time_generation
from .metrics import distinct_n, greedy_agreement, next_token_kl, next_token_logits, perplexity, token_entropy, token_kl, unigram_entropy
from .model import SIZES, build_model, count_parameters, load_pretrained_gpt2
from .tokenizer import train_tokenizer
from .train import compare, evaluate, gradient_sample, train

__all__ = [
    "SIZES", "AdaptiveGenerator", "GenerationTiming", "PrecisionProfile", "count_generated", "next_token_logits", "time_generation",
    "token_entropy", "GrammarScore", "Generation", "InferenceModel", "StoryData", "TokenData", "TrainHistory", "build_model", "compare", "count_parameters",
    "distinct_n", "encode", "evaluate", "for_inference", "gradient_sample", "generate", "generate_stories", "grammar_score", "greedy_agreement",
    "load_pretrained_gpt2", "load_stories", "next_token_kl", "perplexity", "split_sentences", "storyteller", "token_kl", "train",
    "train_tokenizer", "unigram_entropy",
]


def storyteller(size: str = "tiny", steps: int = 1000, precision: str = "fp32", n_stories: int = 20_000, seed: int = 0, **train_options):
    """A trained storyteller, its tokenizer, token data and training history, cached on disk.

    The cache key covers every argument and the library version, so chapters that ask for the same
    model during one book build share one training run.
    """
    from transformers import GPT2LMHeadModel

    if str(precision).startswith("fp8"):
        raise ValueError("storyteller() caches plain GPT-2 checkpoints; train an fp8 model with story.train on a copy instead")
    progress = train_options.pop("progress", True)  # how it is shown does not change what is trained: not part of the key
    stories = load_stories("offline", n=n_stories, seed=seed)
    tokenizer = train_tokenizer(stories.train)
    data = encode(stories, tokenizer)
    path = cache_key("storyteller", size=size, steps=steps, precision=precision, n_stories=n_stories, seed=seed, options=train_options)
    if (path / "history.json").exists():
        model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="sdpa")
        history = TrainHistory(**json.loads((path / "history.json").read_text()))
        return model, tokenizer, data, history
    model = build_model(size, len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id)
    settings = {"lr": SIZES[size].lr, "weight_decay": SIZES[size].weight_decay, **train_options}
    history = train(model, data, precision=precision, steps=steps, seed=seed, progress=progress, **settings)
    model.save_pretrained(path)
    (path / "history.json").write_text(json.dumps(history.as_dict()))
    return model, tokenizer, data, history
