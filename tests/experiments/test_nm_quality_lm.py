"""The 2:4 table on the tiny language model, at a tiny size."""

import pytest

from lossprune.experiments.lm import LMConfig
from lossprune.experiments.nm_quality_lm import LMQualitySetup, _gap_closed, run_nm_quality_lm

pytest.importorskip("transformers")

TINY = LMQualitySetup(
    model=LMConfig(layers=1, width=16, heads=2, block_size=16),
    corpus_bytes=8_000,
    train_steps=5,
    finetune_steps=2,
    batch_size=8,
    score_sequences=8,
    cg_iters=2,
)


def test_gap_closed_is_the_share_of_the_magnitude_gap():
    rows = {
        "dense": {"loss": 1.0},
        "2:4 magnitude": {"loss": 3.0},
        "better": {"loss": 1.5},
        "worse": {"loss": 4.0},
    }
    closed = _gap_closed(rows, "loss")
    assert closed == {"dense": 1.0, "2:4 magnitude": 0.0, "better": 0.75, "worse": -0.5}


@pytest.mark.slow
def test_every_method_reaches_2_4_on_the_language_model():
    result = run_nm_quality_lm(TINY)
    rows = result["rows"]
    assert list(rows)[0] == "dense" and len(rows) == 7
    for name, row in rows.items():
        if name != "dense":
            assert row["sparsity"] == 0.5
        assert row["val_perplexity"] == pytest.approx(__import__("math").exp(row["val_loss"]))
    assert result["gap_closed_val"]["2:4 magnitude"] == pytest.approx(0.0)
