"""What every layer shares: the bottom package (layer 0 of docs/architecture.md), private.

- :mod:`~lossprune._common.batches` — what one batch of scoring data is, whatever form the user's
  data takes (``(inputs, targets)``, nested tuples, mappings with ``labels``);
- :mod:`~lossprune._common.model_loss` — a Hugging Face model's own loss
  (:class:`~lossprune.ModelLoss`), family by family;
- :mod:`~lossprune._common.probe` — the first batch's forward passes: no random draw, and the
  model's own loss equal to ``model(**batch).loss``;
- :mod:`~lossprune._common.models` — the network behind DDP and ``torch.compile`` wrappers;
  meta-device and quantized weights refused;
- :mod:`~lossprune._common.data` — scoring data: one batch or any re-iterable of batches, random
  subsets;
- :mod:`~lossprune._common.functional` — calling a module as a pure function of a subset of its
  parameters, and the checks that its forward pass is deterministic;
- :mod:`~lossprune._common.linear_maps` — the table of linear maps (which modules are, along which
  axes their inputs run, and which axis indexes the experts of a fused mixture-of-experts
  parameter);
- :mod:`~lossprune._common.checks` — argument checks with precise ``TypeError``/``ValueError``;
- :mod:`~lossprune._common.distributed` — all-reduce of accumulators under
  :mod:`torch.distributed`.

It imports nothing else of lossprune: every other package may import it.
"""
