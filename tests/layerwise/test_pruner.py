"""LayerwisePruner: what it accepts, what it refuses before anything changes, what it reports."""

import warnings

import pytest
import torch
from torch import nn

from lossprune import (
    NM,
    OBD,
    Blocks,
    GraSP,
    LayerwisePruner,
    LinearModel,
    Magnitude,
    NonFiniteError,
    PerRow,
    QuadraticModel,
    SynFlow,
    Targets,
    Wanda,
)
from lossprune.criteria.base import Criterion
from lossprune.layerwise import Damping, Refit, find_blocks
from lossprune.layerwise.calibration import model_inputs
from lossprune.layerwise.offload import read_weight
from lossprune.layerwise.updates import check_update
from tests.layerwise.models import batches, tiny
from tests.layerwise.solver_cases import random_problem
from tests.test_contract import raw


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


DATA = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))


class Solver:
    """A stand-in mask-choosing solver: keeps the largest weights, refits nothing."""

    def solve(self, problem, pattern, sparsity):
        from lossprune.layerwise.solvers.problem import solution

        mask = pattern(problem.reference.abs(), problem.kept, sparsity)
        return solution(problem, problem.reference, mask)


class NaNScores(Criterion):
    def score(self, context):
        return {k: torch.full_like(p, float("nan")) for k, p in context.params.items()}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"criterion": GraSP()}, TypeError, "no meaning on a layer's reconstruction loss"),
        ({"criterion": SynFlow()}, TypeError, "no meaning on a layer's reconstruction loss"),
        ({"criterion": None}, TypeError, "criterion=None needs update="),
        ({"update": Solver()}, TypeError, "chooses the mask itself; pass criterion=None"),
        ({"update": "refit"}, TypeError, "update must be None"),
        ({"dtype": torch.float16}, ValueError, "dtype must be torch.float32 or torch.float64"),
        ({"stages": 0}, ValueError, "stages must be >= 1"),
        ({"sparsity": None}, ValueError, "sparsity is needed"),
        ({"sparsity": 1.0}, ValueError, "sparsity must satisfy"),
        ({"selection": NM(2, 4), "sparsity": 0.6}, ValueError, "must be 1 - n/m"),
        ({"selection": Targets({r"nothing": 0.5})}, ValueError, "match no pruned parameter"),
        ({"data": None}, TypeError, "data must be calibration batches"),
        ({"data": []}, ValueError, "data holds no calibration batch"),
        ({"data": 3}, TypeError, "data must be a batch or an iterable"),
        ({"blocks": "0"}, ValueError, "names a Linear"),
        ({"blocks": "nowhere"}, ValueError, "is not a module of the model"),
        ({"blocks": ["0", "0"]}, ValueError, "named twice"),
        ({"blocks": 3}, TypeError, "blocks must be None"),
        ({"blocks": ["1"]}, ValueError, "no weight matrix inside the blocks"),
        ({"include": r"0\.weight", "blocks": ["2", "4"]}, ValueError, "is used outside one block"),
    ],
)
def test_refusals_leave_the_model_byte_identical(kwargs, error, match):
    model = mlp()
    before = raw(model.state_dict())
    options = {"criterion": Wanda(), "sparsity": 0.5, "data": DATA, **kwargs}
    with pytest.raises(error, match=match):
        LayerwisePruner(model, **options)
    assert raw(model.state_dict()) == before


def test_refusals_found_while_running_leave_the_model_byte_identical():
    model = mlp()
    before = raw(model.state_dict())
    with pytest.raises(NonFiniteError, match="gave a non-finite score for '0.weight'"):
        LayerwisePruner(model, NaNScores(), 0.5, data=DATA).run()
    assert raw(model.state_dict()) == before

    class Overflow(nn.Module):
        def forward(self, x):
            return x * float("inf")

    model = nn.Sequential(nn.Linear(8, 8), Overflow(), nn.Linear(8, 2))
    pruner = LayerwisePruner(model, Wanda(), 0.5, data=DATA)
    with pytest.raises(NonFiniteError, match="the inputs of '2.weight' are not finite"):
        pruner.run()
    pruner = LayerwisePruner(mlp(), Wanda(), 0.5, data=DATA)
    pruner.run()
    with pytest.raises(RuntimeError, match="already ran"):
        pruner.run()


