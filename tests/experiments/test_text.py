"""The byte-level corpus of the standard library's docstrings."""

from __future__ import annotations

import pytest
import torch

from lossprune.experiments.text import (
    VOCAB_SIZE,
    BlockDataset,
    corpus_fingerprint,
    load_text_split,
    stdlib_docstrings,
)


def test_corpus_is_deterministic_and_cut_exactly():
    first = stdlib_docstrings(20_000)
    assert len(first) == 20_000
    assert first == stdlib_docstrings(20_000)
    assert corpus_fingerprint(first) == corpus_fingerprint(stdlib_docstrings(20_000))
    assert corpus_fingerprint(first) != corpus_fingerprint(stdlib_docstrings(20_001))


def test_corpus_reads_docstrings_without_importing(tmp_path):
    (tmp_path / "a.py").write_text(
        '"""Module text that is long enough to be kept in the corpus."""\n'
        "raise SystemExit('never imported')\n"
        "def f():\n    '''Function text that is long enough to be kept as well.'''\n"
        "def g():\n    '''Short.'''\n"
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "b.py").write_text('"""Tests are skipped even with a long docstring."""')
    (tmp_path / "broken.py").write_text("def (:\n")  # another version's syntax: skipped
    corpus = stdlib_docstrings(root=tmp_path).decode()
    assert "Module text" in corpus and "Function text" in corpus
    assert "Short." not in corpus and "Tests are skipped" not in corpus


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        stdlib_docstrings(0)
    with pytest.raises(ValueError, match="no docstring found"):
        stdlib_docstrings(root=tmp_path)


def test_split_gives_dict_batches_of_bytes_with_validation_at_the_end():
    split = load_text_split(max_bytes=50_000, block_size=32, val_fraction=0.2)
    corpus = stdlib_docstrings(50_000)
    tokens = torch.tensor(list(corpus))
    assert torch.equal(split.train.blocks.flatten(), tokens[: split.train.blocks.numel()])
    val_start = int(len(tokens) * 0.8)
    assert torch.equal(split.val.blocks[0], tokens[val_start : val_start + 32])
    batch = next(iter(split.loader("val", 4, shuffle=False)))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["input_ids"], batch["labels"])
    assert int(batch["input_ids"].max()) < VOCAB_SIZE
    assert split.fingerprint == corpus_fingerprint(corpus)


def test_split_errors():
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_text_split(max_bytes=10_000, val_fraction=1.0)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        BlockDataset(torch.arange(10), 1)
    with pytest.raises(ValueError, match="make no block"):
        BlockDataset(torch.arange(10), 64)
    with pytest.raises(ValueError, match="one-dimensional"):
        BlockDataset(torch.zeros(2, 10, dtype=torch.long), 4)
