"""FusedAdamW against AdamW written in numpy from its definition, and its fallbacks."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_maskrcnn.optimizers import FusedAdamW


def _numpy_adamw(weights, gradients, lr, beta_1, beta_2, epsilon, weight_decay):
    """Keras' AdamW: decoupled decay ``w -= lr * wd * w``, then Adam with bias-corrected step size."""
    w = [x.astype(np.float64) for x in weights]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, grads in enumerate(gradients, start=1):
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for i, g in enumerate(grads):
            w[i] -= lr * weight_decay * w[i]
            m[i] += (g - m[i]) * (1 - beta_1)
            v[i] += (g * g - v[i]) * (1 - beta_2)
            w[i] -= alpha * m[i] / (np.sqrt(v[i]) + epsilon)
    return w


def _run(optimizer, weights, gradients, compiled=True):
    variables = [keras.Variable(x) for x in weights]
    optimizer.build(variables)

    def step(grads):
        optimizer.apply(grads, variables)

    step = tf.function(step) if compiled else step
    for grads in gradients:
        step([tf.constant(g) for g in grads])
    return [v.numpy() for v in variables], step


@pytest.mark.parametrize("compiled", [True, False])
def test_matches_numpy_adamw(compiled):
    rng = np.random.default_rng()
    shapes = [(3, 3, 4, 5), (7,), (6, 2)]
    weights = [rng.normal(size=s).astype("float32") for s in shapes]
    gradients = [[rng.normal(scale=rng.uniform(0.01, 10), size=s).astype("float32") for s in shapes] for _ in range(5)]
    hyper = dict(learning_rate=3e-3, beta_1=0.85, beta_2=0.99, epsilon=1e-6, weight_decay=0.05)
    got, _ = _run(FusedAdamW(**hyper), weights, gradients, compiled)
    want = _numpy_adamw(weights, gradients, 3e-3, 0.85, 0.99, 1e-6, 0.05)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_uses_the_fused_kernel_and_equals_keras_adamw():
    rng = np.random.default_rng()
    weights = [rng.normal(size=(16, 8)).astype("float32"), np.zeros((8,), "float32")]
    gradients = [[rng.normal(size=w.shape).astype("float32") for w in weights] for _ in range(3)]
    got, step = _run(FusedAdamW(1e-2, weight_decay=1e-3, clipnorm=1.0), weights, gradients)
    want, _ = _run(keras.optimizers.AdamW(1e-2, weight_decay=1e-3, clipnorm=1.0), weights, gradients)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    graph_ops = {op.type for op in step.get_concrete_function([tf.constant(g) for g in gradients[0]]).graph.get_operations()}
    assert "ResourceApplyAdam" in graph_ops


def test_amsgrad_falls_back_to_keras_update():
    rng = np.random.default_rng()
    weights = [rng.normal(size=(5, 3)).astype("float32")]
    gradients = [[rng.normal(size=(5, 3)).astype("float32")] for _ in range(3)]
    got, step = _run(FusedAdamW(1e-2, amsgrad=True), weights, gradients)
    want, _ = _run(keras.optimizers.AdamW(1e-2, amsgrad=True), weights, gradients)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
    graph_ops = {op.type for op in step.get_concrete_function([tf.constant(gradients[0][0])]).graph.get_operations()}
    assert "ResourceApplyAdam" not in graph_ops


def test_serialization_round_trip():
    optimizer = FusedAdamW(learning_rate=2e-3, weight_decay=1e-4, clipnorm=10.0, use_ema=True, ema_momentum=0.98)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is FusedAdamW
    assert restored.get_config() == optimizer.get_config()


def test_fit_under_a_distribution_strategy_matches_keras_adamw():
    rng = np.random.default_rng()
    x = rng.normal(size=(8, 5)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    kernel = rng.normal(size=(5, 3)).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    results = []
    for cls in (FusedAdamW, keras.optimizers.AdamW):
        with strategy.scope():
            model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
            model.layers[0].kernel.assign(kernel)
            model.compile(optimizer=cls(1e-2, weight_decay=1e-3), loss="mse")
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        results.append(model.layers[0].kernel.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_saved_model_file_restores_the_optimizer(tmp_path):
    rng = np.random.default_rng()
    x = rng.normal(size=(4, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=FusedAdamW(1e-3, weight_decay=1e-4), loss="mse")
    model.fit(x, x[:, :2], epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.optimizer) is FusedAdamW
    assert int(restored.optimizer.iterations.numpy()) == 1
    for a, b in zip(restored.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
