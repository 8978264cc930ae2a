"""The refit of the consumers and GroupOBS, against dense least squares and brute force, and the
pipeline's model against the masked dense model with the same refits (float64)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from lossprune import LinearSchedule, Magnitude
from lossprune.layerwise.solvers import Damping, LayerProblem, refit
from lossprune.selection.layout import ParameterLayout
from lossprune.structured import (
    ConsumerProblem,
    GroupOBS,
    StructuredPruner,
    column_refit,
    find_groups,
    masked_state,
)

from . import models

transformers = pytest.importorskip("transformers")


def _problem(out=5, groups=6, width=3, tokens=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = groups * width
    mixing = torch.randn(inputs, inputs, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, inputs, generator=generator, dtype=torch.float64) @ mixing
    gram = x.T @ x / tokens
    reference = torch.randn(out, inputs, generator=generator, dtype=torch.float64)
    problem = LayerProblem(reference, gram, torch.ones_like(reference, dtype=torch.bool))
    columns = torch.arange(inputs).reshape(groups, width)
    layout = ParameterLayout((out, inputs), "Linear", (1,))
    return ConsumerProblem("layer", problem, columns, False, layout), x


def _columns(consumer, chosen):
    removed = torch.zeros(consumer.problem.reference.shape[1], dtype=torch.bool)
    removed[consumer.columns[list(chosen)].reshape(-1)] = True
    return removed


def test_column_refit_is_the_constrained_least_squares_solution():
    consumer, x = _problem()
    removed = _columns(consumer, [1, 4])
    reference = consumer.problem.reference
    undamped = column_refit(consumer.problem, removed, Damping(relative=0.0))
    kept = ~removed
    solution = torch.linalg.lstsq(x[:, kept], x @ reference.T).solution.T
    torch.testing.assert_close(undamped.weight[:, kept], solution, rtol=1e-9, atol=1e-9)
    assert bool((undamped.weight[:, removed] == 0).all())
    damped = column_refit(consumer.problem, removed, Damping(relative=0.01))
    mask = kept.expand_as(reference).clone()
    twin = refit(consumer.problem, mask, Damping(relative=0.01), method="cholesky")
    torch.testing.assert_close(damped.weight, twin.weight, rtol=1e-10, atol=1e-12)


def test_group_obs_ends_at_the_refit_of_what_it_chose_and_starts_at_the_cheapest():
    consumer, _ = _problem()
    damping = Damping(relative=0.0)
    result = GroupOBS(damping).select([consumer], [], 3)
    refitted = column_refit(consumer.problem, _columns(consumer, result.removed), damping)
    torch.testing.assert_close(result.solutions[0].weight, refitted.weight, rtol=1e-9, atol=1e-9)
    single = [
        column_refit(consumer.problem, _columns(consumer, [g]), damping).error for g in range(6)
    ]
    assert result.removed[0] == min(range(6), key=single.__getitem__)
    scale = float(
        ((consumer.problem.reference @ consumer.problem.gram) * consumer.problem.reference).sum()
    )
    assert result.costs[0] == pytest.approx(single[result.removed[0]] / scale, rel=1e-9)
    # Greedy step by step: each step is the cheapest given the previous ones.
    for step in range(1, 3):
        before = result.removed[:step]
        options = [g for g in range(6) if g not in before]
        errors = {
            g: column_refit(consumer.problem, _columns(consumer, [*before, g]), damping).error
            for g in options
        }
        assert result.removed[step] == min(options, key=errors.__getitem__)
    # Continuing from a first call gives the same choice and weights.
    first = GroupOBS(damping).select([consumer], [], 1)
    updated = consumer._replace(
        problem=consumer.problem._replace(reference=first.solutions[0].weight)
    )
    rest = GroupOBS(damping).select([updated], first.removed, 2)
    assert first.removed + rest.removed == result.removed
    torch.testing.assert_close(rest.solutions[0].weight, refitted.weight, rtol=1e-9, atol=1e-9)


def test_group_obs_is_within_the_best_subset_on_a_small_problem():
    consumer, _ = _problem(groups=5, width=2, seed=3)
    damping = Damping(relative=0.0)
    greedy = GroupOBS(damping).select([consumer], [], 2).solutions[0].error
    best = min(
        column_refit(consumer.problem, _columns(consumer, pair), damping).error
        for pair in itertools.combinations(range(5), 2)
    )
    assert best <= greedy <= 1.5 * best


def _calibration(count=3, seed=0, padded=False):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, models.VOCAB, (4, models.SEQ), generator=generator)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if padded:
            mask[:, -3:] = 0
            labels[:, -3:] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _consumer_inputs(model, module, batches):
    """Every counted row of ``module``'s input, one position at a time (the brute force)."""
    rows = []

    def hook(_, args):
        rows.append(args[0].detach())

    handle = model.get_submodule(module).register_forward_pre_hook(hook)
    with torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    kept = []
    for x, batch in zip(rows, batches, strict=True):
        counted = (batch["attention_mask"] != 0) & (batch["labels"] != -100)
        x = x.reshape(*counted.shape, -1)  # OPT's MLP reads (N·T, hidden)
        for n in range(x.shape[0]):
            for t in range(x.shape[1]):
                if counted[n, t]:
                    kept.append(x[n, t])
    return torch.stack(kept)


