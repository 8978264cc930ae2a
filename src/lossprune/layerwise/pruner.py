r"""Layer-wise pruning of a model of any size: one block at a time, each map on its local loss.

:class:`LayerwisePruner` puts the pieces together (layer 5' of docs/architecture.md):

1. the blocks (:mod:`~lossprune.layerwise.blocks`) and the calibration data captured at the
   first block (:mod:`~lossprune.layerwise.calibration`);
2. for each block, on the outputs of the already-pruned blocks before it, with only that block
   on the compute device (:mod:`~lossprune.layerwise.offload`): the input statistics of its
   weight matrices, :math:`G = X X^\top / n` over the counted tokens
   (:class:`~lossprune.curvature.inputs.InputStatistics`, all-reduced across ranks);
3. for each matrix, on its local loss :math:`\|W_0 X - \hat W X\|^2 / n`
   (:mod:`~lossprune.layerwise.local`): π stages following
   :class:`~lossprune.ExponentialSchedule` to the matrix's target, each scoring the CURRENT
   weights with the criterion, selecting with the selection (one matrix at a time:
   :class:`~lossprune.PerRow`, :class:`~lossprune.Layerwise`, :class:`~lossprune.NM`,
   :class:`~lossprune.Blocks`; :class:`~lossprune.Targets` sets per-matrix targets), then
   updating (:mod:`~lossprune.layerwise.updates`: zeroing, the exact refit, or a solver that
   chooses the mask itself);
4. the block's outputs with its pruned weights become the next block's inputs.

Statistics and solves run in float32 (float64 when asked) whatever the model's dtype; pruned
weights are written back in the model's dtype.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._common.batches import is_batch
from .._common.checks import check_fraction, check_positive_int
from .._common.functional import check_deterministic, statistics_dtype
from .._common.linear_maps import is_hf_conv1d
from ..criteria.base import Criterion, ScoringContext
from ..curvature import NonFiniteError
from ..curvature.expert_inputs import is_expert_matrix
from ..curvature.inputs import InputMoments, InputStatistics
from ..pruning import scores
from ..schedules import ExponentialSchedule
from ..selection import NM, Global, ParameterLayout, Selection, Targets, as_selection
from ..selection import prunable_parameters as default_prunable
from .allocation import (
    DEFAULT_ALLOCATION,
    ErrorAllocation,
    NetworkAllocation,
    allocate,
    masked_error_curve,
    network_targets,
    reachable,
)
from .blocks import find_blocks
from .calibration import BlockInputs, ChainCheck, capture
from .local import check_local_criterion, local_statistics
from .offload import (
    check_writable,
    execution_device,
    is_offloaded,
    on_device,
    read_weight,
    write_weight,
)
from .reports import BlockReport, LayerwiseReport, MatrixReport
from .solvers import LayerProblem, LayerSolution
from .solvers.patterns import Pattern
from .updates import MaskSolver, apply_update, check_update

__all__ = ["LayerwisePruner"]


class _Matrix(NamedTuple):
    """A pruned weight matrix and its plan."""

    name: str  # qualified parameter name
    block: int  # index of its block
    local: str  # its module's name inside the block
    transposed: bool  # stored (in, out) (Hugging Face's Conv1D)
    shape: tuple[int, int]  # (out, in)
    target: float
    pattern: Pattern


class LayerwisePruner:
    r"""Prune a model block by block, each weight matrix on its own reconstruction loss.

    Args:
        model: the model (a Hugging Face causal LM, an ``nn.Sequential``, any module whose
            blocks run as a chain); pruned in place. It may be dispatched by accelerate
            (``device_map``, CPU or disk offload): only the current block is on the device.
        criterion: how weights are scored on the local loss (:mod:`lossprune.layerwise.local`):
            :class:`~lossprune.Wanda`, :class:`~lossprune.OBD`, :class:`~lossprune.QuadraticModel`,
            :class:`~lossprune.LinearModel`, :class:`~lossprune.Magnitude` and their sums;
            ``None`` when ``update`` is a solver that chooses the mask itself.
        sparsity: the fraction of each pruned matrix's weights to prune (default: ``1 - n/m``
            for ``selection=NM(n, m)``, required otherwise).
        data: calibration batches: a batch or an iterable of batches (a DataLoader), each a
            mapping of model inputs (``input_ids``, ``attention_mask``, ``labels`` optional),
            ``(inputs, targets)`` or ``((input, ...), targets)``. Padding and ``-100`` labels
            are left out of the statistics (:func:`~lossprune._common.batches.counted_positions`).
        selection: the pattern inside each matrix: :class:`~lossprune.PerRow` (Wanda's rows),
            :class:`~lossprune.Layerwise` (the same sparsity in every matrix),
            :class:`~lossprune.NM`, :class:`~lossprune.Blocks`, :class:`~lossprune.Targets`
            (per-matrix targets by name), or ``"global"``: ``sparsity`` of all the pruned
            weights, each matrix's share from ``allocation``. Default: ``sparsity`` in every
            matrix, per row for a criterion defined per row (:class:`~lossprune.Wanda`, as its
            authors), the whole matrix otherwise (neither allocation beat uniform sparsity on
            both benchmark models at 70%: docs/layerwise.md).
        allocation: with ``selection="global"``, how each matrix's share is found
            (:mod:`lossprune.layerwise.allocation`; default
            :class:`~lossprune.layerwise.ErrorAllocation`).
        update: ``None`` (pruned weights zeroed), :class:`~lossprune.layerwise.Refit` (exact
            refit of the kept weights after each stage) or a mask-choosing solver
            (:mod:`lossprune.layerwise.updates`).
        stages: π, the number of stages per matrix (:class:`~lossprune.ExponentialSchedule`
            to its target), scored on the current weights, with ``update`` between them.
        blocks: the blocks (:func:`~lossprune.layerwise.blocks.find_blocks`); default: found.
        include, exclude: which weight matrices to prune, as for
            :func:`lossprune.selection.prunable_parameters`; only matrices inside the blocks are
            pruned (the others, e.g. a language model's head, stay dense).
        device: the compute device (default: where accelerate runs the first block, else where
            its weights are).
        dtype: float32 or float64, for statistics and solves (default: float64 for a float64
            model, float32 otherwise, whatever the model's dtype).
        keep_masks: keep every pruned matrix's mask in :attr:`masks` (on the CPU, one ``bool``
            per weight); ``False`` for models whose masks should not stay in memory (the zeros
            of the weights are the masks).
        progress: progress bars (blocks, and batches of the capture).

    Raises:
        TypeError, ValueError: anything the run could not do exactly, before anything changes
            (criterion, selection, update, data, blocks, parameters; see docs/errors.csv).

    Example:
        >>> import torch
        >>> from lossprune import LayerwisePruner, Wanda
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 4))
        >>> pruner = LayerwisePruner(model, Wanda(), sparsity=0.5, data=torch.randn(32, 8))
        >>> report = pruner.run()
        >>> [round(m.sparsity, 2) for m in report.matrices]
        [0.5, 0.5]
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Criterion | None,
        sparsity: float | None = None,
        *,
        data: Any,
        selection: str | Selection | None = None,
        update: Any = None,
        stages: int = 1,
        allocation: ErrorAllocation | NetworkAllocation | None = None,
        blocks: str | Sequence[str] | None = None,
        include: Any = None,
        exclude: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        keep_masks: bool = True,
        progress: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        check_update(update)
        if isinstance(update, MaskSolver):
            if criterion is not None:
                raise TypeError(
                    f"update={update!r} chooses the mask itself; pass criterion=None (or "
                    "update=Refit() to refit the mask the criterion chooses)"
                )
        elif criterion is None:
            raise TypeError(
                "criterion=None needs update= a solver that chooses the mask itself (OBS(), "
                "ADMM(), ...); otherwise pass a criterion such as Wanda()"
            )
        else:
            check_local_criterion(criterion)
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.stages = check_positive_int("stages", stages)
        self._batches = _check_data(data)
        check_deterministic(model)
        self.stack = find_blocks(model, blocks)
        structure = _selection(selection, criterion)
        sparsity = _sparsity(sparsity, structure)
        if isinstance(structure, Global):
            allocation = DEFAULT_ALLOCATION if allocation is None else allocation
            structure = _within_matrix(criterion)  # inside each matrix, at its own target
        elif allocation is not None:
            raise ValueError(
                "allocation= sets each matrix's share of a GLOBAL sparsity: pass "
                "selection='global' with it"
            )
        if allocation is not None and not isinstance(
            allocation, (ErrorAllocation, NetworkAllocation)
        ):
            raise TypeError(
                "allocation must be an ErrorAllocation or a NetworkAllocation, got "
                f"{type(allocation).__name__}"
            )
        self._matrices = _plan(model, self.stack, structure, sparsity, include, exclude)
        for matrix in self._matrices:
            module = model.get_submodule(matrix.name.rpartition(".")[0])
            if module.weight.device.type == "meta" and not is_offloaded(module):
                raise ValueError(
                    f"{matrix.name!r} is on the meta device with no accelerate offload holding "
                    "its value: load the model's weights first"
                )
            check_writable(module, "weight")

        self.model = model
        self.criterion = criterion
        self.sparsity = sparsity
        self.selection = structure
        self.update = update
        self.allocation = allocation
        self.device = None if device is None else torch.device(device)
        first = self._matrices[0].name
        self.dtype = dtype or statistics_dtype({first: model.get_parameter(first)})
        self.keep_masks = bool(keep_masks)
        self.progress = bool(progress)
        self.masks: dict[str, Tensor] = {}
        self.report: LayerwiseReport | None = None

    @property
    def names(self) -> list[str]:
        """The qualified names of the matrices this pruner prunes."""
        return [m.name for m in self._matrices]

    def run(self) -> LayerwiseReport:
        """Prune every block in order; returns (and keeps in :attr:`report`) what was done.

        Raises:
            RuntimeError: the pruner already ran.
            NonFiniteError: non-finite inputs of a block, a non-finite score or solved weight
                (the blocks before the one that failed are pruned; that block and those after
                it are unchanged).
        """
        if self.report is not None:
            raise RuntimeError("this LayerwisePruner already ran; build a new one")
        start = time.perf_counter()
        stack = self.stack
        device = self.device or execution_device(stack.modules[0]) or _device_of(stack.modules[0])
        forward_options = _forward_options(self.model)
        batches, dense_slices = capture(
            self.model, stack, self._batches, device, forward_options, self._bar("calibration")
        )
        chain = ChainCheck(batches[0], dense_slices)
        if self.allocation is not None:
            targets = self._allocate(batches, chain, device)
            self._matrices = [m._replace(target=targets[m.name]) for m in self._matrices]
        # The allocation's dense pass has checked the chain already.
        checked = None if self.allocation is not None else chain
        reports = self._sweep(batches, checked, device, self._prune_block, "pruning")
        self.report = LayerwiseReport(tuple(reports), time.perf_counter() - start)
        return self.report

    def _sweep(
        self,
        batches: list[BlockInputs],
        chain: ChainCheck | None,
        device: torch.device,
        visit: Callable[[int, nn.Module, Mapping[str, InputMoments]], BlockReport],
        desc: str,
    ) -> list[BlockReport]:
        """Blocks in order: statistics, ``visit``, then the block's outputs as the next inputs."""
        stack = self.stack
        reports = []
        bar = tqdm(range(len(stack.names)), desc=desc, unit="block", disable=not self.progress)
        for index in bar:
            start = time.perf_counter()
            block = stack.modules[index]
            with on_device(block, device):
                moments = self._statistics(index, block, batches)
                if chain is not None:
                    chain.check(block, index, stack.names)
                report = visit(index, block, moments)
                if index + 1 < len(stack.names):
                    with torch.no_grad():
                        for inputs in batches:
                            inputs.hidden = inputs.run(block, index)
            reports.append(report._replace(seconds=time.perf_counter() - start))
            if report.matrices:
                worst = max(m.relative_error for m in report.matrices)
                bar.set_postfix(worst_error=f"{worst:.3g}")
        return reports

    def _statistics(
        self, index: int, block: nn.Module, batches: list[BlockInputs]
    ) -> dict[str, InputMoments]:
        """The input moments of the block's pruned matrices, by qualified name, checked finite.

        Raises:
            NonFiniteError: NaN or inf in a matrix's inputs.
        """
        prefix = self.stack.names[index]
        local = {
            m.name: m.name[len(prefix) + 1 :] if prefix else m.name
            for m in self._matrices
            if m.block == index
        }
        if not local:
            return {}
        statistics = InputStatistics(block, list(local.values()), gram=True, dtype=self.dtype)
        with torch.no_grad():
            for inputs in batches:
                with statistics.recording(inputs.counted):
                    inputs.run(block, index)
        moments = statistics.means()
        for name, local_name in local.items():
            if not bool(torch.isfinite(moments[local_name].gram).all()):  # type: ignore[arg-type]
                raise NonFiniteError(
                    f"the inputs of {name!r} are not finite (NaN or inf in the model's own "
                    "activations on the calibration data); this block and the ones after it "
                    "are unchanged"
                )
        return {name: moments[local_name] for name, local_name in local.items()}

    def _allocate(
        self, batches: list[BlockInputs], chain: ChainCheck, device: torch.device
    ) -> dict[str, float]:
        """Each matrix's target under a global sparsity, one its pattern can reach.

        See :mod:`~lossprune.layerwise.allocation`.
        """
        sizes = {m.name: m.shape[0] * m.shape[1] for m in self._matrices}
        patterns = {m.name: (m.pattern, m.shape) for m in self._matrices}

        def realised(name: str, sparsity: float) -> float:
            pattern, shape = patterns[name]
            kept = torch.ones(shape, dtype=torch.bool)
            return 1.0 - float(pattern(torch.zeros(shape), kept, sparsity).float().mean())

        assert self.allocation is not None
        ceiling = 1.0 - self.allocation.min_density
        return reachable(self._shares(batches, chain, device), sizes, realised, ceiling)

    def _shares(
        self, batches: list[BlockInputs], chain: ChainCheck, device: torch.device
    ) -> dict[str, float]:
        allocation = self.allocation
        sizes = {m.name: m.shape[0] * m.shape[1] for m in self._matrices}
        if isinstance(allocation, NetworkAllocation):
            scored = scores(
                self.model, allocation.criterion, [_labelled(b) for b in self._batches],
                loss_fn=allocation.loss_fn, include=list(sizes),
                generator=torch.Generator().manual_seed(0),  # Monte-Carlo labels, reproducible
            )  # fmt: skip
            return network_targets(scored, self.sparsity, allocation.min_density)
        assert isinstance(allocation, ErrorAllocation)
        grid = allocation.grid()
        curves: dict[str, list[tuple[float, float]]] = {}
        criterion = self.criterion

        def measure(index: int, block: nn.Module, moments: Mapping[str, InputMoments]) -> Any:
            for matrix in (m for m in self._matrices if m.block == index):
                moment = moments[matrix.name]
                assert moment.gram is not None
                stored = read_weight(block.get_submodule(matrix.local), "weight")
                reference = stored.to(moment.gram.device, moment.gram.dtype)
                reference = reference.T if matrix.transposed else reference
                kept = torch.ones_like(reference, dtype=torch.bool)
                problem = LayerProblem(reference, moment.gram, kept)
                if criterion is None:  # the solver's choice is not known before it runs
                    ranking = reference.abs()
                else:
                    ranking = _local_scores(
                        criterion, matrix, problem, reference, kept, block, moment.rows
                    )
                masks = [matrix.pattern(ranking, kept, p) for p in grid]
                curves[matrix.name] = masked_error_curve(reference, moment.gram, masks)
            return BlockReport(self.stack.names[index], (), 0.0, 0)

        first_inputs = [inputs.hidden for inputs in batches]
        self._sweep(batches, chain, device, measure, "allocation")
        for inputs, hidden in zip(batches, first_inputs):
            inputs.hidden = hidden  # the pruning pass starts again from the first block
        return allocate(curves, sizes, self.sparsity)

    def _bar(self, desc: str) -> Any:
        def wrap(items: Iterable[Any]) -> Iterable[Any]:
            return tqdm(items, desc=desc, unit="batch", leave=False, disable=not self.progress)

        return wrap

    def _prune_block(
        self, index: int, block: nn.Module, moments: Mapping[str, InputMoments]
    ) -> BlockReport:
        matrices = [m for m in self._matrices if m.block == index]
        prefix = self.stack.names[index]
        # Every matrix of the block is solved before any is written: an error leaves the
        # block as it was.
        solved = []
        for matrix in matrices:
            start = time.perf_counter()
            moment = moments[matrix.name]
            assert moment.gram is not None
            module = block.get_submodule(matrix.local)
            stored = read_weight(module, "weight")
            reference = stored.to(moment.gram.device, moment.gram.dtype)
            reference = reference.T if matrix.transposed else reference
            kept = torch.ones_like(reference, dtype=torch.bool)
            problem = LayerProblem(reference, moment.gram, kept)
            solution = self._solve(matrix, problem, block, moment.rows)
            solved.append((matrix, module, stored, solution, time.perf_counter() - start))
        reports = []
        for matrix, module, stored, solution, seconds in solved:
            mask = solution.mask.T if matrix.transposed else solution.mask
            if self.update is None:  # the kept weights exactly as they were
                weight = stored.masked_fill(~mask.to(stored.device), 0)
            else:
                weight = solution.weight.T if matrix.transposed else solution.weight
            write_weight(module, "weight", weight.to(stored.dtype))
            if self.keep_masks:
                self.masks[matrix.name] = mask.to("cpu", copy=True)
            pruned = 1.0 - float(solution.mask.float().mean())
            reports.append(
                MatrixReport(
                    matrix.name, prefix, matrix.shape, matrix.target, pruned, solution.error,
                    solution.relative_error, seconds,
                )
            )  # fmt: skip
        tokens = next(iter(moments.values())).rows if moments else 0
        return BlockReport(prefix, tuple(reports), 0.0, tokens)

    def _solve(
        self, matrix: _Matrix, problem: LayerProblem, block: nn.Module, rows: int
    ) -> LayerSolution:
        """Prune one matrix: π stages of score, select, update (or the update's own solve)."""
        if isinstance(self.update, MaskSolver):
            return self.update.solve(problem, matrix.pattern, matrix.target)
        criterion = self.criterion
        assert criterion is not None
        weight, mask = problem.reference, problem.kept
        solved = apply_update(None, problem, mask, weight)
        for target in _stage_targets(matrix.target, self.stages):
            scores = _local_scores(criterion, matrix, problem, weight, mask, block, rows)
            mask = matrix.pattern(scores, mask, target)
            solved = apply_update(self.update, problem, mask, weight)
            weight = solved.weight
        return solved


