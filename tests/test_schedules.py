import copy
import pickle

import pytest

from lossprune import ExponentialSchedule, LinearSchedule, Schedule


@pytest.mark.parametrize("cls", [LinearSchedule, ExponentialSchedule])
@pytest.mark.parametrize("sparsity,stages", [(0.0, 1), (0.9, 1), (0.98847, 14), (0.956, 140)])
def test_last_stage_is_exact_and_sequence_is_monotone(cls, sparsity, stages):
    schedule = cls(sparsity, stages)
    targets = list(schedule)
    assert len(schedule) == stages == len(targets)
    assert targets[-1] == sparsity
    assert all(a <= b for a, b in zip(targets, targets[1:]))
    assert isinstance(schedule, Schedule)


def test_linear_formula():
    s = LinearSchedule(0.9, 9)
    for stage in range(1, 10):
        assert s.sparsity(stage) == pytest.approx(0.9 * stage / 9, abs=1e-15)


def test_exponential_formula_removes_same_fraction_of_what_is_left():
    p, stages = 0.956, 14
    s = ExponentialSchedule(p, stages)
    for stage in range(1, stages + 1):
        assert s.sparsity(stage) == pytest.approx(1 - (1 - p) ** (stage / stages), abs=1e-15)
    kept = [1.0] + [1 - t for t in s]
    ratios = [b / a for a, b in zip(kept, kept[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)


def test_linear_steps_are_equal_and_exponential_steps_shrink():
    lin, exp = LinearSchedule(0.9, 10), ExponentialSchedule(0.9, 10)
    lin_steps = [b - a for a, b in zip([0.0, *lin], lin)]
    exp_steps = [b - a for a, b in zip([0.0, *exp], exp)]
    assert max(lin_steps) == pytest.approx(min(lin_steps))
    assert all(a > b for a, b in zip(exp_steps, exp_steps[1:]))


@pytest.mark.parametrize("cls", [LinearSchedule, ExponentialSchedule])
def test_validation(cls):
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            cls(bad, 3)
    with pytest.raises(TypeError, match="sparsity"):
        cls("0.5", 3)
    with pytest.raises(TypeError, match="sparsity"):
        cls(True, 3)
    with pytest.raises(ValueError, match="stages"):
        cls(0.5, 0)
    with pytest.raises(TypeError, match="stages"):
        cls(0.5, 2.0)
    s = cls(0.5, 3)
    with pytest.raises(ValueError, match="stage"):
        s.sparsity(0)
    with pytest.raises(ValueError, match="stage"):
        s.sparsity(4)


@pytest.mark.parametrize("cls", [LinearSchedule, ExponentialSchedule])
def test_pickle_deepcopy_equality(cls):
    s = cls(0.8, 5)
    for clone in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert clone == s and list(clone) == list(s) and hash(clone) == hash(s)
    assert s != LinearSchedule(0.8, 4)
    assert repr(s) == f"{cls.__name__}(sparsity=0.8, stages=5)"
