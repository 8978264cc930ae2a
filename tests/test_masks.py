"""lossprune.selection's masks: exact-k selection, tie-breaking, limits, application, converters."""

import copy
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from lossprune.selection import (
    apply_masks,
    count_pruned,
    from_torch_prune,
    layer_densities,
    prunable_parameters,
    select_masks,
    sparsity_of,
    to_torch_prune,
)

# --------------------------------------------------------------------------------------------
# Brute-force reference: the selection rule written out entry by entry with Python's sort.
# --------------------------------------------------------------------------------------------


def _min_kept(min_density, n):
    return math.ceil(Fraction(str(min_density)) * n)


def reference_select(scores, masks, sparsity, scope="global", min_density=0.0):
    """Masks chosen by sorting (key, concatenation index); None if the target is unreachable."""
    names = list(masks)
    entries = []  # (key, tensor index, index within tensor)
    for t, name in enumerate(names):
        flat_scores = scores[name].flatten().tolist()
        flat_kept = masks[name].flatten().tolist()
        for i, (score, kept) in enumerate(zip(flat_scores, flat_kept, strict=True)):
            entries.append((score if kept else -math.inf, t, i))
    sizes = [masks[name].numel() for name in names]
    already = [int((~masks[name]).sum()) for name in names]
    caps = [max(n - _min_kept(min_density, n), a) for n, a in zip(sizes, already, strict=True)]
    # Python's sort is stable, so equal keys keep the concatenation order.
    order = sorted(range(len(entries)), key=lambda j: entries[j][0])
    chosen = set()
    if scope == "global":
        k = round(sum(sizes) * sparsity)
        if k < sum(already) or k > sum(caps):
            return None
        taken = [0] * len(names)
        for j in order:
            t = entries[j][1]
            if len(chosen) < k and taken[t] < caps[t]:
                chosen.add(j)
                taken[t] += 1
    else:
        for t, n in enumerate(sizes):
            k = round(n * sparsity)
            if k < already[t] or k > caps[t]:
                return None
            chosen.update([j for j in order if entries[j][1] == t][:k])
    out = {name: torch.ones(masks[name].numel(), dtype=torch.bool) for name in names}
    for j in chosen:
        _, t, i = entries[j]
        out[names[t]][i] = False
    return {name: out[name].reshape(masks[name].shape) for name in names}


def _full(shapes):
    return {name: torch.ones(shape, dtype=torch.bool) for name, shape in shapes.items()}


def _assert_masks_equal(actual, expected):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == torch.bool
        assert torch.equal(actual[name], expected[name]), name


# --------------------------------------------------------------------------------------------
# select_masks: properties over random inputs
# --------------------------------------------------------------------------------------------

shapes_strategy = st.lists(
    st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
)