def _labelled(raw: Any) -> Any:
    """A mapping batch with ``labels`` (the inputs, ``-100`` on padding) when it has none."""
    if not isinstance(raw, Mapping) or "labels" in raw or "input_ids" not in raw:
        return raw
    labels = raw["input_ids"]
    mask = raw.get("attention_mask")
    if isinstance(mask, Tensor):
        labels = labels.masked_fill(mask == 0, -100)
    return {**raw, "labels": labels}


def _local_scores(
    criterion: Criterion,
    matrix: _Matrix,
    problem: LayerProblem,
    weight: Tensor,
    kept: Tensor,
    block: nn.Module,
    rows: int,
) -> Tensor:
    """The criterion's scores of ``weight`` on the local loss (group scores for tiles).

    Raises:
        NonFiniteError: a NaN or infinite score of a ``kept`` entry.
    """
    statistics = local_statistics(criterion, {matrix.name: problem}, {matrix.name: weight}, rows)
    context = ScoringContext(block, {matrix.name: weight}, statistics)
    group_sum = getattr(matrix.pattern.selection, "group_sum", None)
    if group_sum is None:
        scores = criterion.score(context)[matrix.name]
    else:
        layout = ParameterLayout(matrix.shape, "Linear", (1,))  # the (out, in) view

        def sum_groups(name: str, tensor: Tensor) -> Tensor:
            return group_sum(layout, tensor)

        scores = criterion.group_score(context, sum_groups)[matrix.name]
    if not bool(scores[kept].isfinite().all()):
        raise NonFiniteError(
            f"{criterion!r} gave a non-finite score for {matrix.name!r} on its local loss"
        )
    return scores


