"""The storyteller: corpus, tokenizer, GPT-2 model, trainer, generation and metrics.

``storyteller()`` is the shortcut the chapters use: it returns a trained model, cached on disk.
"""

from __future__ import annotations

import json

from ..cache import cached, key_value, write_json
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
    "load_pretrained_gpt2", "load_stories", "model_for_generation", "next_token_kl", "perplexity", "split_sentences", "storyteller", "token_kl", "train",
    "train_tokenizer", "unigram_entropy",
]


def storyteller(size: str = "tiny", steps: int = 1000, precision: str = "fp32", n_stories: int = 20_000, seed: int = 0, **train_options):
    """A trained storyteller, its tokenizer, token data and training history, cached on disk.

    The cache key covers every argument, the library version and the library source
    (``mixprec.cache``), so chapters that ask for the same model during one book build share one
    training run, and a change to the training code retrains. Options that are objects are keyed by
    their full configuration (a loss scaler by its class and ``state_dict()``); a callable option
    (``after_backward``) is refused: call ``story.train`` for that. A damaged entry is rebuilt.

    The model comes back the same way whether it was trained now or loaded: on the CPU, in ``eval()``
    mode (training runs on the default device; move the model where you need it).
    """
    from transformers import GPT2LMHeadModel

    from ..amp import get_policy

    if get_policy(precision).fp8 or get_policy(precision).fp4:  # checked first (a name or a Policy object): before any stories or tokenizer are made
        raise ValueError("storyteller() caches plain GPT-2 checkpoints; train an fp8 model with story.train on a copy instead")
    progress = train_options.pop("progress", True)  # how it is shown does not change what is trained: not part of the key
    config = {"size": size, "steps": steps, "precision": precision, "n_stories": n_stories, "seed": seed, "options": train_options}
    key_value(config, "storyteller")  # refuse an option that cannot be keyed before any work
    stories = load_stories("offline", n=n_stories, seed=seed)
    tokenizer = train_tokenizer(stories.train)
    data = encode(stories, tokenizer)

    def build(directory):
        model = build_model(size, len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id)
        settings = {"lr": SIZES[size].lr, "weight_decay": SIZES[size].weight_decay, **train_options}
        history = train(model, data, precision=precision, steps=steps, seed=seed, progress=progress, **settings)
        model.save_pretrained(directory)
        write_json(directory / "history.json", history.as_dict())
        return model.cpu().eval(), history

    def load(directory):
        model = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="sdpa")
        return model, TrainHistory(**json.loads((directory / "history.json").read_text()))

    model, history = cached("storyteller", config, build, load)
    return model, tokenizer, data, history


def model_for_generation(pretrained: bool = False, n_stories: int = 20_000) -> tuple:
    """The model a generation experiment reads: ``(model, tokenizer, data, source)``.

    ``source`` is ``"storyteller"`` (the tiny model trained here) or, with ``pretrained=True`` and the hub
    reachable, ``"gpt2"`` (OpenAI's GPT-2 small; if it cannot be loaded, the storyteller, with the reason
    printed). Either way ``data`` holds the offline stories encoded with the returned ``tokenizer``: ids
    from one tokenizer fed to a model of another give garbage perplexities without any error.
    """
    from .corpus import hub_reachable

    model, tokenizer, data, _ = storyteller("tiny", progress=False)
    if not (pretrained and hub_reachable()):
        return model, tokenizer, data, "storyteller"
    try:
        model, tokenizer = load_pretrained_gpt2("gpt2")
    except RuntimeError as error:
        print("using the storyteller instead:", error)
        return model, tokenizer, data, "storyteller"
    return model, tokenizer, encode(load_stories("offline", n=n_stories), tokenizer), "gpt2"
