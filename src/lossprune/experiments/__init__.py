"""Reproduction of Laurent et al. (2020, arXiv:2006.12279) on top of the lossprune library.

The top layer of docs/architecture.md: it uses the library's public API as any user would, and
nothing in the library imports it.

Submodules, imported on demand so that ``import lossprune.experiments`` stays cheap:

* :mod:`~lossprune.experiments.models` -- MLP, VGG11, PreActResNet18, ResNet50, ``build_model``.
* :mod:`~lossprune.experiments.data` -- digits (bundled), MNIST / CIFAR-10 / ImageNet from local
  files, ``load_dataset`` and seeded loaders.
* :mod:`~lossprune.experiments.training` -- SGD training and masked fine-tuning, ``evaluate``.
* :mod:`~lossprune.experiments.presets` -- named sweep grids (``digits-quick``, ``mnist-paper``...).
* :mod:`~lossprune.experiments.records` -- run configurations and the resumable results file.
* :mod:`~lossprune.experiments.checkpoints` -- dense networks trained once per seed, cached.
* :mod:`~lossprune.experiments.run` -- one run: prune, measure, fine-tune, measure.
* :mod:`~lossprune.experiments.sweep` -- expand a preset, run what is missing, append records.
* :mod:`~lossprune.experiments.analysis`, :mod:`~lossprune.experiments.figures`,
  :mod:`~lossprune.experiments.findings` -- read records, draw the paper's figures, check its
  five findings.
* :mod:`~lossprune.experiments.nm_quality` -- the 2:4 quality table on digits (docs/structured.md).
* :mod:`~lossprune.experiments.cli` -- the ``lossprune`` command line.
* :mod:`~lossprune.experiments.checks` -- the command line's input, checked before any work.
* :mod:`~lossprune.experiments.locking` -- one writer per results file.
* :mod:`~lossprune.experiments.workers` -- worker processes that end with their sweep.
* :mod:`~lossprune.experiments.allocator` -- glibc tuning that makes CPU sweeps faster.

The library never imports this package.
"""
