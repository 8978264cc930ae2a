"""Reproduction of Laurent et al. (2020, arXiv:2006.12279) on top of the lossprune library.

Submodules, imported on demand so that ``import lossprune.experiments`` stays cheap:

* :mod:`~lossprune.experiments.models` -- MLP, VGG11, PreActResNet18, ResNet50, ``build_model``.
* :mod:`~lossprune.experiments.data` -- digits (bundled), MNIST / CIFAR-10 / ImageNet from local
  files, ``load_dataset`` and seeded loaders.
* :mod:`~lossprune.experiments.training` -- SGD training and masked fine-tuning, ``evaluate``.

The library never imports this package.
"""