@settings(max_examples=150, deadline=None)
@given(
    shapes=shapes_strategy,
    scope=st.sampled_from(["global", "layerwise"]),
    min_density=st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.5]),
    sparsities=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=5),
    data=st.data(),
)
def test_select_matches_reference_over_increasing_sparsities(
    shapes, scope, min_density, sparsities, data
):
    masks = _full({f"t{i}": shape for i, shape in enumerate(shapes)})
    total = sum(mask.numel() for mask in masks.values())
    for sparsity in sorted(sparsities):
        # Few distinct integer values: many ties. New scores every stage, as after re-scoring.
        scores = {
            name: torch.tensor(
                data.draw(st.lists(st.integers(-2, 2), min_size=m.numel(), max_size=m.numel())),
                dtype=torch.float64,
            ).reshape(m.shape)
            for name, m in masks.items()
        }
        before = {name: mask.clone() for name, mask in masks.items()}
        expected = reference_select(scores, masks, sparsity, scope, min_density)
        if expected is None:
            with pytest.raises(ValueError):
                select_masks(scores, masks, sparsity=sparsity, scope=scope, min_density=min_density)
            return
        new = select_masks(scores, masks, sparsity=sparsity, scope=scope, min_density=min_density)
        _assert_masks_equal(new, expected)
        _assert_masks_equal(masks, before)  # inputs untouched
        # Deterministic.
        again = select_masks(scores, masks, sparsity=sparsity, scope=scope, min_density=min_density)
        _assert_masks_equal(again, new)
        # Exact counts.
        if scope == "global":
            assert count_pruned(new) == round(total * sparsity)
        else:
            for mask in new.values():
                assert int((~mask).sum()) == round(mask.numel() * sparsity)
        # Monotone: what was pruned stays pruned.
        for name in masks:
            assert not (new[name] & ~masks[name]).any()
        # Minimum density (or what was left before) respected.
        for name, mask in new.items():
            keep = min(_min_kept(min_density, mask.numel()), int(masks[name].sum()))
            assert int(mask.sum()) >= keep
        masks = new


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 200),
    sparsity=st.floats(0.0, 1.0, exclude_max=True),
    seed=st.integers(0, 2**16),
)
def test_global_count_is_exact_for_continuous_scores(n, sparsity, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = {"a": torch.randn(n, 3, generator=generator), "b": torch.randn(7, generator=generator)}
    masks = _full({"a": (n, 3), "b": (7,)})
    new = select_masks(scores, masks, sparsity=sparsity)
    assert count_pruned(new) == round((3 * n + 7) * sparsity)
    _assert_masks_equal(new, reference_select(scores, masks, sparsity))


# --------------------------------------------------------------------------------------------
# select_masks: specific behaviour
# --------------------------------------------------------------------------------------------


def test_ties_are_broken_by_concatenation_order():
    scores = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    masks = _full({"a": (3,), "b": (2, 2)})
    # 7 entries * 0.5 = 3.5, which Python rounds to 4 (half to even).
    new = select_masks(scores, masks, sparsity=0.5)
    assert new["a"].tolist() == [False, False, False]
    assert new["b"].tolist() == [[False, True], [True, True]]
    # Dict order decides between tensors.
    flipped = select_masks(
        {"b": scores["b"], "a": scores["a"]}, {"b": masks["b"], "a": masks["a"]}, sparsity=0.5
    )
    assert list(flipped) == ["b", "a"]
    assert flipped["b"].tolist() == [[False, False], [False, False]]
    assert flipped["a"].tolist() == [True, True, True]
    # Layerwise: round(1.5) = 2 of a, round(2.0) = 2 of b, row-major first.
    layerwise = select_masks(scores, masks, sparsity=0.5, scope="layerwise")
    assert layerwise["a"].tolist() == [False, False, True]
    assert layerwise["b"].tolist() == [[False, False], [True, True]]


def test_ties_at_the_threshold_take_the_first_entries():
    scores = {"w": torch.tensor([5.0, 1.0, 2.0, 2.0, 0.0, 2.0, 9.0, 2.0])}
    new = select_masks(scores, _full({"w": (8,)}), sparsity=0.5)  # k = 4: 0, 1, then two 2s
    assert new["w"].tolist() == [True, False, False, False, False, True, True, True]


def test_previously_pruned_stay_pruned_whatever_their_score():
    masks = {"w": torch.tensor([True, False, True, True, True, True])}
    scores = {"w": torch.tensor([1.0, 1e30, 2.0, 3.0, 4.0, 5.0])}
    new = select_masks(scores, masks, sparsity=0.5)
    assert new["w"].tolist() == [False, False, False, True, True, True]
    # The same target again changes nothing.
    assert select_masks(scores, masks, sparsity=1 / 6)["w"].tolist() == masks["w"].tolist()


def test_magnitude_selection_matches_torch_global_unstructured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5), nn.Linear(5, 4))
    params = prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    with torch.no_grad():  # distinct magnitudes, so the answer is unique
        values = (torch.randperm(total, dtype=torch.float64) + 1) / total
        signs = torch.randint(0, 2, (total,)) * 2 - 1
        chunks = (values * signs).split([p.numel() for p in params.values()])
        for p, chunk in zip(params.values(), chunks, strict=True):
            p.copy_(chunk.reshape(p.shape))
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}
    for sparsity in (0.1, 0.37, 0.5, 0.9, 0.99):
        k = round(total * sparsity)
        ours = select_masks(
            {n: p.detach().abs() for n, p in params.items()}, masks, sparsity=sparsity
        )
        reference = copy.deepcopy(model)
        prune.global_unstructured(
            [(reference[i], "weight") for i in (0, 2, 3)],
            pruning_method=prune.L1Unstructured,
            amount=k,
        )
        _assert_masks_equal(ours, from_torch_prune(reference))


