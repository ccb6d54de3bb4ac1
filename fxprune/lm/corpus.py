"""Real text that ships with Python: a fixed, hashed selection of the standard library's sources.

The ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` are real text that no download
can take away. The selection is a function of the file paths alone, so every run on the same
Python version reads the same bytes: test suites (``test``, ``tests``, ``idle_test``), installed
packages (``site-packages``, ``dist-packages``), files over :data:`MAX_FILE_BYTES` (data tables
such as ``pydoc_data/topics.py``) and files that are not UTF-8 are left out; the rest are
ordered by the SHA-256 of their relative path (a fixed pseudo-random order that spreads the
selection over the whole library) and taken in that order until ``max_bytes``. Each selected
file goes to the validation split when the SHA-256 of ``"validation:" + path`` falls in the
first ``val_fraction`` of its range, else to the training split: the split is by file, so no
function is seen in training and scored in validation.

:attr:`Corpus.sha256` hashes every selected file's relative path, split and bytes, in sorted
order; reports carry it with the Python version, since another Python has another library.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

#: Default size of the selection, in bytes of source text (about a third of the library).
DEFAULT_BYTES = 4_000_000
#: Default share of the selected files (by count, drawn by hash) in the validation split.
DEFAULT_VAL_FRACTION = 0.1
#: Files larger than this are data tables rather than code, and are left out.
MAX_FILE_BYTES = 200_000
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """A selection of standard-library sources, split by file.

    Attributes:
        root: the standard library's directory the paths are relative to.
        train, validation: ``(relative path, text)`` pairs, sorted by path.
        sha256: hex digest over the selection (paths, splits and bytes).
    """

    root: str
    train: List[Tuple[str, str]] = field(default_factory=list)
    validation: List[Tuple[str, str]] = field(default_factory=list)
    sha256: str = ""

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode()) for _, t in self.train)

    @property
    def validation_bytes(self) -> int:
        return sum(len(t.encode()) for _, t in self.validation)

    def summary(self) -> dict:
        return {"sha256": self.sha256, "root": self.root, "train_files": len(self.train),
                "validation_files": len(self.validation), "train_bytes": self.train_bytes,
                "validation_bytes": self.validation_bytes}


def _digest_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def stdlib_corpus(max_bytes: int = DEFAULT_BYTES, val_fraction: float = DEFAULT_VAL_FRACTION,
                  root: Optional[str] = None) -> Corpus:
    """The selection described in the module docstring.

    Args:
        max_bytes: stop adding files once this many bytes are selected (> 0).
        val_fraction: share of the selected files in the validation split, in (0, 1).
        root: directory to read (default: this Python's standard library).

    Raises:
        ValueError: bad sizes or fractions, or a selection with an empty split.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
    root = os.path.realpath(root or sysconfig.get_paths()["stdlib"])
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                if os.path.getsize(path) <= MAX_FILE_BYTES:
                    candidates.append(rel)
    candidates.sort(key=lambda rel: (_digest_int(rel), rel))
    chosen, total = [], 0
    for rel in candidates:
        if total >= max_bytes:
            break
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        chosen.append((rel, text))
        total += len(data)
    threshold = val_fraction * 2 ** 64
    corpus = Corpus(root=root)
    for rel, text in sorted(chosen):
        (corpus.validation if _digest_int("validation:" + rel) < threshold else corpus.train).append((rel, text))
    if not corpus.train or not corpus.validation:
        raise ValueError(f"the selection of {len(chosen)} files from {root} leaves a split empty; "
                         f"raise max_bytes ({max_bytes})")
    h = hashlib.sha256()
    for split, files in (("train", corpus.train), ("validation", corpus.validation)):
        for rel, text in files:
            data = text.encode()
            h.update(f"{split}\0{rel}\0{len(data)}\0".encode())
            h.update(data)
    corpus.sha256 = h.hexdigest()
    return corpus
