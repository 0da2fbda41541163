"""Synchronized batch norm: two replicas (MirroredStrategy over two logical CPU devices) that each
see half of a batch give what one device gives on the whole batch: outputs, input and parameter
gradients, moving statistics (on both replicas' copies), for plain and for masked (RoI-head)
batch norm, eagerly and in a ``tf.function``.

The two-replica run happens in a subprocess (logical devices must be configured before
TensorFlow initialises); this file is also that subprocess' script (``python
test_sync_batch_norm.py OUT``). The reference is the library's one-device path (TensorFlow's fused
batch norm, or the masked moments) on the concatenated batch, in the same process.

Measured (AMD EPYC, TensorFlow 2.21, the inputs below: channel means up to 6, standard deviations
0.5-3, float32), max |difference| to one device, the same eagerly and in a ``tf.function``:
outputs 7.2e-7 (of values up to 5.3), input gradients 4.8e-7 (of 3.0), gamma / beta gradients
1.3e-5 / 7.6e-6 (of 10 / 18; sums of up to 240 products), moving statistics 1.2e-7 (of 1.8). The
test allows 1e-5 of each quantity's largest magnitude (at least 1). Without synchronization the
outputs differ by 0.53 (plain) and 1.3 (masked): the negative control.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (4, 6, 5, 8)  # global batch of 4 (2 per replica), 6 x 5 positions, 8 channels
VALID = np.array([True, False, True, True])  # masked case: replica 0 has one valid row, replica 1 two
QUANTITIES = ("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance")


def _inputs():
    rng = np.random.default_rng(7)
    channel_means = rng.uniform(-6, 6, size=SHAPE[-1])
    channel_stds = rng.uniform(0.5, 3, size=SHAPE[-1])
    x = (rng.normal(size=SHAPE) * channel_stds + channel_means).astype("float32")
    upstream = rng.normal(size=SHAPE).astype("float32")  # the loss is sum(y * upstream)
    params = {
        "gamma": rng.uniform(0.5, 1.5, SHAPE[-1]), "beta": rng.normal(size=SHAPE[-1]),
        "moving_mean": rng.normal(size=SHAPE[-1]), "moving_variance": rng.uniform(0.5, 2, SHAPE[-1]),
    }
    return x, upstream, {k: v.astype("float32") for k, v in params.items()}


def _make_norm(params, synchronized):
    from keras_maskrcnn.layers.norm import make_norm

    norm = make_norm("batch_norm", "bn", synchronized=synchronized)
    norm.build((None,) + SHAPE[1:])
    for name, value in params.items():
        getattr(norm, name).assign(value)
    return norm


def _step(norm, x, upstream, valid):
    """Output, input gradient and gamma/beta gradients of ``sum(bn(x) * upstream)`` in training."""
    import tensorflow as tf

    from keras_maskrcnn.layers.norm import _batch_norm_training, _masked_batch_norm_training

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = _batch_norm_training(norm, x) if valid is None else _masked_batch_norm_training(norm, x, valid)
        loss = tf.reduce_sum(y * upstream)
    dx, dgamma, dbeta = tape.gradient(loss, [x, norm.gamma.value, norm.beta.value])
    return y, dx, dgamma, dbeta


def _one_device(masked):
    """The reference: one device, the whole batch."""
    import tensorflow as tf

    x, upstream, params = _inputs()
    norm = _make_norm(params, synchronized=False)
    y, dx, dgamma, dbeta = _step(norm, tf.constant(x), tf.constant(upstream), tf.constant(VALID) if masked else None)
    return dict(y=y.numpy(), dx=dx.numpy(), dgamma=dgamma.numpy(), dbeta=dbeta.numpy(),
                moving_mean=norm.moving_mean.numpy(), moving_variance=norm.moving_variance.numpy())


def _two_replicas(strategy, masked, synchronized, compiled):
    """Each of two replicas runs batch norm on its half; outputs and input gradients concatenated,
    parameter gradients summed (as the optimizer all-reduces them), moving statistics per replica."""
    import tensorflow as tf

    x, upstream, params = _inputs()
    with strategy.scope():
        norm = _make_norm(params, synchronized)
    halves = SHAPE[0] // 2

    def per_replica(context):
        rows = slice(context.replica_id_in_sync_group * halves, (context.replica_id_in_sync_group + 1) * halves)
        return tf.constant(x)[rows], tf.constant(upstream)[rows], tf.constant(VALID)[rows]

    def replica_step():
        context = tf.distribute.get_replica_context()
        x_r, up_r, valid_r = per_replica(context)
        return _step(norm, x_r, up_r, valid_r if masked else None)

    def run():
        return strategy.run(replica_step)

    y, dx, dgamma, dbeta = (strategy.experimental_local_results(t) for t in (tf.function(run) if compiled else run)())
    moving = {name: [v.numpy() for v in getattr(norm, name).value.values] for name in ("moving_mean", "moving_variance")}
    return dict(
        y=np.concatenate([t.numpy() for t in y]), dx=np.concatenate([t.numpy() for t in dx]),
        dgamma=sum(t.numpy() for t in dgamma), dbeta=sum(t.numpy() for t in dbeta),
        moving_mean=np.stack(moving["moving_mean"]), moving_variance=np.stack(moving["moving_variance"]),
    )


def _main(out):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    results = {}
    for masked in (False, True):
        results.update({f"reference_{masked}_{k}": v for k, v in _one_device(masked).items()})
        for compiled in (False, True):
            for synchronized in (True, False):
                run = _two_replicas(strategy, masked, synchronized, compiled)
                results.update({f"{masked}_{compiled}_{synchronized}_{k}": v for k, v in run.items()})
    np.savez(out, **results)


# ------------------------------------------------------------------------------------------
# Test side
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sync_bn") / "results.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE)] + env.get("PYTHONPATH", "").split(os.pathsep))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return dict(np.load(out))


def _difference(results, masked, compiled, synchronized, quantity):
    reference = results[f"reference_{masked}_{quantity}"]
    got = results[f"{masked}_{compiled}_{synchronized}_{quantity}"]
    return float(np.abs(got - reference).max()), float(np.abs(reference).max())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_two_synchronized_replicas_equal_one_device(results, masked, compiled):
    for quantity in QUANTITIES:
        difference, scale = _difference(results, masked, compiled, True, quantity)
        bound = 1e-5 * max(scale, 1.0)
        assert difference <= bound, f"{quantity}: max difference {difference:.3g} > {bound:.3g}"


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_without_synchronization_replicas_differ(results, masked):
    """Negative control: per-replica statistics are another function of the data."""
    difference, _ = _difference(results, masked, True, False, "y")
    assert difference > 1e-2


def test_synchronize_batch_norm_switches_every_batch_norm_of_a_model():
    import keras

    from keras_maskrcnn import MaskRCNN, presets
    from keras_maskrcnn.layers.norm import FrozenBatchNormalization, synchronize_batch_norm

    config = dict(presets.torchvision_maskrcnn_resnet50_fpn_v2_config(min_size=64, max_size=64), backbone="resnet18",
                  backbone_norm="batch_norm", trainable_backbone_layers=5)
    model = MaskRCNN(num_classes=2, **config)
    norms = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and not any(n.synchronized for n in norms)
    assert synchronize_batch_norm(model) == len(norms)
    assert all(n.synchronized for n in norms)
    assert not any(isinstance(l, FrozenBatchNormalization) for l in model._flatten_layers())
    assert synchronize_batch_norm(model, False) == len(norms) and not any(n.synchronized for n in norms)


if __name__ == "__main__":
    _main(sys.argv[1])
