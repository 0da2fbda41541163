"""CoupledL2SGD against ``torch.optim.SGD``: a numpy version of PyTorch's documented algorithm, and
(in the torchvision reference environment) torch itself on the same weights and gradients."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import tvref
from keras_maskrcnn.optimizers import CoupledL2SGD, build_optimizer
from keras_maskrcnn.schedules import learning_rate_schedule

SHAPES = [(3, 3, 4, 5), (7,), (6, 2)]
STEPS = 6


def _numpy_torch_sgd(weights, gradients, rates, momentum, decays, nesterov=False):
    """``torch.optim.SGD.step`` as PyTorch documents it (dampening 0, maximize False), float64:
    ``g += wd * w``; ``b = g`` at the first step, then ``b = momentum * b + g``; ``g = g + momentum * b``
    (nesterov) or ``g = b``; ``w -= lr * g``."""
    w = [x.astype(np.float64) for x in weights]
    b = [None] * len(w)
    for lr, grads in zip(rates, gradients):
        for i, g in enumerate(grads):
            g = g + decays[i] * w[i]
            if momentum:
                b[i] = g.copy() if b[i] is None else momentum * b[i] + g
                g = g + momentum * b[i] if nesterov else b[i]
            w[i] = w[i] - lr * g
    return w


def _problem(seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=s).astype(dtype) for s in SHAPES]
    gradients = [[rng.normal(scale=rng.uniform(0.1, 3), size=s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return weights, gradients


def _rates(schedule):
    """The learning rate of each step: Keras evaluates the schedule at the step count before the step."""
    if callable(schedule):
        return [float(schedule(step)) for step in range(STEPS)]
    return [float(schedule)] * STEPS


def _run(optimizer, weights, gradients, compiled=True, names=None):
    variables = [keras.Variable(x, name=(names[i] if names else None)) for i, x in enumerate(weights)]
    optimizer.build(variables)

    def step(grads):
        optimizer.apply(grads, variables)

    step = tf.function(step) if compiled else step
    for grads in gradients:
        step([tf.constant(g) for g in grads])
    return [v.numpy() for v in variables], step


# A warmup then a step decay: the learning rate changes at every warmup step and at the decay,
# where Keras' SGD (lr inside the velocity) and PyTorch's (lr times the buffer) part ways.
SCHEDULE = learning_rate_schedule(0.05, "step", decay_steps=[4], warmup_steps=3, warmup_factor=0.1)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_numpy_torch_sgd(compiled, nesterov):
    weights, gradients = _problem()
    optimizer = CoupledL2SGD(SCHEDULE, momentum=0.9, weight_decay=0.03, nesterov=nesterov)
    got, _ = _run(optimizer, weights, gradients, compiled)
    want = _numpy_torch_sgd(weights, gradients, _rates(SCHEDULE), 0.9, [0.03] * 3, nesterov)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_uses_the_fused_kernel_and_its_fallback_agrees():
    weights, gradients = _problem(1)
    got, step = _run(CoupledL2SGD(SCHEDULE, momentum=0.9, weight_decay=0.02), weights, gradients)
    graph_ops = {op.type for op in step.get_concrete_function([tf.constant(g) for g in gradients[0]]).graph.get_operations()}
    assert "ResourceApplyMomentum" in graph_ops
    # float64 variables take the plain-ops update (the path distributed variables take).
    weights64, gradients64 = [w.astype("float64") for w in weights], [[g.astype("float64") for g in s] for s in gradients]
    fallback, step64 = _run(CoupledL2SGD(SCHEDULE, momentum=0.9, weight_decay=0.02), weights64, gradients64)
    graph_ops = {op.type for op in step64.get_concrete_function([tf.constant(g) for g in gradients64[0]]).graph.get_operations()}
    assert "ResourceApplyMomentum" not in graph_ops
    want = _numpy_torch_sgd(weights, gradients, _rates(SCHEDULE), 0.9, [0.02] * 3)
    for g, f, w in zip(got, fallback, want):
        np.testing.assert_allclose(f, w, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_no_momentum_and_no_decay():
    weights, gradients = _problem(2)
    got, _ = _run(CoupledL2SGD(0.1, momentum=0.0), weights, gradients)
    want = _numpy_torch_sgd(weights, gradients, [0.1] * STEPS, 0.0, [0.0] * 3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_norm_weight_decay_and_exclusions():
    """``gamma`` / ``beta`` get ``norm_weight_decay``; variables excluded with Keras'
    ``exclude_from_weight_decay`` get none; the rest ``weight_decay``."""
    weights, gradients = _problem(3)
    names = ["kernel", "gamma", "bias"]
    optimizer = CoupledL2SGD(0.05, momentum=0.9, weight_decay=0.04, norm_weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    got, _ = _run(optimizer, weights, gradients, names=names)
    want = _numpy_torch_sgd(weights, gradients, [0.05] * STEPS, 0.9, [0.04, 0.01, 0.0])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_norm_variables_of_a_model_are_its_normalisation_layers():
    """The name rule picks exactly the trainable variables of the normalisation layers."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dense(5)(keras.layers.LayerNormalization()(keras.layers.Flatten()(x)))
    model = keras.Model(inputs, x)
    optimizer = CoupledL2SGD(0.01, weight_decay=1e-4, norm_weight_decay=0.0)
    optimizer.build(model.trainable_variables)
    norm_layers = [l for l in model.layers if isinstance(l, (keras.layers.BatchNormalization, keras.layers.LayerNormalization))]
    norm_ids = {id(v) for layer in norm_layers for v in layer.trainable_variables}
    for variable, decay in zip(model.trainable_variables, optimizer._decays):
        assert decay == (0.0 if id(variable) in norm_ids else 1e-4), variable.path


