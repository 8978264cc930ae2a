"""Integrations of lossprune with training frameworks (the top layer of docs/architecture.md).

Each integration lives in its own module and imports its framework only when that module is
imported, so ``import lossprune`` never needs them:

* :mod:`lossprune.integrations.hf` -- a Hugging Face ``transformers`` ``TrainerCallback``
  (needs ``pip install 'lossprune[transformers]'``).

They use the library's public API as any user would; nothing in the library imports them.
"""

__all__: list[str] = []
