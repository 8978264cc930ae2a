"""Wanda as its authors define it: counted tokens only, every user of a tied weight, means,
per-row comparison; each against a direct implementation of the paper's formula."""

import pytest
import torch
from torch import nn

from lossprune import LinearModel, LinearSchedule, ModelLoss, PerRow, Pruner, Wanda, scores
from lossprune.curvature import Statistic, compute_statistics
from lossprune.selection import prunable_parameters
from tests.hf_models import VOCAB, tiny_llama

transformers = pytest.importorskip("transformers")
INPUTS = Statistic("input_sq_norms")
CE = nn.CrossEntropyLoss()


def padded_batch(lengths, seq=12, seed=0, ignore_first=0):
    """Right-padded token sequences: attention_mask 0 and labels -100 on padding.

    ``ignore_first``: that many leading labels of every sequence are -100 too (a masked prompt).
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), seq), generator=generator)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for n, length in enumerate(lengths):
        mask[n, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :ignore_first] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_token_loop(model, names, batches):
    """Σ x_j² / n over positions whose label is not -100, one UNPADDED sequence at a time.

    Forward hooks written here, the model called on each sequence cut to its length: no
    attention mask, no padding, nothing of lossprune.
    """
    modules = {name: model.get_submodule(name.rpartition(".")[0]) for name in names}
    sums = {name: 0.0 for name in names}
    rows = {name: 0 for name in names}
    current = {}

    def hook(name):
        def record(module, args):
            current[name] = args[0].detach()[0]  # (T, in)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for batch in batches:
            for n in range(len(batch["input_ids"])):
                length = int(batch["attention_mask"][n].sum())
                with torch.no_grad():
                    model(input_ids=batch["input_ids"][n : n + 1, :length])
                for t in range(length):
                    if int(batch["labels"][n, t]) == -100:
                        continue
                    for name in names:
                        sums[name] = sums[name] + current[name][t] ** 2
                        rows[name] += 1
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / rows[name]).unsqueeze(0) for name in names}


def llama():
    torch.manual_seed(0)
    return tiny_llama().double()


def test_padding_and_ignored_labels_are_left_out_exactly():
    model = llama()
    names = list(prunable_parameters(model))
    batches = [padded_batch([12, 7, 3], seed=1, ignore_first=2), padded_batch([5, 12], seed=2)]
    statistics = compute_statistics(model, prunable_parameters(model), batches, None, [INPUTS])
    expected = per_token_loop(model, names, batches)
    for name in names:
        torch.testing.assert_close(statistics[INPUTS][name], expected[name], rtol=1e-10, atol=0)


def test_batches_whose_labels_are_all_ignored_count_the_same_at_every_batch_size():
    """A sequence whose only labelled token is its first has no loss unit after the causal
    shift; its first position still counts, whether it is scored alone or with others."""
    model = llama()
    rows = padded_batch([12, 9, 12, 6, 12, 12], seed=3)
    rows["labels"][1, 1:] = -100  # only position 0 labelled: no next-token target
    rows["labels"][3] = -100  # nothing labelled at all
    singles = [{k: v[n : n + 1] for k, v in rows.items()} for n in range(6)]
    pairs = [{k: v[n : n + 2] for k, v in rows.items()} for n in (0, 2, 4)]
    whole = scores(model, Wanda(), [rows])
    for batches in (singles, pairs):
        got = scores(model, Wanda(), batches)
        for name, score in whole.items():
            torch.testing.assert_close(got[name], score, rtol=1e-12, atol=0)


def test_a_tied_weight_accumulates_the_inputs_of_every_module_that_uses_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model = model.double()
    model[2].weight = model[0].weight  # two modules, one matrix
    x = torch.randn(10, 4, dtype=torch.float64)
    with torch.no_grad():
        second = torch.tanh(model[0](x))
    expected = (x.square().sum(0) + second.square().sum(0)) / 20
    statistics = compute_statistics(
        model, {"0.weight": model[0].weight.detach()}, (x, torch.randint(0, 3, (10,))), CE, [INPUTS]
    )
    torch.testing.assert_close(statistics[INPUTS]["0.weight"][0], expected, rtol=1e-12, atol=0)


def test_duplicated_data_changes_no_composite_score():
    """A mean, like the loss model's statistics: Wanda() + c * QM is the same on twice the data."""
    model = llama()
    batch = padded_batch([12, 8, 10, 12], seed=4)
    twice = {k: torch.cat([v, v]) for k, v in batch.items()}
    criterion = Wanda() + 1e3 * LinearModel()
    once, doubled = scores(model, criterion, [batch]), scores(model, criterion, [twice])
    for name, score in once.items():
        torch.testing.assert_close(doubled[name], score, rtol=1e-9, atol=0)


def wanda_by_the_paper(model, batches, sparsity):
    """Sun et al. (2024), Eq. 1 and Sec. 3, written out: S_ij = |W_ij| · ||X_j||_2 over every
    token of the calibration data, sorted within each output row, the lowest removed."""
    names = list(prunable_parameters(model))
    means = per_token_loop(model, names, batches)  # every position labelled: all tokens
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    masks = {}
    for name in names:
        weight = model.get_parameter(name).detach()
        norms = (means[name] * tokens).sqrt()  # ||X_j||_2
        metric = weight.abs() * norms
        pruned = round(weight.shape[1] * sparsity)
        order = torch.sort(metric, dim=-1, stable=True).indices[:, :pruned]
        masks[name] = torch.ones_like(weight, dtype=torch.bool).scatter_(1, order, False)
    return masks


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_wanda_compares_within_each_output_row_by_default(sparsity):
    model = llama()
    batches = [padded_batch([12, 12, 12], seed=5), padded_batch([12, 12], seed=6)]
    expected = wanda_by_the_paper(model, batches, sparsity)
    pruner = Pruner(model, Wanda(), LinearSchedule(sparsity, 1), data=batches)
    assert pruner.selection == PerRow()
    pruner.step()
    for name, mask in expected.items():
        assert torch.equal(pruner.masks[name], mask), name


def test_a_four_dimensional_attention_mask_is_refused():
    model = llama()
    batch = padded_batch([12, 12], seed=7)
    batch["attention_mask"] = torch.ones(2, 1, 12, 12)
    with pytest.raises(ValueError, match="2-d"):
        scores(model, Wanda(), [batch])


def test_rows_that_are_not_positions_are_refused_when_some_position_does_not_count():
    class Routed(nn.Module):
        """Sends only the even positions through a Linear: its rows are not the positions."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 4)
            self.expert = nn.Linear(4, 4)
            self.head = nn.Linear(4, VOCAB)

        def forward(self, input_ids, attention_mask=None):
            hidden = self.embed(input_ids)
            routed = self.expert(hidden[:, ::2].reshape(-1, 4))
            hidden = hidden.clone()
            hidden[:, ::2] = routed.reshape(hidden[:, ::2].shape)
            return self.head(hidden)

    model = Routed().double()
    options = {"loss_fn": ModelLoss("causal_lm"), "include": r"expert\.weight"}
    scores(model, Wanda(), [padded_batch([12, 12], seed=8)], **options)  # every position counts
    with pytest.raises(TypeError, match="does not say which rows"):
        scores(model, Wanda(), [padded_batch([12, 5], seed=8)], **options)
