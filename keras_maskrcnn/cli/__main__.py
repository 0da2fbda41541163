"""``python -m keras_maskrcnn.cli``: the ``keras-maskrcnn`` command."""
import sys

from keras_maskrcnn.cli import main

sys.exit(main())