class Between(nn.Module):
    """Two blocks with a scaling between them: not a chain."""

    def __init__(self, twice=False):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.twice = twice

    def forward(self, x):
        x = self.layers[0](x)
        if self.twice:
            return self.layers[1](self.layers[0](x))
        return self.layers[1](2 * x)


def test_blocks_that_do_not_form_a_chain_are_refused_before_they_are_pruned():
    model = Between()
    before = raw(model.state_dict())
    with pytest.raises(ValueError, match="is not the input of block 'layers.1'"):
        LayerwisePruner(model, Magnitude(), 0.5, data=DATA).run()
    assert raw(model.state_dict()) == before  # checked while block 0 was still dense
    with pytest.raises(ValueError, match="called block 'layers.0' 2 times"):
        LayerwisePruner(Between(twice=True), Magnitude(), 0.5, data=DATA).run()


def test_blocks_are_found_or_named():
    llama = tiny("llama")
    assert find_blocks(llama).names == ("model.layers.0", "model.layers.1", "model.layers.2")
    assert find_blocks(tiny("gpt2")).names[0] == "transformer.h.0"
    assert find_blocks(tiny("opt")).names[0] == "model.decoder.layers.0"
    assert find_blocks(mlp()).names == ("0", "1", "2", "3", "4")
    assert find_blocks(Between()).names == ("layers.0", "layers.1")
    named = find_blocks(llama, ["model.layers.0", "model.layers.1"])
    assert named.modules[1] is llama.model.layers[1]
    with pytest.raises(ValueError, match="lies inside the block"):
        find_blocks(llama, ["model.layers", "model.layers.0"])
    with pytest.raises(ValueError, match="holds no module"):
        find_blocks(nn.Sequential(nn.ModuleList()), "0")

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no stack of blocks found"):
        find_blocks(Flat())


def test_an_encoder_decoder_has_no_single_chain():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                   num_decoder_layers=1, num_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="several stacks of layers"):
        find_blocks(transformers.T5ForConditionalGeneration(config))


