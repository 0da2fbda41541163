"""Time-budget callbacks."""
import math

import keras
import numpy as np

from keras_maskrcnn.callbacks import CosineDecayOverTime, TimeLimit


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_cosine_over_time_formula():
    schedule = CosineDecayOverTime(1.0, 100.0, warmup_steps=10, final_fraction=0.1)
    assert math.isclose(schedule.rate(0, 0.0), 0.1)  # first warmup step
    assert math.isclose(schedule.rate(9, 0.0), 1.0)
    assert math.isclose(schedule.rate(50, 50.0), 0.1 + 0.9 * 0.5)
    assert math.isclose(schedule.rate(500, 100.0), 0.1) and math.isclose(schedule.rate(500, 1e6), 0.1)


def test_cosine_over_time_sets_the_optimizer_rate_during_fit():
    clock = FakeClock()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            clock.now += 10.0  # each batch "takes" 10 s of a 40 s budget

    x, y = np.zeros((8, 3), "float32"), np.zeros((8, 1), "float32")
    history = model.fit(x, y, batch_size=2, epochs=2, verbose=0,
                        callbacks=[CosineDecayOverTime(0.5, 40.0, warmup_steps=0, final_fraction=0.0, clock=clock), Record()])
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * min(t / 40.0, 1.0))) for t in range(0, 80, 10)]
    np.testing.assert_allclose(seen, expected, atol=1e-6)
    assert history.history["learning_rate"][-1] == seen[-1]


def test_time_limit_stops_training():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    limit = TimeLimit(0.0)
    history = model.fit(np.zeros((8, 3)), np.zeros((8, 1)), batch_size=2, epochs=5, verbose=0, callbacks=[limit])
    assert len(history.history["loss"]) == 1
