"""Named sweep configurations: the paper's grids and small stand-ins that run on a laptop.

A :class:`Preset` fixes the dataset, network, training and fine-tuning setup, the sparsity target
and a list of :class:`Grid` blocks; each block is a product criteria x lambda x stages x schedule.
Blocks let one preset mix the main grid of Laurent et al. (2020, arXiv:2006.12279, Fig. 1) with
cheaper side grids (Magnitude once per stage count, the linear schedule for one criterion,
GraSP/SynFlow baselines) instead of crossing everything with everything.

Digits stand-in for MNIST: the 64-300-100-10 MLP has 50,200 prunable weights. At 95% sparsity it
keeps 2,510 of them, close to the 3,069 the paper's 784-300-100-10 MLP keeps at 98.847% on MNIST,
and one-shot magnitude pruning already costs about 1.5 nats of training loss: the same "hard"
regime in which the paper's criteria separate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "TEXT_DATASET",
    "CRITERIA",
    "LOSS_MODELS",
    "SCHEDULES",
    "PAPER_LAMS",
    "TrainSetup",
    "Update",
    "UPDATES",
    "Grid",
    "Preset",
    "PRESETS",
    "get_preset",
]

TEXT_DATASET = "stdlib-docstrings"
"""The byte-level docstring corpus (:mod:`.text`) that language-model presets train on."""

CRITERIA: tuple[str, ...] = ("LM", "QM", "OBD", "MP", "GraSP", "SynFlow")
"""Criterion names used in configs and records."""

LOSS_MODELS: tuple[str, ...] = ("LM", "QM", "OBD")
"""The criteria that take a step-size strength lambda."""

SCHEDULES: tuple[str, ...] = ("exponential", "linear")

UPDATES: tuple[str, ...] = ("zero", "compensate")
"""What happens to the kept weights after each stage (see :class:`lossprune.Pruner`)."""

PAPER_LAMS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PAPER_STAGES: tuple[int, ...] = (1, 14, 140)


@dataclass(frozen=True)
class TrainSetup:
    """SGD setup of training or fine-tuning (momentum 0.9, weight decay 5e-4, as in the paper)."""

    epochs: int
    lr: float = 0.1
    lr_schedule: str = "step"
    batch_size: int = 100
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class Update:
    """The weight update of a run (beyond the paper, which only zeroes the pruned weights).

    Attributes:
        kind: ``"zero"`` (the paper) or ``"compensate"`` (the kept weights take the
            step-size-constrained quadratic model's best step, :class:`lossprune.Compensation`).
        lam: λ of the compensation step ``(C + λI)``; with ``auto_lam`` the starting λ.
        auto_lam: choose λ per stage as a trust region (Levenberg-Marquardt).
    """

    kind: str = "zero"
    lam: float | None = None
    auto_lam: bool = False

    def __post_init__(self) -> None:
        if self.kind not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.kind!r}")
        if self.kind == "zero" and (self.lam is not None or self.auto_lam):
            raise ValueError("update lam and auto_lam only apply with kind='compensate'")
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"update lam must be >= 0, got {self.lam}")


ZERO = Update()


@dataclass(frozen=True)
class Grid:
    """One block of a sweep: every combination of its criteria, lambdas, stages and schedules.

    Attributes:
        criteria: names from :data:`CRITERIA`.
        lams: step-size strengths; ignored (recorded as ``None``) for criteria without one.
        stages: numbers of pruning stages pi.
        schedules: names from :data:`SCHEDULES`.
        track_stages: also record the training loss after every stage (ΔL vs sparsity, Fig. 2).
        updates: the weight updates to cross with the rest (default: the paper's zeroing only).
        min_density: every layer keeps at least this fraction of its weights.
        diagnostics: record every stage's loss before/after and the quadratic model's
            predicted ΔL (one more gradient and Hessian-vector pass per stage).
    """

    criteria: tuple[str, ...]
    lams: tuple[float, ...] = (0.0,)
    stages: tuple[int, ...] = (1,)
    schedules: tuple[str, ...] = ("exponential",)
    track_stages: bool = False
    updates: tuple[Update, ...] = (ZERO,)
    min_density: float = 0.0
    diagnostics: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.criteria) - set(CRITERIA))
        if unknown:
            raise ValueError(f"unknown criteria {unknown}; valid names are {', '.join(CRITERIA)}")
        bad = sorted(set(self.schedules) - set(SCHEDULES))
        if bad:
            raise ValueError(f"unknown schedules {bad}; valid names are {', '.join(SCHEDULES)}")
        if any(s < 1 for s in self.stages):
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if any(lam < 0 for lam in self.lams):
            raise ValueError(f"lams must be >= 0, got {self.lams}")
        if not all(isinstance(u, Update) for u in self.updates) or not self.updates:
            raise ValueError(f"updates must be a non-empty tuple of Update, got {self.updates}")
        if not 0.0 <= self.min_density <= 1.0:
            raise ValueError(f"min_density must be in [0, 1], got {self.min_density}")


@dataclass(frozen=True)
class Preset:
    """Everything a sweep needs besides the output folder, seeds and device.

    Attributes:
        name: what ``lossprune sweep --preset`` accepts.
        description: one line for ``--help`` and ``--list``.
        dataset, model: names for :func:`~lossprune.experiments.data.load_dataset` and
            :func:`~lossprune.experiments.models.build_model`.
        sparsities: target sparsities (fraction of prunable weights set to zero).
        seeds: default seeds; each one fixes data split, initialisation, training and pruning.
        grids: the blocks of the sweep.
        train: training of the dense network.
        finetune: fine-tuning with the mask fixed (the paper uses the training schedule again).
        examples: scoring examples drawn afresh before each stage (paper: 1000).
        curvature: diagonal curvature of QM and OBD (``"fisher"`` exact, ``"fisher_mc"``).
        loss_examples: training examples on which ΔL is measured (``None``: all of them).
        needs_root: the dataset is read from local files given by ``--data-root``.
        threads: torch intra-op threads per process (``None``: torch's default). Tiny models
            are several times faster on one thread than on two busy cores.
        jobs: default number of worker processes.
        dense_from: another preset whose cached dense networks (``<out>/../<dense_from>/models``)
            are copied instead of training again, when their training setup is the same.
    """

    name: str
    description: str
    dataset: str
    model: str
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...]
    grids: tuple[Grid, ...]
    train: TrainSetup
    finetune: TrainSetup
    examples: int = 1000
    curvature: str = "fisher"
    loss_examples: int | None = None
    needs_root: bool = False
    threads: int | None = None
    jobs: int = 1
    dense_from: str | None = None


def _paper_grids(lams: tuple[float, ...], stages: tuple[int, ...], baseline_stages: int) -> tuple:
    """Main grid, Magnitude once per pi, QM with both schedules, GraSP and SynFlow."""
    multi = tuple(s for s in stages if s > 1)
    return (
        Grid(LOSS_MODELS, lams, stages),
        Grid(("MP",), (0.0,), stages),
        Grid(("QM",), lams, multi, ("exponential", "linear"), track_stages=True),
        Grid(("GraSP",), (0.0,), (1,)),
        Grid(("SynFlow",), (0.0,), (baseline_stages,)),
    )


def _cpu_jobs() -> int:
    # One process per core, each on one thread: the tiny digits runs do not scale with threads.
    return max(1, min(os.cpu_count() or 1, 4))


_DIGITS_TRAIN = TrainSetup(epochs=20)

# The tiny language model trains with AdamW and a cosine schedule (experiments.lm.train_lm):
# momentum is not used, so it is recorded as 0.
_LM_TRAIN = TrainSetup(
    epochs=6, lr=3e-3, lr_schedule="cosine", batch_size=32, momentum=0.0, weight_decay=0.01
)
_LM_FINETUNE = TrainSetup(
    epochs=1, lr=1e-3, lr_schedule="cosine", batch_size=32, momentum=0.0, weight_decay=0.01
)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="digits-smoke",
            description="seconds-long end-to-end check: 1 seed, pi in {1, 3}, 1 fine-tuning epoch",
            dataset="digits",
            model="mlp",
            sparsities=(0.95,),
            seeds=(0,),
            grids=(
                Grid(LOSS_MODELS, (0.0, 1e-2), (1, 3)),
                Grid(("MP",), (0.0,), (1, 3)),
                Grid(("QM",), (0.0, 1e-2), (3,), ("exponential", "linear"), track_stages=True),
                Grid(("GraSP",), (0.0,), (1,)),
                Grid(("SynFlow",), (0.0,), (3,)),
            ),
            train=TrainSetup(epochs=3),
            finetune=TrainSetup(epochs=1),
            threads=1,
        ),
        Preset(
            name="digits-quick",
            description="the README's demo: digits MLP, LM/QM/OBD/MP, pi in {1, 14, 140}, 2 seeds",
            dataset="digits",
            model="mlp",
            sparsities=(0.95,),
            seeds=(0, 1),
            grids=(
                # Five lambdas and the linear schedule for QM at two of them keep the demo
                # under 10 minutes on 2 cores; π = 140 with the exact Fisher dominates the cost.
                Grid(LOSS_MODELS, (0.0, 1e-2, 1e-1, 1.0, 10.0), PAPER_STAGES),
                Grid(("MP",), (0.0,), PAPER_STAGES),
                Grid(("QM",), (0.0, 1e-2), (14, 140), ("exponential", "linear"), True),
                Grid(("GraSP",), (0.0,), (1,)),
                Grid(("SynFlow",), (0.0,), (100,)),
            ),
            train=_DIGITS_TRAIN,
            # The training schedule (lr 0.1, divided by 10 at 50% and 75%) compressed to 5 epochs.
            finetune=TrainSetup(epochs=5),
            threads=1,
            jobs=_cpu_jobs(),
        ),
        Preset(
            name="digits-beyond",
            description="beyond the paper on digits: compensation updates, auto λ, min_density",
            dataset="digits",
            model="mlp",
            sparsities=(0.95,),
            seeds=(0, 1),
            grids=(
                Grid(
                    ("QM", "OBD"),
                    (0.0, 1e-2),
                    (1, 14),
                    updates=(
                        ZERO,
                        Update("compensate", 0.1),
                        Update("compensate", 1.0),
                        Update("compensate", 1e-3, auto_lam=True),
                    ),
                    diagnostics=True,
                ),
                # The paper's OBD π = 1, λ = 0 divergence, with every layer keeping 1%.
                Grid(("OBD",), (0.0,), (1,), min_density=0.01, diagnostics=True),
            ),
            train=_DIGITS_TRAIN,
            finetune=TrainSetup(epochs=5),
            threads=1,
            jobs=_cpu_jobs(),
            dense_from="digits-quick",
        ),
        Preset(
            name="digits-full",
            description="the paper's full grid (9 lambdas, 5 seeds) on digits, full fine-tuning",
            dataset="digits",
            model="mlp",
            sparsities=(0.95,),
            seeds=(0, 1, 2, 3, 4),
            grids=_paper_grids(PAPER_LAMS, PAPER_STAGES, 100),
            train=_DIGITS_TRAIN,
            finetune=_DIGITS_TRAIN,
            threads=1,
            jobs=_cpu_jobs(),
        ),
        Preset(
            name="tinylm-quick",
            description="beyond the paper: a byte-level GPT-2 on stdlib docstrings, 50/70/90%",
            dataset=TEXT_DATASET,
            model="gpt2-2x64",
            sparsities=(0.5, 0.7, 0.9),
            seeds=(0,),
            grids=(
                Grid(LOSS_MODELS, (0.0, 1e-2, 1.0), (1, 14)),
                Grid(("MP",), (0.0,), (1, 14)),
            ),
            train=_LM_TRAIN,
            finetune=_LM_FINETUNE,
            # 32 blocks of 64 bytes: 2,016 predicted tokens per stage. The exact Fisher of a
            # 256-way softmax over coupled tokens costs hundreds of gradients; one sampled label
            # per token is the practical statistic for language models.
            examples=32,
            curvature="fisher_mc",
            loss_examples=512,
            threads=1,
            jobs=_cpu_jobs(),
        ),
        Preset(
            name="mnist-paper",
            description="MLP 784-300-100-10 (tanh) on local MNIST idx files at 98.847% sparsity",
            dataset="mnist",
            model="mlp",
            sparsities=(0.98847,),
            seeds=(0, 1, 2, 3, 4),
            grids=_paper_grids(PAPER_LAMS, PAPER_STAGES, 100),
            train=TrainSetup(epochs=100, lr=0.05),
            finetune=TrainSetup(epochs=100, lr=0.05),
            needs_root=True,
        ),
        Preset(
            name="cifar10-vgg11",
            description="VGG11 (no batch norm) on local CIFAR-10 batches at 95.6% sparsity",
            dataset="cifar10",
            model="vgg11",
            sparsities=(0.956,),
            seeds=(0, 1, 2, 3, 4),
            grids=_paper_grids(PAPER_LAMS, PAPER_STAGES, 100),
            train=TrainSetup(epochs=200, lr=0.05),
            finetune=TrainSetup(epochs=200, lr=0.05),
            loss_examples=10000,
            needs_root=True,
        ),
        Preset(
            name="cifar10-preactresnet18",
            description="PreActResNet18 on local CIFAR-10 batches at 95.6% sparsity",
            dataset="cifar10",
            model="preactresnet18",
            sparsities=(0.956,),
            seeds=(0, 1, 2, 3, 4),
            grids=_paper_grids(PAPER_LAMS, PAPER_STAGES, 100),
            train=TrainSetup(epochs=200),
            finetune=TrainSetup(epochs=200),
            loss_examples=10000,
            needs_root=True,
        ),
        Preset(
            name="imagenet-resnet50",
            description="ResNet50 on a local ImageNet folder at 70% and 90% sparsity (MC Fisher)",
            dataset="imagenet",
            model="resnet50",
            sparsities=(0.7, 0.9),
            seeds=(0, 1, 2, 3, 4),
            grids=_paper_grids(PAPER_LAMS, PAPER_STAGES, 100),
            # Batch 100 as in the paper; lr 0.04 is the usual 0.1 per 256 images, scaled.
            train=TrainSetup(epochs=90, lr=0.04, lr_schedule="cosine"),
            finetune=TrainSetup(epochs=90, lr=0.04, lr_schedule="cosine"),
            curvature="fisher_mc",
            loss_examples=10000,
            needs_root=True,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ValueError: naming the valid presets.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets are {', '.join(PRESETS)}")
    return PRESETS[name]
