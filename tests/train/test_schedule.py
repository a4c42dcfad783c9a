import pytest

from aviary.train.schedule import linear_warmup_decay


def test_endpoints_and_peak():
    total, warm, peak = 100, 7, 2e-4
    lrs = [linear_warmup_decay(s, total, peak, warm) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(peak / warm)          # first update already moves
    assert lrs[warm - 1] == pytest.approx(peak)           # end of warmup reaches the peak
    assert max(lrs) == pytest.approx(peak)
    assert lrs[warm] == pytest.approx(peak)               # decay starts at the peak
    assert lrs[total - 1] == pytest.approx(peak / (total - warm))  # last update: one decay step left
    assert lrs[total] == 0.0 and lrs[-1] == 0.0           # reaches 0 one past the end, stays there
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))      # increasing in warmup
    assert all(a > b for a, b in zip(lrs[warm:total], lrs[warm + 1:total + 1]))  # decreasing after


def test_no_warmup_and_min_lr():
    assert linear_warmup_decay(0, 10, 1.0, 0) == 1.0
    assert linear_warmup_decay(10, 10, 1.0, 0, min_lr=0.1) == pytest.approx(0.1)
    assert linear_warmup_decay(5, 10, 1.0, 0, min_lr=0.1) == pytest.approx(0.55)


def test_pure_function_of_step():
    a = [linear_warmup_decay(s, 50, 1e-3, 4) for s in range(50)]
    b = [linear_warmup_decay(s, 50, 1e-3, 4) for s in reversed(range(50))][::-1]
    assert a == b


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="step"):
        linear_warmup_decay(-1, 10, 1.0, 1)
