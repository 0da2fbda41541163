"""Mask R-CNN for Keras 3 on TensorFlow.

>>> from keras_maskrcnn import MaskRCNN
>>> model = MaskRCNN(num_classes=3)
"""
import os

# Unless the user chose otherwise, hide TensorFlow's C++ info and warning logs: grappler's cost
# model prints a long warning for every CropAndResize (our RoIAlign) it cannot cost.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_maskrcnn.model import MaskRCNN  # noqa: E402
# Register the custom objects of saved optimizers (LinearWarmup, FusedAdamW), so that models saved
# with their optimizer load; small modules, unlike the training loop (which needs pycocotools).
from keras_maskrcnn import optimizers as _optimizers  # noqa: F401,E402
from keras_maskrcnn import schedules as _schedules  # noqa: F401,E402

__version__ = "0.2.0"
__all__ = ["MaskRCNN", "__version__"]
