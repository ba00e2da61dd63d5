"""A byte-level BPE tokenizer trained on the story corpus, as a ``transformers`` tokenizer."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..cache import cached

EOS = "<|endoftext|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048, cache: bool = True):
    """Train (or load from the cache) a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Byte-level, like GPT-2's: any string encodes, nothing maps to an unknown token, and decoding
    gives back the exact text. ``<|endoftext|>`` separates stories and is the EOS and padding token.
    The cache key is a hash of the texts, the vocabulary size and the library source (``mixprec.cache``);
    a damaged cached file is rebuilt, never loaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("need at least one text to train a tokenizer")
    if not 257 <= vocab_size <= 65_536:
        raise ValueError(f"vocab_size must be in 257..65536 (256 bytes + EOS at least), got {vocab_size}")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()

    def build(directory=None):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        if directory is not None:
            tokenizer.save(str(directory / "tokenizer.json"))
        return tokenizer

    if cache:
        tokenizer = cached("tokenizer", {"texts": digest, "vocab_size": vocab_size}, build,
                           lambda entry: Tokenizer.from_file(str(entry / "tokenizer.json")))
    else:
        tokenizer = build()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