def _brute_force_pipeline(model, kind, removed_by_set, batches):
    """Mask each set in order, refit its consumer (with bias) by lstsq on the pruned inputs."""
    working = copy.deepcopy(model)
    groups = find_groups(working, kind)
    for group_set in groups:
        chosen = removed_by_set[group_set.name]
        consumer = group_set.consumers[0]
        module = working.get_submodule(consumer.module)
        x = _consumer_inputs(working, consumer.module, batches)
        target = x @ module.weight.detach().T + module.bias.detach()
        working.load_state_dict(
            masked_state(working, [group_set], {group_set.name: chosen}), strict=False
        )
        kept = torch.ones(x.shape[1], dtype=torch.bool)
        kept[consumer.columns[list(chosen)].reshape(-1)] = False
        design = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], 1)
        solution = torch.linalg.lstsq(design, target).solution.T
        with torch.no_grad():
            module.weight[:, kept] = solution[:, :-1]
            module.bias.copy_(solution[:, -1])
    return working, groups


@pytest.mark.parametrize("padded", [False, True])
def test_pipeline_equals_the_masked_model_with_least_squares_refits(padded):
    model = models.opt()
    batches = _calibration(padded=padded)
    report = StructuredPruner(
        model, "neurons", 0.5, choice=Magnitude(), data=batches,
        damping=Damping(relative=0.0), hf_config="record",
    ).run()  # fmt: skip
    expected, groups = _brute_force_pipeline(model, "neurons", report.removed, batches)
    test = models.token_batch()
    torch.testing.assert_close(
        models.logits(report.model, test), models.logits(expected, test), rtol=0, atol=1e-8
    )
    assert report.parameters_before - report.parameters_after == sum(
        20 * g.parameters_per_group(model) for g in groups
    )
    assert all(0 <= e < 1 for s in report.sets for e in s.errors.values())


