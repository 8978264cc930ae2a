"""Training loop: convergence on digits, determinism, best checkpoint, fixed masks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lossprune.experiments.data import Split, load_digits_split
from lossprune.experiments.models import MLP
from lossprune.experiments.training import _lr_factor, evaluate, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The digits MLP is far too small to gain from intra-op threads, and on a busy 2-core
    # machine their synchronisation makes each epoch ~20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> Split:
    return load_digits_split(seed=0)


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=64)


def _random_masks(model: nn.Module, density: float = 0.3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        name: torch.rand(p.shape, generator=generator) < density
        for name, p in model.named_parameters()
        if name.endswith("weight")
    }


def test_mlp_learns_digits(digits: Split) -> None:
    model = _mlp()
    history = train(model, digits, epochs=5, seed=0)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_error", "val_loss", "val_error"}
    assert min(row["val_error"] for row in history) < 0.10
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    _, test_error = evaluate(model, digits.test)
    assert test_error < 0.10


def test_same_seed_gives_bit_identical_runs(digits: Split) -> None:
    first, second = _mlp(), _mlp()
    history_first = train(first, digits, epochs=2, seed=3)
    history_second = train(second, digits, epochs=2, seed=3)
    assert history_first == history_second
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = _mlp()
    train(other, digits, epochs=2, seed=4)
    assert not torch.equal(other.layers[0].weight, first.layers[0].weight)


def test_best_validation_checkpoint_is_restored(digits: Split) -> None:
    model = _mlp()
    # A learning rate this large makes validation error jump around, so the best epoch is
    # usually not the last one; the restored model must match the best epoch either way.
    history = train(model, digits, epochs=4, lr=1.0, seed=0, lr_schedule="constant")
    best = min(history, key=lambda row: row["val_error"])
    val_loss, val_error = evaluate(model, digits.val)
    assert val_error == best["val_error"]
    assert val_loss == pytest.approx(best["val_loss"], rel=1e-6)


def test_masked_weights_stay_exactly_zero(digits: Split) -> None:
    model = _mlp()
    masks = _random_masks(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = train(model, digits, epochs=2, seed=0, masks=masks)
    assert history[-1]["val_error"] < 0.5
    parameters = dict(model.named_parameters())
    for name, kept in masks.items():
        weight = parameters[name].detach()
        assert torch.all(weight[~kept] == 0)
        assert not torch.equal(weight[kept], before[name][kept]), "kept weights still train"
    # The gradient hooks are gone: a later backward pass reaches pruned weights again.
    model.zero_grad()
    nn.functional.cross_entropy(model(digits.train.tensors[0]), digits.train.tensors[1]).backward()
    for name, kept in masks.items():
        assert parameters[name].grad[~kept].abs().sum() > 0


def test_masks_are_validated_before_training(digits: Split) -> None:
    model = _mlp()
    before = model.layers[0].weight.detach().clone()
    kept = torch.ones(300, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="layers.9.weight"):
        train(model, digits, epochs=1, seed=0, masks={"layers.9.weight": kept})
    with pytest.raises(ValueError, match="shape"):
        train(model, digits, epochs=1, seed=0, masks={"layers.0.weight": kept.T})
    with pytest.raises(TypeError, match="bool"):
        train(model, digits, epochs=1, seed=0, masks={"layers.0.weight": kept.float()})
    assert torch.equal(model.layers[0].weight, before)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("epochs", 0), ("lr", 0.0), ("lr", float("nan")), ("momentum", 1.0), ("batch_size", 0)],
)
def test_bad_hyperparameters_raise(digits: Split, argument: str, value: float) -> None:
    arguments = {"epochs": 1, "seed": 0, argument: value}
    with pytest.raises(ValueError, match=argument):
        train(_mlp(), digits, **arguments)


def test_progress_bars(digits: Split, capsys: pytest.CaptureFixture[str]) -> None:
    train(_mlp(), digits, epochs=1, seed=0, progress=True)
    assert "epochs" in capsys.readouterr().err


def test_divergence_raises(digits: Split) -> None:
    model = _mlp()
    with torch.no_grad():
        model.layers[0].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged"):
        train(model, digits, epochs=1, seed=0)


def test_lr_schedules() -> None:
    step = _lr_factor("step", 8)
    assert [step(e) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = _lr_factor("cosine", 4)
    assert [cosine(e) for e in range(4)] == pytest.approx([1, 0.853553, 0.5, 0.146447], rel=1e-5)
    assert _lr_factor("step", 1)(0) == 1
    with pytest.raises(ValueError, match="lr_schedule"):
        _lr_factor("linear", 3)


def test_lr_schedule_reaches_the_optimizer(digits: Split) -> None:
    history = train(_mlp(), digits, epochs=4, lr=0.05, seed=0, lr_schedule=lambda e: 1 / (e + 1))
    assert [row["lr"] for row in history] == pytest.approx([0.05, 0.025, 0.05 / 3, 0.0125])


def test_evaluate_restores_mode_and_counts_errors(digits: Split) -> None:
    model = _mlp().train()
    loss, error = evaluate(model, digits.val, batch_size=7)
    assert model.training
    with torch.no_grad():
        logits = model(digits.val.tensors[0])
    expected_loss = nn.functional.cross_entropy(logits, digits.val.tensors[1]).item()
    expected_error = (logits.argmax(1) != digits.val.tensors[1]).float().mean().item()
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert error == pytest.approx(expected_error)