def test_two_stacks_side_by_side_are_refused_even_without_no_split_modules():
    """Marian and Pegasus declare no ``_no_split_modules``: the longest of their encoder and
    decoder layer lists used to be pruned and the other left dense, silently."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MarianConfig(
        vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        max_position_embeddings=16, pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"several stacks of layers \(\['model.encoder.layers'"):
        find_blocks(transformers.MarianMTModel(config))

    class EncoderDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
            self.decoder = nn.ModuleList([nn.Linear(8, 8)])
            self.scales = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8), nn.LayerNorm(8)])

    with pytest.raises(ValueError, match="several stacks of layers"):
        find_blocks(EncoderDecoder())
    # a (longer) list of norms beside the layers is no second stack, and not the blocks
    alone = EncoderDecoder()
    del alone.decoder
    assert find_blocks(alone).names == ("encoder.0", "encoder.1")
    # stacks nested in the blocks are not blocks of their own (ConvNeXt: stages of layers)
    convnext = transformers.ConvNextModel(
        transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 1])
    )
    assert find_blocks(convnext).names == ("encoder.stages.0", "encoder.stages.1")
    # nor is a weight-normed layer's list of parametrizations (wav2vec2's position conv)
    alone.decoder = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    assert find_blocks(alone).names == ("encoder.0", "encoder.1")


class Projected(nn.Module):
    """A projection into the width of the blocks, before them (ALBERT's and Electra's
    ``embedding_hidden_mapping_in``/``embeddings_project``)."""

    def __init__(self):
        super().__init__()
        self.project = nn.Linear(8, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x):
        return self.layers[1](self.layers[0](self.project(x)))


def test_default_weights_outside_the_blocks_are_named_as_left_dense():
    with pytest.warns(UserWarning, match=r"1 weight\(s\) .* outside the blocks .*'project.weight'"):
        report = LayerwisePruner(Projected(), Magnitude(), 0.5, data=DATA).run()
    assert [m.name for m in report.matrices] == ["layers.0.weight", "layers.1.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded by choice: nothing to say
        LayerwisePruner(Projected(), Magnitude(), 0.5, data=DATA, exclude="project.weight")


def test_blocks_must_return_hidden_states_and_batches_must_have_a_form():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8)])

        def forward(self, x):
            return {"out": self.layers[0](x)}

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Dict()
            self.head = nn.ModuleList([nn.Linear(8, 2)])

        def forward(self, x):
            return self.head[0](self.inner(x)["out"])

    with pytest.raises(TypeError, match="a block returned a dict"):
        LayerwisePruner(Wrapped(), Magnitude(), 0.5, data=DATA, blocks=["inner", "head.0"]).run()
    with pytest.raises(TypeError, match="each calibration batch must be"):
        model_inputs("text")


@pytest.mark.parametrize(
    "criterion",
    [Magnitude(), LinearModel(lam=0.1), QuadraticModel(), OBD(curvature="fisher_mc"), Wanda()],
)
@pytest.mark.parametrize("selection", ["layerwise", PerRow(), NM(2, 4), Blocks(2, 4)])
def test_every_criterion_and_selection_prunes_exactly_the_target(criterion, selection):
    model = mlp()
    pruner = LayerwisePruner(model, criterion, 0.5, data=DATA, selection=selection, stages=2)
    report = pruner.run()
    for matrix in report.matrices:
        assert matrix.sparsity == 0.5 and matrix.target == 0.5
        weight = model.get_parameter(matrix.name)
        assert torch.equal(weight != 0, pruner.masks[matrix.name])
        assert 0 < matrix.relative_error < 1
    assert report.sparsity == 0.5 and report.worst in report.matrices


def test_targets_set_each_matrix_its_own_sparsity():
    model = mlp()
    selection = Targets({r"2\.weight": 0.75}, structure=PerRow())
    pruner = LayerwisePruner(model, Wanda(), 0.5, data=DATA, selection=selection)
    report = pruner.run()
    assert [m.sparsity for m in report.matrices] == [0.5, 0.75, 0.5]
    assert pruner.masks["2.weight"].sum(1).tolist() == [4] * 8


def test_stages_with_the_exact_refit_lower_the_error_and_the_refit_is_exact():
    problem, inputs = random_problem(out=6, inputs=16, tokens=60, seed=4)
    model = nn.Sequential(nn.Linear(16, 6, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(problem.reference)
    data = inputs.T.contiguous()
    errors = {}
    for stages, update in ((1, None), (1, Refit(Damping(relative=0.0))), (8, Refit())):
        twin = nn.Sequential(nn.Linear(16, 6, bias=False)).double()
        twin.load_state_dict(model.state_dict())
        report = LayerwisePruner(twin, OBD(), 0.75, data=data, stages=stages,
                                 update=update).run()  # fmt: skip
        errors[stages, update is None] = report.matrices[0].relative_error
    assert errors[8, False] < errors[1, False] < errors[1, True]


def test_read_weight_refuses_a_weight_nobody_holds():
    with torch.device("meta"):
        layer = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="on the meta device and no accelerate hook"):
        read_weight(layer, "weight")
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 2))
    with pytest.raises(ValueError, match="on the meta device with no accelerate offload"):
        LayerwisePruner(model, Magnitude(), 0.5, data=DATA)


def test_updates_are_validated():
    check_update(None)
    check_update(Refit())
    check_update(Solver())
    with pytest.raises(TypeError, match="Refit: damping must be a Damping"):
        Refit(damping=0.01)


def test_a_mask_choosing_solver_replaces_the_criterion():
    model = mlp()
    report = LayerwisePruner(model, None, 0.5, data=DATA, update=Solver()).run()
    assert all(m.sparsity == 0.5 for m in report.matrices)
    report = LayerwisePruner(mlp(), None, 0.5, data=DATA, update=Solver(), selection="global")
    assert report.run().sparsity == pytest.approx(0.5, abs=1 / 128)


def test_hugging_face_batches_with_labels_and_padding_run_in_half_precision():
    for dtype in (torch.float16, torch.bfloat16):
        model = tiny("llama", dtype=dtype)
        pruner = LayerwisePruner(model, Wanda(), 0.5, data=batches(), update=Refit())
        report = pruner.run()
        assert pruner.dtype == torch.float32
        assert all(m.sparsity == 0.5 for m in report.matrices)
        assert all(model.get_parameter(m.name).dtype == dtype for m in report.matrices)
        assert report.blocks[0].tokens == 12 + 9 + 12 + 5 + 12
        assert "sparsity 0.5000" in str(report) and report.as_dict()["sparsity"] == 0.5


def test_a_block_called_by_keyword_without_its_hidden_states_is_refused():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Takes(), Takes()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(inputs=x)
            return x

    with pytest.raises(TypeError, match="cannot tell its hidden states apart"):
        LayerwisePruner(Keyword(), Wanda(), 0.5, data=DATA).run()


class Takes(nn.Module):
    """A block whose forward names its input ``x`` but is called with ``inputs=``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x=None, inputs=None):
        return self.linear(inputs if x is None else x)


