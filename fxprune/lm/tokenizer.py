"""A byte-level BPE tokenizer trained on the training split (the ``tokenizers`` library).

Byte-level: every byte has a token, so any text encodes and decodes losslessly. One special
token, :data:`EOS` (``<|endoftext|>``, id 0), ends each file. Training reads the texts in the
given order and is deterministic: the same texts give the same ``tokenizer.json`` (its SHA-256
is :func:`tokenizer_sha256`).
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, List

EOS = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A ``tokenizers.Tokenizer`` (byte-level BPE, ``vocab_size`` tokens including :data:`EOS`)
    trained on ``texts``. Raises ValueError for a vocabulary smaller than the 256 bytes + EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes and {EOS}), not {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def tokenizer_sha256(tok) -> str:
    """SHA-256 of what decides the tokenizer's ids: its model (vocabulary and merges),
    pre-tokenizer, decoder and special tokens, as canonical JSON (so that the same tokenizer
    saved by ``transformers``, which adds its own settings, hashes the same)."""
    spec = json.loads(tok.to_str())
    core = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "decoder")}
    core["added_tokens"] = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def encode_files(tok, texts: Iterable[str]) -> List[int]:
    """One token stream: each text's ids followed by the :data:`EOS` id."""
    eos = tok.token_to_id(EOS)
    out: List[int] = []
    for enc in tok.encode_batch(list(texts)):
        out.extend(enc.ids)
        out.append(eos)
    return out


def hf_tokenizer(tok):
    """The tokenizer as a ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` writes
    ``tokenizer.json``, which ``AutoTokenizer.from_pretrained`` reads)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None)


def load_tokenizer(text: str):
    """A ``tokenizers.Tokenizer`` from its JSON serialisation (no code runs)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)