def _conv_rows(model, name, data):
    """The rows of a consumer's (out, in·kh·kw [+ 1]) least squares: unfolded patches."""
    module = model.get_submodule(name)
    inputs = []
    handle = module.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    rows = []
    for x in inputs:
        if isinstance(module, torch.nn.Conv2d):
            patches = torch.nn.functional.unfold(
                x, module.kernel_size, padding=module.padding, stride=module.stride
            )
            rows.append(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
        else:
            rows.append(x.reshape(-1, x.shape[-1]))
    rows = torch.cat(rows)
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    return rows


@pytest.mark.slow
def test_pipeline_on_a_batch_norm_network_equals_the_masked_network_with_the_same_refits():
    model = models.resnet()
    generator = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(6, 1, 8, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 5, (6,), generator=generator),
        )
        for _ in range(3)
    ]
    report = StructuredPruner(model, "channels", 0.5, choice=Magnitude(), data=data).run()
    assert report.model.stage2.conv1.out_channels == 4 and report.model.head.in_features == 24
    groups = {g.name: g for g in find_groups(model, "channels", example_inputs=data[0][0])}
    expected = copy.deepcopy(model)
    for visited in report.sets:  # the pruner's order: as the data reaches the consumers
        group_set = groups[visited.name]
        problems = []
        for consumer in group_set.consumers:
            module = expected.get_submodule(consumer.module)
            rows = _conv_rows(expected, consumer.module, data)
            reference = module.weight.detach().reshape(module.weight.shape[0], -1).clone()
            if module.bias is not None:
                reference = torch.cat([reference, module.bias.detach()[:, None]], 1)
            problems.append(
                (
                    module,
                    LayerProblem(reference, rows.T @ rows / len(rows), reference != reference),
                    consumer,
                )
            )
        removed = {group_set.name: visited.removed}
        expected.load_state_dict(masked_state(expected, [group_set], removed), strict=False)
        for module, problem, consumer in problems:
            kept = torch.ones(problem.reference.shape[1], dtype=torch.bool)
            kept[consumer.columns[list(visited.removed)].reshape(-1)] = False
            mask = kept.expand_as(problem.reference).clone()
            damping = Damping(relative=1e-5)  # STRUCTURED_DAMPING, the pruner's default
            solved = refit(
                problem._replace(kept=~problem.kept), mask, damping, method="cholesky"
            ).weight
            with torch.no_grad():
                weights = solved[:, : module.weight[0].numel()]
                module.weight.copy_(weights.reshape(module.weight.shape))
                if module.bias is not None:
                    module.bias.copy_(solved[:, -1])
    with torch.no_grad():
        test = torch.randn(4, 1, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(report.model(test), expected(test), rtol=0, atol=1e-10)


@pytest.mark.slow
def test_staged_removal_keeps_exact_counts_and_masks_only_grow():
    model = models.llama()
    report = StructuredPruner(
        model, "neurons", LinearSchedule(0.5, 3), choice=GroupOBS(), data=_calibration()
    ).run()
    assert all(len(s.removed) == 20 for s in report.sets)
    assert report.model.config.intermediate_size == 20


def test_block_by_block_calibration_gives_the_whole_model_refits(monkeypatch):
    import lossprune.structured.pruner as pruner_module
    from lossprune.structured.calibration import block_stack

    model = models.llama()
    batches = _calibration(padded=True)
    groups = find_groups(model, ["heads", "neurons"])
    assert block_stack(model, groups).names == ("model.layers.0", "model.layers.1")
    options = {"choice": GroupOBS(), "data": batches[:1], "hf_config": "record"}
    by_blocks = StructuredPruner(model, ["heads", "neurons"], 0.25, **options).run()
    monkeypatch.setattr(pruner_module, "block_stack", lambda model, groups: None)
    whole = StructuredPruner(model, ["heads", "neurons"], 0.25, **options).run()
    assert by_blocks.removed == whole.removed
    test = models.token_batch()
    torch.testing.assert_close(
        models.logits(by_blocks.model, test), models.logits(whole.model, test), rtol=0, atol=1e-10
    )


def test_device_needs_sets_inside_blocks_and_a_block_local_choice():
    from lossprune.structured import MeasuredLoss

    data = [(torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="do not each lie inside one block"):
        StructuredPruner(models.resnet(), "channels", 0.5, data=data, device="cpu")
    with pytest.raises(ValueError, match="MeasuredLoss runs the whole model"):
        StructuredPruner(
            models.llama(), "heads", 0.25, choice=MeasuredLoss(), data=_calibration(), device="cpu"
        )
    report = StructuredPruner(
        models.llama(), "neurons", 0.25, data=_calibration(), device="cpu"
    ).run()
    assert report.model.config.intermediate_size == 30


def test_a_model_with_weights_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    data = (torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="meta device"):
        StructuredPruner(model, "channels", 0.5, data=data, loss_fn=nn.CrossEntropyLoss())
