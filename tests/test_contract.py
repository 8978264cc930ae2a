"""The Pruner's contract: every refusal leaves model and pruner byte for byte unchanged.

Also the API defects found by fuzzing (issue 11), each with the case that used to go wrong.
"""

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
)

from lossprune import (
    OBD,
    Compensation,
    ExponentialSchedule,
    GraSP,
    LayerCollapseError,
    LinearModel,
    LinearSchedule,
    Magnitude,
    NonFiniteError,
    Pruner,
    QuadraticModel,
    SynFlow,
    scores,
)
from lossprune.pruning.updates import CompensationState
from lossprune.selection import from_torch_prune
from tests.conftest import make_mlp

CE = nn.CrossEntropyLoss()


def data(n=40, dtype=torch.float64):
    return torch.randn(n, 6, dtype=dtype), torch.randint(0, 3, (n,))


def raw(value):
    """A byte-exact image of a (nested) state dict: tensors as dtype, shape and raw bytes."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        return (str(value.dtype), tuple(value.shape), flat.view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return {k: raw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [raw(v) for v in value]
    return value


def snapshot(model, pruner):
    return raw(model.state_dict()), raw(pruner.state_dict())


# --------------------------------------------------------------------------------------------
# Refusals during step(): planned, never committed
# --------------------------------------------------------------------------------------------


def test_a_failed_stage_leaves_everything_byte_for_byte_including_the_random_state():
    model = make_mlp()
    inputs, targets = data(60)
    pruner = Pruner(
        model,
        QuadraticModel(1e-3, curvature="hessian_diag", probes=2),  # random: uses the generator
        LinearSchedule(0.6, 3),
        loss_fn=CE,
        data=(inputs, targets),
        examples=30,
        generator=0,
        on_collapse="ignore",
    )
    pruner.step()
    before = snapshot(model, pruner)
    poisoned = inputs.clone()
    poisoned[:, 0] = float("nan")
    pruner.data = (poisoned, targets)
    with pytest.raises(NonFiniteError):
        pruner.step()
    assert snapshot(model, pruner) == before  # the subset draw did not advance the generator
    pruner.data = (inputs, targets)
    twin = copy.deepcopy(pruner)
    assert raw(pruner.step().as_dict()["layer_density"]) == raw(
        twin.step().as_dict()["layer_density"]
    )


def test_collapse_raise_and_selection_refusals_change_nothing():
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    pruner = Pruner(
        model, Magnitude(), LinearSchedule(0.7, 1), loss_fn=CE, data=data(), on_collapse="raise"
    )
    before = snapshot(model, pruner)
    with pytest.raises(LayerCollapseError, match="nothing was modified"):
        pruner.step()
    assert snapshot(model, pruner) == before

    class Shrinking:  # a selection that breaks the protocol: masks never shrink
        def check_schedule(self, layouts, targets, min_density):
            pass

        def select(self, scores, masks, *, sparsity, min_density, layouts):
            return {k: torch.ones_like(m) for k, m in masks.items()}

    class Partial(Shrinking):  # returns masks for other parameters, or no bool masks
        def __init__(self, broken):
            self.broken = broken

        def select(self, scores, masks, *, sparsity, min_density, layouts):
            if self.broken == "names":
                return {"0.weight": masks["0.weight"]}
            return {k: m.float() for k, m in masks.items()}

    for broken, match in (("names", "returned masks for"), ("dtype", "no bool mask")):
        model = make_mlp()
        pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 2), scope=Partial(broken))
        before = snapshot(model, pruner)
        with pytest.raises(ValueError, match=match):
            pruner.step()
        assert snapshot(model, pruner) == before

    model = make_mlp()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 2), scope=Shrinking())
    pruner.masks = {k: m.clone().fill_(False) for k, m in pruner.masks.items()}
    before = snapshot(model, pruner)
    with pytest.raises(ValueError, match="masks never shrink"):
        pruner.step()
    assert snapshot(model, pruner) == before


# --------------------------------------------------------------------------------------------
# load_state_dict: validated completely before anything changes
# --------------------------------------------------------------------------------------------


def compensated(model, **kwargs):
    return Pruner(
        model,
        LinearModel(1e-3),
        ExponentialSchedule(0.7, 3),
        loss_fn=CE,
        data=data(),
        update=Compensation(lam=1e-2, cg_iters=3),
        generator=1,
        on_collapse="ignore",
        **kwargs,
    )


def corrupt(state, path, value):
    state = copy.deepcopy(state)
    target = state
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return state


@pytest.mark.parametrize(
    "path, value, error, match",
    [
        (("generator",), torch.zeros(3, dtype=torch.uint8), ValueError, "generator"),
        (("generator",), [1, 2], TypeError, "generator"),
        (("update", "last_step", "0.weight"), KeyError, ValueError, "last_step"),
        (("update", "last_step", "0.weight"), torch.zeros(2, 2), ValueError, "last_step"),
        (("update", "lam"), "x", TypeError, "lam"),
        (("update", "lam"), KeyError, ValueError, "update state lacks"),
        (
            ("update", "last_step", "0.weight"),
            torch.zeros(5, 6, dtype=torch.long),
            TypeError,
            "float",
        ),
        (("update", "lam"), 1e39, ValueError, "lam"),
        (("update", "config"), "Compensation()", ValueError, "update"),
        (("update",), None, ValueError, "update"),
        (("stage",), True, TypeError, "stage"),
        (("stage",), 2.0, TypeError, "stage"),
        (("stage",), 9, ValueError, "stage"),
        (("scope",), "Layerwise()", ValueError, "scope"),
        (("min_density",), 0.1, ValueError, "min_density"),
        (("min_density",), "0.0", ValueError, "min_density"),
        (("criterion",), "LinearModel(lam=0.0)", ValueError, "criterion"),
        (("targets",), [0.1, 0.2, 0.7], ValueError, "schedule"),
        (("targets",), "0.7", TypeError, "targets"),
        (("masks", "0.weight"), torch.ones(6, 5, dtype=torch.bool), ValueError, "shape"),
        (("masks", "0.weight"), torch.ones(5, 6), TypeError, "bool"),
        (("masks",), [], TypeError, "masks"),
        (("masks",), KeyError, ValueError, "lacks"),
    ],
)
def test_load_state_dict_refuses_every_corruption_before_changing_anything(
    path, value, error, match
):
    source = compensated(make_mlp())
    source.step()
    source.step()
    state = source.state_dict()
    model = make_mlp()
    pruner = compensated(model)
    pruner.step()
    before = snapshot(model, pruner)
    with pytest.raises(error, match=match):
        pruner.load_state_dict(corrupt(state, path, value))
    assert snapshot(model, pruner) == before
    pruner.load_state_dict(state)  # the uncorrupted state loads
    assert pruner.stage == 2


def test_load_state_dict_tells_configurations_apart():
    def state_of(criterion, **kwargs):
        return Pruner(make_mlp(), criterion, LinearSchedule(0.5, 2), **kwargs).state_dict()

    with pytest.raises(ValueError, match="criterion"):
        Pruner(make_mlp(), SynFlow(input_shape=(6,)), LinearSchedule(0.5, 2)).load_state_dict(
            state_of(SynFlow(input_shape=(6,), dtype=torch.float32))
        )
    with pytest.raises(ValueError, match="scope"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2)).load_state_dict(
            state_of(Magnitude(), scope="layerwise")
        )
    with pytest.raises(ValueError, match="min_density"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2)).load_state_dict(
            state_of(Magnitude(), min_density=0.1)
        )
    with pytest.raises(ValueError, match="the pruner has none"):
        Pruner(make_mlp(), LinearModel(1e-3), ExponentialSchedule(0.7, 3), loss_fn=CE,
               data=data()).load_state_dict(compensated(make_mlp()).state_dict())  # fmt: skip
    with pytest.raises(TypeError, match="the update state must be a dict"):
        CompensationState.from_state_dict([], {})
    saved = io.BytesIO()
    torch.save(compensated(make_mlp()).state_dict(), saved)
    saved.seek(0)
    compensated(make_mlp()).load_state_dict(torch.load(saved, weights_only=True))


# --------------------------------------------------------------------------------------------
# Configuration objects
# --------------------------------------------------------------------------------------------


def test_criteria_and_schedules_are_frozen_dataclasses_with_derived_identity():
    assert SynFlow(dtype=torch.float32) != SynFlow()
    assert SynFlow(dtype=torch.float32).config()["dtype"] == "torch.float32"
    assert hash(QuadraticModel(1e-3)) == hash(QuadraticModel(lam=1e-3))
    assert len({GraSP(), GraSP(temperature=200), GraSP(temperature=1.0)}) == 2
    assert ExponentialSchedule(0.9, 3) != LinearSchedule(0.9, 3)
    assert eval(repr(LinearSchedule(0.9, 3)), {"LinearSchedule": LinearSchedule}) == (
        LinearSchedule(0.9, 3)
    )
    for frozen in (QuadraticModel(), GraSP(), SynFlow(), LinearSchedule(0.5, 2), Compensation()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.lam = 1.0


@pytest.mark.parametrize("make", [LinearModel, QuadraticModel, OBD, lambda lam: Compensation(lam)])
def test_lam_beyond_float32_is_refused(make):
    with pytest.raises(ValueError, match="float32's largest number"):
        make(1e39)
    make(3e38)


@pytest.mark.parametrize(
    "shape, error", [("784", TypeError), ((3.7,), TypeError), ((), TypeError), ((3, 0), ValueError)]
)
def test_synflow_input_shape_is_validated(shape, error):
    with pytest.raises(error, match="input_shape"):
        SynFlow(input_shape=shape)
    assert SynFlow(input_shape=[3, torch.tensor(4).item()]).input_shape == (3, 4)


def test_grasp_temperature_is_validated_and_cannot_share_a_pass_with_the_plain_loss():
    with pytest.raises(ValueError, match="temperature"):
        GraSP(temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        GraSP(temperature="200")
    with pytest.raises(ValueError, match="different losses"):
        QuadraticModel() + GraSP()
    assert QuadraticModel() + GraSP(temperature=1.0) is not None
    assert GraSP() + Magnitude() is not None  # Magnitude reads no statistics


# --------------------------------------------------------------------------------------------
# Parameters: torch-pruned, replaced between stages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every_layer", [False, True])
def test_torch_pruned_layers_are_refused_clearly(every_layer):
    model = make_mlp()
    layers = [model[0], model[2], model[4]] if every_layer else [model[2]]
    for layer in layers:
        prune.l1_unstructured(layer, "weight", amount=0.5)
    with pytest.raises(ValueError, match="torch.nn.utils.prune .*from_torch_prune"):
        Pruner(model, Magnitude(), LinearSchedule(0.5, 1))
    with pytest.raises(ValueError, match="weight_orig"):
        scores(model, Magnitude())
    from_torch_prune(model, remove=True)
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1))
    pruner.run()
    zeros = sum(int((p == 0).sum()) for p in pruner.params.values())
    assert zeros / sum(p.numel() for p in pruner.params.values()) == pruner.sparsity()


def test_parameters_replaced_between_stages_are_followed_by_name():
    model = make_mlp()
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.6, 2))
    pruner.step()
    fresh = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)  # new Parameter objects
    report = pruner.step()
    params = pruner.params
    assert all(params[k] is model.get_parameter(k) for k in params)
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert zeros / sum(p.numel() for p in params.values()) == report.sparsity == pruner.sparsity()
    model[0].weight = nn.Parameter(torch.randn(7, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="changed shape"):
        pruner.apply()
    del model[0].weight
    model[0].weight = torch.zeros(5, 6, dtype=torch.float64)  # a plain tensor, not a Parameter
    with pytest.raises(ValueError, match="no longer a parameter"):
        pruner.apply()


def test_scoring_data_can_be_replaced_between_stages_but_not_dropped():
    pruner = Pruner(make_mlp(), LinearModel(), LinearSchedule(0.5, 2), loss_fn=CE, data=data())
    pruner.data = data(10)
    assert len(pruner.data[0]) == 10
    with pytest.raises(ValueError, match="data=None"):
        Pruner(make_mlp(), Magnitude(), LinearSchedule(0.5, 2), loss_fn=CE, data=data(),
               diagnostics=True).data = None  # fmt: skip
    with pytest.raises(TypeError, match="data must be"):
        pruner.data = torch.zeros(3)


# --------------------------------------------------------------------------------------------
# examples=n: the loader's own rows, every loader form
# --------------------------------------------------------------------------------------------


def poisoned_rows():
    """Rows 20..39 are NaN: drawing any of them for scoring makes the stage fail."""
    inputs, targets = data(40)
    inputs[20:] = float("nan")
    return TensorDataset(inputs, targets)


def train_rows_loaders():
    dataset = poisoned_rows()
    rows = list(range(20))
    return {
        "sampler": DataLoader(dataset, batch_size=8, sampler=SubsetRandomSampler(rows)),
        "batch_sampler": DataLoader(
            dataset, batch_sampler=BatchSampler(SubsetRandomSampler(rows), 8, drop_last=False)
        ),
        # The reproduction's make_loader form: the dataset indexed by lists of rows.
        "batch_size_none": DataLoader(
            dataset,
            sampler=BatchSampler(SubsetRandomSampler(rows), 8, drop_last=False),
            batch_size=None,
        ),
    }


@pytest.mark.parametrize("form", ["sampler", "batch_sampler", "batch_size_none"])
def test_examples_are_drawn_only_from_the_rows_the_loader_reads(form):
    loader = train_rows_loaders()[form]
    generator = torch.Generator().manual_seed(5)
    loader.sampler.generator = generator if form == "sampler" else None
    state = generator.get_state()
    pruner = Pruner(
        make_mlp(),
        LinearModel(),
        ExponentialSchedule(0.6, 3),
        loss_fn=CE,
        data=loader,
        examples=12,
        generator=0,
        on_collapse="ignore",
    )
    for report in pruner.run():  # a NaN row would raise NonFiniteError
        assert report.loss_before is not None
    assert torch.equal(generator.get_state(), state)  # the user's shuffle order is untouched
    with pytest.raises(ValueError, match="examples=21 exceeds the 20 examples"):
        Pruner(make_mlp(), LinearModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=loader,
               examples=21).step()  # fmt: skip


def test_examples_from_an_iterable_dataset_is_a_clear_type_error():
    class Stream(IterableDataset):
        def __iter__(self):
            inputs, targets = data(10)
            return iter(zip(inputs, targets))

    model = make_mlp()
    pruner = Pruner(model, LinearModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=data(10))
    before = snapshot(model, pruner)
    with pytest.raises(TypeError, match="IterableDataset"):  # when the pruner is built
        Pruner(
            model, LinearModel(), LinearSchedule(0.5, 1), loss_fn=CE,
            data=DataLoader(Stream(), batch_size=4), examples=5,
        )  # fmt: skip
    sampling = Pruner(model, LinearModel(), LinearSchedule(0.5, 1), loss_fn=CE, data=data(10),
                      examples=5)  # fmt: skip
    with pytest.raises(TypeError, match="IterableDataset"):  # or when its data is replaced
        sampling.data = DataLoader(Stream(), batch_size=4)
    assert snapshot(model, pruner) == before


def test_sequential_loader_draws_like_a_random_permutation_of_all_rows():
    inputs, targets = data(30)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=7)
    loader_sequential = DataLoader(
        TensorDataset(inputs, targets), batch_size=7, sampler=SequentialSampler(range(30))
    )
    model = make_mlp()
    a = Pruner(copy.deepcopy(model), LinearModel(), LinearSchedule(0.5, 1), loss_fn=CE,
               data=loader, examples=9, generator=3, on_collapse="ignore")  # fmt: skip
    b = Pruner(copy.deepcopy(model), LinearModel(), LinearSchedule(0.5, 1), loss_fn=CE,
               data=loader_sequential, examples=9, generator=3, on_collapse="ignore")  # fmt: skip
    assert a.step().loss_before == b.step().loss_before


# --------------------------------------------------------------------------------------------
# Scores: float16 ranking, SynFlow overflow and model outputs
# --------------------------------------------------------------------------------------------


def test_float16_weights_are_ranked_in_float32():
    torch.manual_seed(0)
    layer = nn.Linear(512, 1024, bias=False).half()
    weights = layer.weight.detach().float().abs()
    # At 0.5% the threshold lies where ½θ² underflows in float16: thousands of ties at 0.
    pruner = Pruner(nn.Sequential(layer), Magnitude(), LinearSchedule(0.005, 1))
    pruner.step()
    kept = pruner.masks["0.weight"]
    # Every pruned weight is at most every kept one: no inversion of the ranking.
    assert weights[~kept].max() <= weights[kept].min()


def deep_chain(depth=40, width=64):
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in layers:
            layer.weight.uniform_(0.5, 1.5)
    return model


def test_synflow_scores_that_overflow_float32_stay_finite():
    model = deep_chain()  # R ~ 64^40 ~ 1e72: finite in float64, inf in float32
    got = scores(model, SynFlow(input_shape=(64,)))
    assert all(torch.isfinite(s).all() and s.dtype == torch.float64 for s in got.values())
    assert max(float(s.max()) for s in got.values()) > torch.finfo(torch.float32).max
    pruner = Pruner(model, SynFlow(input_shape=(64,)), ExponentialSchedule(0.5, 2))
    pruner.run()
    assert pruner.sparsity() == 0.5


class TupleOutput(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.net = make_mlp()
        self.as_dict = as_dict

    def forward(self, x):
        logits = self.net(x)
        return {"logits": logits, "aux": logits.sum(1)} if self.as_dict else (logits, x)


def test_outputs_that_cannot_be_scored_are_clear_type_errors():
    class NoFloats(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(6, 3)

        def forward(self, x):
            return self.layer(x).argmax(1)

    with pytest.raises(TypeError, match="SynFlow needs floating-point outputs"):
        scores(NoFloats(), SynFlow(input_shape=(6,)))
    model = TupleOutput()

    def first(outputs, targets):
        return CE(outputs[0], targets)

    with pytest.raises(TypeError, match="GraSP\\(temperature=T\\) divides the model's logits"):
        scores(model, GraSP(), data(), loss_fn=first)
    assert scores(model, GraSP(temperature=1.0), data(), loss_fn=first)


@pytest.mark.parametrize("as_dict", [False, True])
def test_synflow_sums_every_output_of_a_tuple_or_dict_model(as_dict):
    model = TupleOutput(as_dict)
    got = scores(model, SynFlow(input_shape=(6,)))
    leaves = {
        f"net.{k}": p.detach().double().abs().requires_grad_(True)
        for k, p in model.net.named_parameters()
    }
    ones = torch.ones(1, 6, dtype=torch.float64)
    logits = torch.func.functional_call(model, leaves, (ones,))
    flow = logits["logits"].sum() + logits["aux"].sum() if as_dict else logits[0].sum()
    grads = torch.autograd.grad(flow, list(leaves.values()))
    expected = dict(zip(leaves, (leaf.detach() * g for leaf, g in zip(leaves.values(), grads))))
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name])
