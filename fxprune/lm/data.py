"""Token data for the language-model job: the corpus, its tokenizer, fixed-length windows and
a step-indexed batch order.

The training split is one token stream (each file's tokens, then ``<|endoftext|>``) cut into
windows of ``seq_len + 1`` tokens at a stride of ``seq_len``: a window's first ``seq_len``
tokens are the input, its last ``seq_len`` the targets, and every token but the stream's first
is a target once per pass. The validation split is cut the same way. The windows of pass ``e``
are taken in the order :func:`fxprune.data.epoch_order` draws from ``(seed, e)``, and the batch
of optimizer step ``s`` is positions ``[s B, (s + 1) B)`` of the concatenated passes, so the data
a step sees is a function of the step alone: a resumed run continues it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import epoch_order
from .corpus import Corpus, stdlib_corpus
from .tokenizer import EOS, encode_files, load_tokenizer, tokenizer_sha256, train_tokenizer


@dataclass
class LMData:
    """The corpus, its tokenizer and the two token streams (``LongTensor[n]``)."""

    corpus: Corpus
    tokenizer: object  # tokenizers.Tokenizer
    train: torch.Tensor
    validation: torch.Tensor

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def summary(self) -> dict:
        return {**self.corpus.summary(), "train_tokens": int(self.train.numel()),
                "validation_tokens": int(self.validation.numel()), "vocab_size": self.vocab_size,
                "tokenizer_sha256": tokenizer_sha256(self.tokenizer)}


def build_data(corpus_bytes: int, val_fraction: float, vocab_size: int,
               tokenizer_json: Optional[str] = None) -> LMData:
    """Select the corpus and tokenize it: with ``tokenizer_json`` (a saved tokenizer, e.g. of the
    model a run starts from) that tokenizer, else one trained on the training split."""
    corpus = stdlib_corpus(corpus_bytes, val_fraction)
    tok = load_tokenizer(tokenizer_json) if tokenizer_json else train_tokenizer(
        (t for _, t in corpus.train), vocab_size)
    if tok.token_to_id(EOS) is None:
        raise ValueError(f"the tokenizer has no {EOS} token")
    train = torch.tensor(encode_files(tok, [t for _, t in corpus.train]), dtype=torch.long)
    val = torch.tensor(encode_files(tok, [t for _, t in corpus.validation]), dtype=torch.long)
    return LMData(corpus, tok, train, val)


class Windows(Dataset):
    """Windows of ``seq_len + 1`` tokens of a stream at a stride of ``seq_len``."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"{tokens.numel()} tokens hold no window of {seq_len + 1}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1]


class StepBatches(Sampler[List[int]]):
    """Window indices of the batches of steps ``start, ..., stop - 1`` (see module docstring);
    with ``world_size > 1`` each rank takes its contiguous share of every global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size
        self._gen = torch.Generator()
        self._cache = (-1, [])

    def _order(self, epoch: int) -> List[int]:
        if self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(self.n, self._gen, self.seed, epoch))
        return self._cache[1]

    def batch(self, step: int) -> List[int]:
        per = self.batch_size // self.world_size
        first = step * self.batch_size + self.rank * per
        return [self._order(p // self.n)[p % self.n] for p in range(first, first + per)]

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start, self.stop):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def build_loader(tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0) -> DataLoader:
    """The training batches (``LongTensor[batch, seq_len + 1]``) of steps ``start .. stop - 1``."""
    windows = Windows(tokens, seq_len)
    sampler = StepBatches(len(windows), batch_size, seed, start, stop, rank, world_size)
    return DataLoader(windows, batch_sampler=sampler, num_workers=num_workers)


def validation_batches(tokens: torch.Tensor, seq_len: int, batch_size: int,
                       max_tokens: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Every validation window in order (the first ``max_tokens`` targets' worth when given)."""
    windows = Windows(tokens, seq_len)
    n = len(windows) if max_tokens is None else min(len(windows), max(1, max_tokens // seq_len))
    for i in range(0, n, batch_size):
        yield torch.stack([windows[j] for j in range(i, min(n, i + batch_size))])
