"""The frame-spread collapse check."""
import numpy as np
import pytest

from aviary.analysis.spread import collapsed_layers, frame_spread


def test_spread_of_varied_and_collapsed_features():
    rng = np.random.default_rng(0)
    varied = rng.standard_normal((500, 16))
    assert frame_spread(varied) == pytest.approx(1.0, abs=0.05)
    const = np.tile(rng.standard_normal(16), (500, 1)) + 1e-4 * rng.standard_normal((500, 16))
    assert frame_spread(const) < 1e-3
    assert collapsed_layers([frame_spread(varied), frame_spread(const)]) == [1]
    assert frame_spread(np.zeros((3, 4))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        frame_spread(np.zeros(4))