def test_min_density_keeps_a_floor_per_tensor():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0) + 100}
    masks = _full({"a": (10,), "b": (10,)})
    new = select_masks(scores, masks, sparsity=0.5, min_density=0.3)
    # Unconstrained, all of a would go; the floor keeps 3 (0.3 * 10 exactly, not 4).
    assert layer_densities(new) == {"a": 0.3, "b": 0.7}
    assert count_pruned(new) == 10
    assert new["a"].tolist() == [False] * 7 + [True] * 3
    # Not binding: same as without the floor.
    loose = select_masks(scores, masks, sparsity=0.25, min_density=0.3)
    _assert_masks_equal(loose, select_masks(scores, masks, sparsity=0.25))


def test_min_density_cannot_undo_earlier_pruning():
    masks = {"a": torch.tensor([False] * 9 + [True]), "b": torch.ones(10, dtype=torch.bool)}
    scores = {"a": torch.zeros(10), "b": torch.arange(10.0)}
    new = select_masks(scores, masks, sparsity=0.6, min_density=0.5)
    assert new["a"].tolist() == masks["a"].tolist()
    assert int(new["b"].sum()) == 7


def test_min_density_unreachable_target_raises():
    scores = {"a": torch.zeros(10), "b": torch.zeros(10)}
    masks = _full({"a": (10,), "b": (10,)})
    with pytest.raises(ValueError, match="min_density.*at most 10"):
        select_masks(scores, masks, sparsity=0.9, min_density=0.5)
    with pytest.raises(ValueError, match="min_density"):
        select_masks(scores, masks, sparsity=0.9, min_density=0.5, scope="layerwise")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int64])
def test_score_dtypes_give_the_same_masks(dtype):
    torch.manual_seed(1)
    base = {"a": torch.randint(-50, 50, (6, 5)), "b": torch.randint(-50, 50, (7,))}
    masks = _full({"a": (6, 5), "b": (7,)})
    expected = select_masks({n: s.double() for n, s in base.items()}, masks, sparsity=0.6)
    mixed = {"a": base["a"].to(dtype), "b": base["b"].double()}
    _assert_masks_equal(select_masks(mixed, masks, sparsity=0.6), expected)


def test_zero_sparsity_prunes_nothing_and_empty_tensors_are_fine():
    scores = {"a": torch.randn(4), "empty": torch.randn(0, 3)}
    masks = _full({"a": (4,), "empty": (0, 3)})
    assert count_pruned(select_masks(scores, masks, sparsity=0.0)) == 0
    assert count_pruned(select_masks(scores, masks, sparsity=0.5, scope="layerwise")) == 2


# --------------------------------------------------------------------------------------------
# select_masks: bad input
# --------------------------------------------------------------------------------------------


def _inputs():
    return {"a": torch.randn(4), "b": torch.randn(2, 3)}, _full({"a": (4,), "b": (2, 3)})


def test_mismatched_keys_raise():
    scores, masks = _inputs()
    with pytest.raises(ValueError, match="same keys"):
        select_masks({"a": scores["a"]}, masks, sparsity=0.5)


