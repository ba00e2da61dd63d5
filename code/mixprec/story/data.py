"""Stories as token streams, and batches of windows drawn from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .corpus import StoryData


@dataclass(frozen=True)
class TokenData:
    """Training and validation token streams: the stories, each followed by EOS, end to end."""

    train: torch.Tensor  # int64, 1-D
    valid: torch.Tensor
    vocab_size: int

    def fingerprint(self) -> str:
        """A hash of the token streams and the vocabulary size: the data's part of a cache key."""
        import hashlib

        digest = hashlib.sha256(str(self.vocab_size).encode())
        for stream in (self.train, self.valid):
            digest.update(str((stream.dtype, tuple(stream.shape))).encode())
            digest.update(stream.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def batch(self, batch_size: int, block_size: int, generator: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs ``x`` and next-token targets ``y``, both (batch, block)."""
        stream = self._stream(split, block_size)
        starts = torch.randint(0, stream.numel() - block_size - 1, (batch_size,), generator=generator)
        windows = torch.stack([stream[s : s + block_size + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def eval_windows(self, batch_size: int, block_size: int, n_batches: int, split: str = "valid") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same evaluation batches every time: consecutive, non-overlapping windows from the start of ``split``."""
        if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
            raise ValueError(f"n_batches must be an integer >= 1, got {n_batches!r}")
        stream = self._stream(split, block_size)
        n_windows = min(batch_size * n_batches, (stream.numel() - 1) // block_size)
        windows = stream[: n_windows * block_size + 1]
        x = windows[:-1].view(n_windows, block_size)
        y = windows[1:].view(n_windows, block_size)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n_windows, batch_size)]

    def _stream(self, split: str, block_size: int) -> torch.Tensor:
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        stream = self.train if split == "train" else self.valid
        if stream.numel() <= block_size + 1:
            raise ValueError(f"the {split} stream has {stream.numel()} tokens, too few for windows of {block_size}")
        return stream


def encode(stories: StoryData, tokenizer) -> TokenData:
    """Tokenize both splits, each story followed by the EOS token."""

    def stream(texts: list[str]) -> torch.Tensor:
        ids = tokenizer([t + tokenizer.eos_token for t in texts])["input_ids"]
        return torch.tensor([i for row in ids for i in row], dtype=torch.long)

    return TokenData(stream(stories.train), stream(stories.valid), len(tokenizer))
