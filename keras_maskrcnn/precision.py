"""Run a model's weights in another precision (``float32``, ``mixed_bfloat16``, ``mixed_float16``).

Weights are always stored in float32; the dtype policy only sets the compute dtype. So a model
trained in ``mixed_bfloat16`` (fast on CPUs with AMX) can be served in float32 and the other way
round, and a ``mixed_float16`` copy runs on a GPU, with exactly the same weights.
"""
from __future__ import annotations

import keras

from keras_maskrcnn.model import MaskRCNN


def with_dtype_policy(model: MaskRCNN, policy: str) -> MaskRCNN:
    """A new :class:`MaskRCNN` with ``model``'s configuration and weights, computing in ``policy``.

    Args:
        model: a built ``MaskRCNN`` (any policy).
        policy: a Keras dtype policy name: ``"float32"``, ``"mixed_bfloat16"`` or ``"mixed_float16"``.

    Example:

    ```python
    fast = with_dtype_policy(model, "mixed_bfloat16")
    outputs = fast(images)  # same weights, bfloat16 convolutions
    ```
    """
    if not model.built:
        model.build()
    config = model.get_config()
    config["dtype"] = keras.DTypePolicy(policy)
    clone = MaskRCNN.from_config(config)
    clone.build()
    clone.set_weights(model.get_weights())
    return clone
