"""keras_maskrcnn.schedules: step decays, warmup."""
import pytest

from keras_maskrcnn.schedules import learning_rate_schedule


def test_step_decays_on_the_same_step_multiply():
    """A short run of a recipe can put two decays on one step: both apply there."""
    rate = learning_rate_schedule(1.0, "step", decay_steps=[4, 4, 6], decay_factor=0.1)
    assert [float(rate(s)) for s in (0, 3, 4, 5, 6, 100)] == pytest.approx([1.0, 1.0, 0.01, 0.01, 0.001, 0.001])
    rate = learning_rate_schedule(1.0, "step", decay_steps=[6, 2], decay_factor=0.5)
    assert [float(rate(s)) for s in (1, 2, 5, 6)] == pytest.approx([1.0, 0.5, 0.5, 0.25])
