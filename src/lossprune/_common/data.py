"""Scoring data: one batch or any re-iterable of batches (forms: :mod:`.batches`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Subset

from .batches import Batch, batch_examples, is_batch, to_batch

__all__ = [
    "Batch",
    "is_single_batch",
    "iter_batches",
    "random_subset",
    "check_can_sample",
    "first_batch",
    "first_raw_batch",
]

_FORMS = "a batch ((inputs, targets) or a mapping with 'labels') or an iterable of batches"


def is_single_batch(data: Any) -> bool:
    """One batch (:func:`.batches.is_batch`), as opposed to an iterable of batches."""
    return is_batch(data)


def check_data(data: Any) -> None:
    """Fail early on data of the wrong kind (before any weight is touched)."""
    if data is None:
        raise TypeError(f"data must be {_FORMS}, got None")
    if isinstance(data, Tensor):
        raise TypeError(f"data must be {_FORMS}, got a Tensor")
    if is_single_batch(data):
        batch = to_batch(data)
        if batch_examples(batch) == 0:
            raise ValueError("data is empty: the (inputs, targets) batch has no examples")
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be {_FORMS}, got {type(data).__name__}")
    if isinstance(data, Iterator):
        raise TypeError(
            "data must be re-iterable (a tuple, list or DataLoader), not a one-shot iterator: "
            "statistics may need several passes"
        )


def iter_batches(
    data: Any, device: torch.device | None = None, loss_fn: Any = None
) -> Iterator[Batch]:
    """Yield :class:`~lossprune._common.batches.Batch` es on ``device``; raise if there are none.

    ``loss_fn`` is the loss the batches are for: a :class:`~lossprune.ModelLoss` reads the
    logits and shifts the labels (:func:`~lossprune._common.batches.to_batch`).

    Raises:
        TypeError: for a batch of none of the accepted forms.
        ValueError: when ``data`` holds no example.
    """
    check_data(data)
    batches = (data,) if is_single_batch(data) else data
    seen = 0
    for raw in batches:
        batch = to_batch(raw, loss_fn, device)
        if batch_examples(batch) == 0:
            continue
        seen += batch_examples(batch)
        yield batch
    if seen == 0:
        raise ValueError("data is empty: no batch holds an example")


def random_subset(data: Any, examples: int, generator: torch.Generator) -> Any:
    """A fresh uniformly random subset of ``examples`` examples, in the same form as ``data``.

    The paper re-draws 1000 scoring examples from the training set before every stage
    (Laurent et al. 2020, Sec. 5). Works for a single batch (indexed directly) and for a
    :class:`~torch.utils.data.DataLoader` over a sized dataset (a loader over a
    :class:`~torch.utils.data.Subset`, same batch size and collate function).

    Raises:
        TypeError: for other iterables, which cannot be sampled without reading them whole.
        ValueError: when ``examples`` exceeds the number of examples available.
    """
    check_can_sample(data)
    if is_single_batch(data):
        return _batch_subset(data, examples, generator)
    return _loader_subset(data, examples, generator)


def check_can_sample(data: Any) -> None:
    """``data`` is one batch or a DataLoader over a map-style dataset (rows to draw from).

    Raises:
        TypeError: any other data (an IterableDataset has no rows to index).
    """
    if is_single_batch(data):
        return
    if not isinstance(data, DataLoader):
        raise TypeError(
            "examples=n needs data that can be sampled: an (inputs, targets) tuple or a "
            f"DataLoader over a sized dataset, got {type(data).__name__}"
        )
    if isinstance(data.dataset, IterableDataset):
        raise TypeError(
            "examples=n cannot draw from a DataLoader over an IterableDataset (it has no rows to "
            "index); pass a map-style dataset or draw the subset yourself"
        )


def _loader_subset(loader: DataLoader, examples: int, generator: torch.Generator) -> DataLoader:
    """A loader over ``examples`` of the rows ``loader`` reads, in the same batch form.

    Only rows the loader's sampler can yield are drawn (a loader over a training split of a
    larger dataset never scores on held-out rows). Both batching forms are kept: automatic
    batching (``batch_size=b`` or ``batch_sampler=``) and ``batch_size=None`` with a
    :class:`~torch.utils.data.BatchSampler` as sampler (the dataset indexed by lists of rows).
    """
    batched_by_dataset = loader.batch_sampler is None and isinstance(loader.sampler, BatchSampler)
    rows = sorted(set(_sampled_rows(loader.batch_sampler or loader.sampler)))
    _check_size(examples, len(rows))
    chosen = [rows[i] for i in torch.randperm(len(rows), generator=generator)[:examples].tolist()]
    common: dict[str, Any] = {
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
    }
    if batched_by_dataset:
        batch_size = loader.sampler.batch_size  # type: ignore[attr-defined]
        batches = BatchSampler(chosen, batch_size, drop_last=False)
        return DataLoader(loader.dataset, sampler=batches, batch_size=None, **common)
    # A loader built from a custom batch sampler has batch_size None: keep its batch size.
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if loader.batch_sampler is None:  # batch_size=None with single rows: each row is a batch
        return DataLoader(Subset(loader.dataset, chosen), batch_size=None, **common)
    return DataLoader(Subset(loader.dataset, chosen), batch_size=batch_size or examples, **common)


def _sampled_rows(sampler: Iterable[Any]) -> list[int]:
    """Every dataset row one epoch of ``sampler`` yields (lists of rows flattened).

    Iterating a random sampler draws from its generator (or torch's global one): both are
    restored afterwards, so reading the rows changes no shuffle order of the user's loader.
    """
    generators = []
    inner: Any = sampler
    while inner is not None:
        if isinstance(getattr(inner, "generator", None), torch.Generator):
            generators.append((inner.generator, inner.generator.get_state()))
        inner = getattr(inner, "sampler", None)
    try:
        with torch.random.fork_rng(devices=[]):
            rows: list[int] = []
            for item in sampler:
                if isinstance(item, (list, tuple)):
                    rows.extend(int(i) for i in item)
                else:
                    rows.append(int(item))
    finally:
        for gen, state in generators:
            gen.set_state(state)
    return rows


def _check_size(examples: int, available: int) -> None:
    if examples > available:
        raise ValueError(f"examples={examples} exceeds the {available} examples in data")


def _batch_subset(data: Any, examples: int, generator: torch.Generator) -> Any:
    """``examples`` random rows of one batch, in its own form (pair, nested tuple or mapping)."""
    size = batch_examples(to_batch(data))
    _check_size(examples, size)
    index = torch.randperm(size, generator=generator)[:examples]

    def rows(value: Any) -> Any:
        return value[index.to(value.device)] if isinstance(value, Tensor) else value

    if isinstance(data, Mapping):
        return {k: rows(v) for k, v in data.items()}
    inputs, targets = data
    if isinstance(inputs, Tensor):
        return rows(inputs), rows(targets)
    return tuple(rows(v) for v in inputs), rows(targets)


def first_batch(data: Any, loss_fn: Any = None) -> Batch:
    """The first batch of ``data`` (SynFlow needs only its input shapes)."""
    return next(iter_batches(data, loss_fn=loss_fn))


def first_raw_batch(data: Any) -> Any:
    """The first batch of ``data`` that holds an example, as the user wrote it.

    Raises:
        ValueError: when ``data`` holds no example.
    """
    check_data(data)
    for raw in (data,) if is_single_batch(data) else data:
        if batch_examples(to_batch(raw)):
            return raw
    raise ValueError("data is empty: no batch holds an example")