def _stage_targets(target: float, stages: int) -> Iterator[float]:
    if target == 0.0:
        return iter(())
    return iter(ExponentialSchedule(target, stages))


def _device_of(block: nn.Module) -> torch.device:
    first = next(block.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _forward_options(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for a model whose forward takes it (no key/value cache is built)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in parameters else {}


def _check_data(data: Any) -> list[Any]:
    """The calibration batches as a list (read once: they are captured at the first block).

    Raises:
        TypeError: ``None``, or neither a batch nor an iterable of batches.
        ValueError: no batch.
    """
    if data is None:
        raise TypeError("data must be calibration batches, got None")
    if isinstance(data, (Tensor, Mapping)) or is_batch(data):
        return [data]
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a batch or an iterable of batches, got {type(data).__name__}"
        )
    batches = list(data)
    if not batches:
        raise ValueError("data holds no calibration batch")
    return batches


def _selection(selection: object, criterion: Criterion | None) -> Selection:
    """The selection object; by default :func:`_within_matrix` (the same sparsity everywhere)."""
    return _within_matrix(criterion) if selection is None else as_selection(selection)


def _within_matrix(criterion: Criterion | None) -> Selection:
    """Inside each matrix: per row for a criterion defined per row (Wanda), else the matrix."""
    per_row = criterion is not None and criterion.default_scope() == "per_row"
    return as_selection("per_row" if per_row else "layerwise")


def _sparsity(sparsity: object, selection: Selection) -> float:
    if sparsity is None:
        structure = selection.structure if isinstance(selection, Targets) else selection
        if isinstance(structure, NM):
            return 1.0 - structure.n / structure.m
        raise ValueError("sparsity is needed (the fraction of each matrix's weights to prune)")
    return check_fraction("sparsity", sparsity)


def _plan(
    model: nn.Module,
    stack: Any,
    selection: Selection,
    sparsity: float,
    include: Any,
    exclude: Any,
) -> list[_Matrix]:
    """Each pruned matrix with its block, layout, target and pattern, checked up front.

    Raises:
        TypeError: a pruned parameter that is not the weight of an ``nn.Linear`` or ``Conv1D``.
        ValueError: a pruned parameter outside the blocks named by ``include=``, a weight shared
            by modules of several blocks, or a target the selection cannot reach.
    """
    candidates = default_prunable(model, include, exclude)
    users = _users_by_parameter(model)
    matrices = []
    targets = _targets(selection, list(candidates), sparsity)
    structure = selection.structure if isinstance(selection, Targets) else selection
    outside = []
    for name, param in candidates.items():
        blocks = {_block_of(stack.names, module_name) for module_name, _ in users[id(param)]}
        if None in blocks or len(blocks) != 1:
            if include is not None:
                raise ValueError(
                    f"{name!r} is used outside one block ({sorted(map(str, blocks))}); "
                    "layer-wise pruning prunes the weights of one block at a time"
                )
            outside.append(name)
            continue
        block = blocks.pop()
        assert block is not None
        module_name, module = users[id(param)][0]
        if is_expert_matrix(model, name):
            raise TypeError(
                f"{name!r} holds the matrices of a mixture of experts (one per expert, each fed "
                "by its routed tokens), which layer-wise pruning does not prune yet; leave them "
                "out with exclude=[r'.*experts.*']"
            )
        transposed = is_hf_conv1d(module)
        if not (isinstance(module, nn.Linear) or transposed) or not name.endswith(".weight"):
            raise TypeError(
                f"{name!r} ({type(module).__name__}) is not the weight of an nn.Linear or a "
                "Hugging Face Conv1D: layer-wise pruning needs a matrix (outputs, inputs); "
                f"leave it dense with exclude=[{name!r}]"
            )
        shape = tuple(param.shape[::-1] if transposed else param.shape)
        assert len(shape) == 2
        pattern = Pattern(structure)  # type: ignore[arg-type]
        pattern.check(torch.Size(shape), targets[name])
        matrices.append(
            _Matrix(name, block, module_name[len(stack.names[block]) + 1 :], transposed,
                    (shape[0], shape[1]), targets[name], pattern)
        )  # fmt: skip
    if not matrices:
        raise ValueError("no weight matrix inside the blocks to prune")
    if outside:
        # Said, not silent: the sparsity asked for holds for the blocks' matrices only.
        shown = ", ".join(repr(n) for n in outside[:4]) + (", ..." if len(outside) > 4 else "")
        warnings.warn(
            f"{len(outside)} weight(s) of the default selection lie outside the blocks "
            f"({stack.found_by}) and stay dense: {shown}; name the blocks with blocks=[...] to "
            "take them in, or exclude= them to silence this",
            UserWarning,
            stacklevel=3,
        )
    return matrices


def _targets(selection: Selection, names: list[str], sparsity: float) -> dict[str, float]:
    if not isinstance(selection, Targets):
        return dict.fromkeys(names, sparsity)
    targets = {}
    for pattern, group in selection.groups(names).items():
        for name in group:
            targets[name] = sparsity if pattern is None else selection.sparsity[pattern]
    return targets


def _users_by_parameter(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                users.setdefault(id(param), []).append((module_name, module))
    return users


def _block_of(blocks: Sequence[str], module_name: str) -> int | None:
    for index, name in enumerate(blocks):
        if not name or module_name == name or module_name.startswith(f"{name}."):
            return index
    return None
