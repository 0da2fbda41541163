import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's stock (Eigen) CPU kernels for the tests, on every CPU: TensorFlow turns oneDNN on by
# default only on CPUs with AVX-512 VNNI/BF16 or AMX, and there its float32 convolutions are less
# exact. Measured on an AMD EPYC Zen 4 (AVX512_BF16), test_training_parity's backbone gradients
# against torchvision's float64 step: 2.5e-3 - 1.1e-2 relative with oneDNN, 1.0e-3 - 1.3e-3 with
# the stock kernels, torchvision's own float32 2e-4 - 3.5e-4. Set TF_ENABLE_ONEDNN_OPTS=1 to test
# oneDNN's kernels instead (the demo and benchmarks use them).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test taking minutes; run with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test; run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _keep_global_dtype_policy():
    """Each test starts and ends with the same Keras global dtype policy: code that sets it (the
    train command's plan, precision tests) must not change the precision of the tests after it,
    which on a CPU with native bfloat16 (where ``auto`` picks ``mixed_bfloat16``) would loosen
    every later numerical comparison."""
    import keras

    policy = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(policy)
