"""Integrations of lossprune with training frameworks.

Each integration lives in its own module and imports its framework only when that module is
imported, so ``import lossprune`` never needs them:

* :mod:`lossprune.integrations.hf` -- a Hugging Face ``transformers`` ``TrainerCallback``
  (needs ``pip install 'lossprune[transformers]'``).
"""

__all__: list[str] = []
