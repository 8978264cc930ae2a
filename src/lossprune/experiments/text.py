"""A small language-modelling corpus that is on every machine: Python's own docstrings.

The transformer experiments need text that can be read without a download. Every Python
installation ships its standard library as source, and the docstrings in it are several
megabytes of English prose about programming. :func:`stdlib_docstrings` collects them with
:mod:`ast` (the modules are parsed, never imported: importing ``antigravity`` would open a web
browser), in sorted file order, so that the corpus is a deterministic function of the Python
version; :func:`corpus_fingerprint` names it in results.

The text is modelled at byte level (a vocabulary of 256, no tokenizer to train or download). A
:class:`TextSplit` cuts the byte stream into fixed-length blocks; each batch is the mapping
``{"input_ids": (B, T), "labels": (B, T)}`` of the Hugging Face convention, with
``labels = input_ids``: a causal language model shifts them by itself, so position ``t``
predicts byte ``t + 1``.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "VOCAB_SIZE",
    "stdlib_docstrings",
    "corpus_fingerprint",
    "BlockDataset",
    "TextSplit",
    "load_text_split",
]

VOCAB_SIZE = 256
"""Byte-level vocabulary: every UTF-8 byte is a token."""

# Folders of the standard library that hold tests, vendored third-party code or generated
# tables, not documentation.
_SKIPPED_FOLDERS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    files = [
        path
        for path in root.rglob("*.py")
        if not _SKIPPED_FOLDERS.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: str) -> Iterator[str]:
    """Module, class and function docstrings of one file, in source order."""
    with warnings.catch_warnings():
        # Old escape sequences in some stdlib files warn when parsed; they are not our concern.
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(source)
    nodes = [tree] + [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    for node in nodes:
        text = ast.get_docstring(node, clean=True)
        if text and len(text) >= 40:  # one-line stubs like "Return self." teach little
            yield text


def stdlib_docstrings(max_bytes: int | None = None, root: str | Path | None = None) -> bytes:
    """The docstrings of the standard library's source files, UTF-8, separated by blank lines.

    Args:
        max_bytes: stop once the corpus holds at least this many bytes (whole docstrings only;
            the result is then cut to exactly ``max_bytes``).
        root: the folder to read (default: this interpreter's standard library).

    Raises:
        ValueError: ``max_bytes`` is not positive, or no docstring was found under ``root``.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    folder = Path(root) if root is not None else _stdlib_root()
    parts: list[bytes] = []
    size = 0
    for path in _source_files(folder):
        try:
            source = path.read_text(encoding="utf-8")
            texts = list(_docstrings(source))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file of another Python version's syntax, or not UTF-8: skip it
        for text in texts:
            encoded = text.encode("utf-8") + b"\n\n"
            parts.append(encoded)
            size += len(encoded)
        if max_bytes is not None and size >= max_bytes:
            break
    corpus = b"".join(parts)
    if not corpus:
        raise ValueError(f"no docstring found under {folder}")
    return corpus if max_bytes is None else corpus[:max_bytes]


def corpus_fingerprint(corpus: bytes) -> str:
    """A short SHA-256 prefix that names a corpus in results files."""
    return hashlib.sha256(corpus).hexdigest()[:16]


class BlockDataset(Dataset):
    """Non-overlapping blocks of ``block_size`` bytes as ``{"input_ids", "labels"}`` examples."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be one-dimensional, got shape {tuple(tokens.shape)}")
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        blocks = len(tokens) // block_size
        if blocks == 0:
            raise ValueError(
                f"{len(tokens)} tokens make no block of {block_size}: use a larger corpus"
            )
        self.blocks = tokens[: blocks * block_size].view(blocks, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}


@dataclass(frozen=True)
class TextSplit:
    """A byte-level corpus cut into training and validation blocks.

    Attributes:
        train: training blocks.
        val: validation blocks, taken from the END of the corpus (a contiguous held-out part,
            so no validation text also appears in training).
        fingerprint: :func:`corpus_fingerprint` of the whole corpus.
        block_size: tokens per block.
    """

    train: BlockDataset
    val: BlockDataset
    fingerprint: str
    block_size: int

    def loader(self, part: str, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
        """A DataLoader of dict batches ``{"input_ids": (B, T), "labels": (B, T)}``."""
        dataset = {"train": self.train, "val": self.val}[part]
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def load_text_split(
    *, max_bytes: int = 400_000, block_size: int = 64, val_fraction: float = 0.1
) -> TextSplit:
    """The standard library's docstrings as a byte-level training / validation split.

    Raises:
        ValueError: for a ``val_fraction`` outside (0, 1) or a corpus too small for the blocks.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    corpus = stdlib_docstrings(max_bytes)
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1.0 - val_fraction))
    return TextSplit(
        train=BlockDataset(tokens[:cut], block_size),
        val=BlockDataset(tokens[cut:], block_size),
        fingerprint=corpus_fingerprint(corpus),
        block_size=block_size,
    )