def test_mismatched_shapes_raise():
    scores, masks = _inputs()
    scores["b"] = torch.randn(3, 2)
    with pytest.raises(ValueError, match="shape"):
        select_masks(scores, masks, sparsity=0.5)


def test_wrong_types_raise():
    scores, masks = _inputs()
    with pytest.raises(TypeError, match="bool"):
        select_masks(scores, {**masks, "a": torch.ones(4)}, sparsity=0.5)
    with pytest.raises(TypeError, match="real tensor"):
        select_masks({**scores, "a": [1.0, 2.0, 3.0, 4.0]}, masks, sparsity=0.5)
    with pytest.raises(TypeError, match="dict"):
        select_masks(list(scores.values()), masks, sparsity=0.5)


@pytest.mark.parametrize(
    ("sparsity", "error"),
    [
        (-1, ValueError),
        (1.0, ValueError),
        (1.5, ValueError),
        (math.nan, ValueError),
        ("x", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_sparsity_raises(sparsity, error):
    scores, masks = _inputs()
    with pytest.raises(error, match="sparsity"):
        select_masks(scores, masks, sparsity=sparsity)


@pytest.mark.parametrize("min_density", [-0.1, 1.0])
def test_bad_min_density_raises(min_density):
    scores, masks = _inputs()
    with pytest.raises(ValueError, match="min_density"):
        select_masks(scores, masks, sparsity=0.5, min_density=min_density)


def test_bad_scope_raises():
    scores, masks = _inputs()
    with pytest.raises(ValueError, match="scope"):
        select_masks(scores, masks, sparsity=0.5, scope="local")


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_shrinking_raises(scope):
    scores, masks = _inputs()
    pruned = select_masks(scores, masks, sparsity=0.5, scope=scope)
    with pytest.raises(ValueError, match="never shrink"):
        select_masks(scores, pruned, sparsity=0.2, scope=scope)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_on_kept_entry_raises(bad):
    scores, masks = _inputs()
    scores["b"][1, 2] = bad
    with pytest.raises(ValueError, match="'b'.*non-finite"):
        select_masks(scores, masks, sparsity=0.5)


def test_non_finite_score_on_pruned_entry_is_ignored():
    scores, masks = _inputs()
    scores["b"][1, 2] = math.nan
    masks["b"][1, 2] = False
    new = select_masks(scores, masks, sparsity=0.5)
    assert not new["b"][1, 2]
    assert count_pruned(new) == 5


# --------------------------------------------------------------------------------------------
# prunable_parameters
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.up = nn.ConvTranspose1d(2, 2, 3)
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_default_picks_linear_and_conv_weights_in_module_order():
    assert list(prunable_parameters(Net())) == [
        "conv.weight",
        "up.weight",
        "head.0.weight",
        "head.2.weight",
    ]
    model = Net()
    assert prunable_parameters(model)["head.0.weight"] is model.head[0].weight


def test_frozen_parameters_are_skipped():
    model = Net()
    model.conv.weight.requires_grad_(False)
    assert "conv.weight" not in prunable_parameters(model)
    assert "conv.weight" not in prunable_parameters(model, include=r".*weight")


def test_tied_weights_are_counted_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert list(prunable_parameters(model)) == ["0.weight"]
    # A language model's output layer tied to its embedding is the embedding: it stays dense by
    # default, and a pattern naming the alias selects it under the name named_parameters()
    # gives.
    tied = nn.ModuleDict({"emb": nn.Embedding(5, 4), "out": nn.Linear(4, 5), "fc": nn.Linear(4, 4)})
    tied["out"].weight = tied["emb"].weight
    assert list(prunable_parameters(tied)) == ["fc.weight"]
    assert list(prunable_parameters(tied, include="out.weight")) == ["emb.weight"]


def test_include_and_exclude_by_name_and_regex():
    model = Net()
    assert list(prunable_parameters(model, include="head.0.bias")) == ["head.0.bias"]
    assert list(prunable_parameters(model, include=r"head\..*")) == [
        "head.0.weight",
        "head.0.bias",
        "head.2.weight",
        "head.2.bias",
    ]
    assert list(prunable_parameters(model, include=["emb.weight", r"bn\..*"])) == [
        "bn.weight",
        "bn.bias",
        "emb.weight",
    ]
    assert list(prunable_parameters(model, exclude="conv.weight")) == [
        "up.weight",
        "head.0.weight",
        "head.2.weight",
    ]
    assert list(prunable_parameters(model, exclude=(r"head\.\d\.weight",))) == [
        "conv.weight",
        "up.weight",
    ]
    assert list(prunable_parameters(model, include=r".*\.bias", exclude=r"(bn|up)\..*")) == [
        "conv.bias",
        "head.0.bias",
        "head.2.bias",
    ]


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_pattern_matching_nothing_raises(option):
    with pytest.raises(ValueError, match="'nope.*'"):
        prunable_parameters(Net(), **{option: ["conv.weight", "nope.*"]})


def test_prunable_parameters_bad_input():
    with pytest.raises(TypeError, match="include"):
        prunable_parameters(Net(), include=3)
    with pytest.raises(TypeError, match="exclude"):
        prunable_parameters(Net(), exclude=["conv.weight", 1])
    with pytest.raises(TypeError, match="model"):
        prunable_parameters({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="no prunable parameters"):
        prunable_parameters(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="no prunable parameters"):
        prunable_parameters(Net(), exclude=r".*weight")


# --------------------------------------------------------------------------------------------
# apply_masks and bookkeeping
# --------------------------------------------------------------------------------------------


def test_apply_masks_zeroes_in_place_and_keeps_identity():
    torch.manual_seed(0)
    model = Net().double()
    keys = list(model.state_dict())
    params = prunable_parameters(model)
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in params.items()}
    masks = select_masks(
        {n: torch.randn(p.shape) for n, p in params.items()},
        {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()},
        sparsity=0.5,
    )
    apply_masks(params, masks)
    assert list(model.state_dict()) == keys
    current = prunable_parameters(model)
    for name, (param, pointer, values) in before.items():
        assert current[name] is param and param.data_ptr() == pointer
        assert isinstance(param, nn.Parameter) and param.requires_grad
        assert torch.equal(param.detach(), values * masks[name])


def test_apply_masks_validates_before_writing():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    params = prunable_parameters(model)
    values = params["0.weight"].detach().clone()
    bad_shape = {
        "0.weight": torch.zeros(3, 3, dtype=torch.bool),
        "1.weight": torch.zeros(3, 3).bool(),
    }
    with pytest.raises(ValueError, match="shape"):
        apply_masks(params, bad_shape)
    with pytest.raises(ValueError, match="'2.weight'"):
        apply_masks(params, {"0.weight": torch.zeros(3, 3, dtype=torch.bool), "2.weight": None})
    with pytest.raises(TypeError, match="bool"):
        apply_masks(params, {"0.weight": torch.zeros(3, 3)})
    assert torch.equal(params["0.weight"].detach(), values)


def test_counts_sparsity_and_densities():
    masks = {"a": torch.tensor([True, False, False, True]), "b": torch.tensor([[False, True]])}
    assert count_pruned(masks) == 3
    assert sparsity_of(masks) == 0.5
    assert layer_densities(masks) == {"a": 0.5, "b": 0.5}
    assert sparsity_of({}) == 0.0
    with pytest.raises(TypeError):
        count_pruned({"a": torch.ones(2)})


# --------------------------------------------------------------------------------------------
# torch.nn.utils.prune converters
# --------------------------------------------------------------------------------------------


def _model_and_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Flatten(), nn.Linear(6, 4), nn.Linear(4, 2))
    params = prunable_parameters(model)
    masks = select_masks(
        {n: p.detach().abs() for n, p in params.items()},
        {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()},
        sparsity=0.6,
    )
    return model, masks


def test_to_torch_prune_and_back():
    model, masks = _model_and_masks()
    originals = {name: p.detach().clone() for name, p in prunable_parameters(model).items()}
    to_torch_prune(model, masks)
    for name, mask in masks.items():
        module = model[int(name.split(".")[0])]
        assert torch.equal(module.weight_mask, mask.to(module.weight_mask.dtype))
        assert torch.equal(module.weight_orig.detach(), originals[name])
        assert torch.equal(module.weight.detach(), originals[name] * mask)
    _assert_masks_equal(from_torch_prune(model), masks)
    assert "0.weight_orig" in model.state_dict()  # not removed yet


def test_from_torch_prune_remove_gives_plain_parameters_with_zeros():
    model, masks = _model_and_masks()
    keys = list(model.state_dict())
    x = torch.randn(5, 2, 3)
    to_torch_prune(model, masks)
    expected_output = model(x)
    _assert_masks_equal(from_torch_prune(model, remove=True), masks)
    # prune.remove re-registers the parameter, so only the order of the keys may change.
    assert sorted(model.state_dict()) == sorted(keys)
    assert not prune.is_pruned(model)
    for name, param in prunable_parameters(model).items():
        assert isinstance(param, nn.Parameter)
        assert not param.detach()[~masks[name]].any()
    torch.testing.assert_close(model(x), expected_output)
    assert from_torch_prune(model) == {}


def test_masks_from_torch_pruning_apply_the_same_zeros():
    model, _ = _model_and_masks()
    ours = copy.deepcopy(model)
    prune.random_unstructured(model[0], "weight", amount=0.5)
    prune.l1_unstructured(model[3], "weight", amount=3)
    prune.l1_unstructured(model[3], "weight", amount=2)  # iterative: a PruningContainer
    masks = from_torch_prune(model)
    assert list(masks) == ["0.weight", "3.weight"]
    assert count_pruned({"3.weight": masks["3.weight"]}) == 5
    apply_masks(prunable_parameters(ours), masks)
    for i in (0, 3):
        assert torch.equal(ours[i].weight.detach(), model[i].weight.detach())


def test_to_torch_prune_bad_names_raise():
    model, masks = _model_and_masks()
    with pytest.raises(ValueError, match="'5.weight'"):
        to_torch_prune(model, {"5.weight": masks["0.weight"]})
    with pytest.raises(ValueError, match="'2.nothing'"):
        to_torch_prune(model, {"2.nothing": masks["0.weight"]})
    assert not prune.is_pruned(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowest_numpy_fast_path_equals_its_torch_twin(dtype):
    from lossprune.selection.masks import _lowest, _lowest_torch

    generator = torch.Generator().manual_seed(0)
    keys = torch.randint(-5, 5, (1000,), generator=generator).to(dtype)  # many ties
    keys[:100] = -math.inf  # already pruned entries
    for k in (1, 99, 100, 101, 500, 999):
        fast = _lowest(keys, k)
        assert fast.dtype == torch.bool and int(fast.sum()) == k
        assert torch.equal(fast, _lowest_torch(keys, k))
    # NumPy lacks bfloat16: such keys take the torch path.
    assert torch.equal(_lowest(keys.bfloat16(), 500), _lowest_torch(keys.bfloat16(), 500))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_refused_on_kept_entries_only(bad):
    masks = {"w": torch.tensor([True, True, False, True])}
    ignored = {"w": torch.tensor([1.0, 2.0, bad, 3.0])}  # the pruned entry's score is ignored
    assert select_masks(ignored, masks, sparsity=0.5)["w"].tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="non-finite values"):
        select_masks({"w": torch.tensor([1.0, bad, 0.0, 3.0])}, masks, sparsity=0.5)
