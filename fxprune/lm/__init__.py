"""Language models end to end: the standard library's sources as a corpus, a byte-level BPE
tokenizer, and ``fxprune train --task causal-lm`` (:func:`fxprune.lm.train.train_lm`)."""
from .corpus import Corpus, stdlib_corpus
from .tokenizer import train_tokenizer, tokenizer_sha256
from .train import LMConfig, LMRunOptions, train_lm

__all__ = ["Corpus", "LMConfig", "LMRunOptions", "stdlib_corpus", "tokenizer_sha256", "train_lm", "train_tokenizer"]