def test_capture_needs_a_batch():
    from lossprune.layerwise.calibration import capture

    model = mlp()
    with pytest.raises(ValueError, match="data holds no calibration batch"):
        capture(model, find_blocks(model), [], torch.device("cpu"), {})


def test_a_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        LayerwisePruner("model", Wanda(), 0.5, data=DATA)


def test_a_convolution_is_refused():
    model = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Flatten(), nn.Linear(8, 2))
    before = raw(model.state_dict())
    with pytest.raises(
        TypeError, match=r"is not the weight of an nn.Linear.*exclude=\['0.weight'\]"
    ):
        LayerwisePruner(model, Wanda(), 0.5, data=torch.randn(4, 2, 4))
    assert raw(model.state_dict()) == before


def test_a_pattern_needs_a_selection_on_one_matrix():
    from lossprune.layerwise.solvers.patterns import Pattern

    with pytest.raises(TypeError, match="Pattern: selection must be a Selection on one matrix"):
        Pattern(Targets({"x": 0.5}))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_cpu_is_pruned_block_by_block_on_the_gpu():
    """The CPU model's blocks visit the GPU one at a time; the result is the CPU run's."""
    on_cpu, on_gpu = tiny("llama", torch.float32), tiny("llama", torch.float32)
    options = {"sparsity": 0.5, "data": batches(), "update": Refit()}
    LayerwisePruner(on_cpu, Wanda(), **options).run()
    pruner = LayerwisePruner(on_gpu, Wanda(), device="cuda", **options)
    pruner.run()
    for (name, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
        assert b.device.type == "cpu", name  # moved back after its block
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)


def test_fused_experts_are_refused_with_the_way_out():
    from tests.moe_models import tiny_moe, token_batch

    model = tiny_moe("mixtral")
    before = raw(model.state_dict())
    with pytest.raises(TypeError, match=r"exclude=\[r'\.\*experts\.\*'\]"):
        LayerwisePruner(model, Wanda(), 0.5, data=[token_batch()])
    assert raw(model.state_dict()) == before
    report = LayerwisePruner(model, Wanda(), 0.5, data=[token_batch()],
                             exclude=r".*experts.*").run()  # fmt: skip
    assert report.matrices and all("experts" not in m.name for m in report.matrices)