def test_keras_sgd_decay_is_not_this():
    """Keras' decoupled SGD with the same numbers ends elsewhere (why this class exists)."""
    weights, gradients = _problem(4)
    ours, _ = _run(CoupledL2SGD(0.05, momentum=0.9, weight_decay=0.05), weights, gradients)
    keras_sgd, _ = _run(keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.05), weights, gradients)
    assert max(np.abs(a - b).max() for a, b in zip(ours, keras_sgd)) > 1e-3


def test_serialization_round_trip_and_builder():
    optimizer = CoupledL2SGD(SCHEDULE, momentum=0.8, weight_decay=1e-4, norm_weight_decay=0.0, nesterov=True,
                             global_clipnorm=5.0)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is CoupledL2SGD
    assert restored.get_config() == optimizer.get_config()
    built = build_optimizer(0.02, optimizer="sgd_l2", weight_decay=1e-4, norm_weight_decay=0.0, total_steps=100)
    assert isinstance(built, CoupledL2SGD) and built.weight_decay == 1e-4 and built.norm_weight_decay == 0.0
    with pytest.raises(ValueError, match="norm_weight_decay"):
        build_optimizer(0.02, optimizer="sgd", norm_weight_decay=0.0, total_steps=100)


@tvref.requires_torchvision
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_torch_optim_sgd(nesterov):
    """torch.optim.SGD itself, fed the same weights, gradients and per-step learning rates, with
    a clipped global norm (clipping precedes the decay in both) and a second parameter group.
    Measured: max difference 1.2e-7 after six steps (float32 rounding; weights of order 1)."""
    weights, gradients = _problem(5)
    rates = _rates(SCHEDULE)
    names = ["kernel", "gamma", "bias"]
    optimizer = CoupledL2SGD(SCHEDULE, momentum=0.9, weight_decay=0.03, norm_weight_decay=0.005,
                             nesterov=nesterov, global_clipnorm=4.0)
    got, _ = _run(optimizer, weights, gradients, names=names)
    inputs = {f"w{i}": w for i, w in enumerate(weights)}
    inputs.update({f"g{t}_{i}": g for t, grads in enumerate(gradients) for i, g in enumerate(grads)})
    outputs = tvref.run(
        f"""
        ws = [torch.nn.Parameter(torch.from_numpy(inputs[f"w{{i}}"])) for i in range({len(weights)})]
        opt = torch.optim.SGD([{{"params": [ws[0], ws[2]]}}, {{"params": [ws[1]], "weight_decay": 0.005}}],
                              lr=0.0, momentum=0.9, weight_decay=0.03, nesterov={nesterov})
        for t, lr in enumerate({rates!r}):
            for i, w in enumerate(ws):
                w.grad = torch.from_numpy(inputs[f"g{{t}}_{{i}}"]).clone()
            torch.nn.utils.clip_grad_norm_(ws, 4.0)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        for i, w in enumerate(ws):
            outputs[f"w{{i}}"] = w
        """,
        **inputs,
    )
    for i, g in enumerate(got):
        np.testing.assert_allclose(g, outputs[f"w{i}"], rtol=1e-5, atol=1e-6)
