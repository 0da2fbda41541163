"""Export a Mask R-CNN as a TF Serving SavedModel and show how to serve and query it.

    # a trained model
    python examples/export_serving.py --model runs/train_coco/model.keras --output exported/maskrcnn
    # a fresh tiny model (untrained; to try the serving setup)
    python examples/export_serving.py --output /tmp/maskrcnn_export --image photo.jpg

Writes ``<output>/<version>/`` (TF Serving's versioned layout), checks the export by loading it
with plain ``tf.saved_model.load`` and running both signatures, writes the REST request bodies
``request_bytes.json`` and ``request_images.json`` next to it, and prints the ``docker run``
command for ``tensorflow/serving`` and the ``curl`` requests.
"""
import argparse
import base64
import json
import os

import numpy as np
import tensorflow as tf

from keras_maskrcnn.export import export_saved_model


def load_or_build(path, image_size):
    import keras

    import keras_maskrcnn  # noqa: F401  (registers the model's classes and the learning-rate schedule for load_model)
    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.presets import small_model_config

    if path:
        return keras.models.load_model(path, compile=False)
    model = MaskRCNN(num_classes=3, **small_model_config(image_size=image_size))
    model.build()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="saved model (.keras); default: a fresh tiny model")
    parser.add_argument("--output", default="exported/maskrcnn", help="model base folder (versions go inside)")
    parser.add_argument("--version", type=int, default=None, help="version subfolder (default: next free)")
    parser.add_argument("--full-masks", action="store_true", help="also return masks pasted at the image size")
    parser.add_argument("--image", help="JPEG/PNG for the example requests (default: a random 96 x 128 PNG)")
    parser.add_argument("--image-size", type=int, default=256, help="tiny model's image size (no --model)")
    parser.add_argument("--name", default="maskrcnn", help="TF Serving model name")
    args = parser.parse_args()

    model = load_or_build(args.model, args.image_size)
    export_dir = export_saved_model(model, args.output, version=args.version, full_masks=args.full_masks)
    print(f"SavedModel written to {export_dir}")

    if args.image:
        with open(args.image, "rb") as f:
            encoded = f.read()
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3)).astype(np.uint8)
        encoded = tf.io.encode_png(pixels).numpy()
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()

    # Check: what TF Serving will run, loaded without keras_maskrcnn.
    loaded = tf.saved_model.load(export_dir)
    by_bytes = loaded.signatures["serving_bytes"](image_bytes=tf.constant([encoded]))
    by_tensor = loaded.signatures["serving_default"](images=tf.constant(image[None]))
    print(
        f"check: serving_bytes {int(by_bytes['num_detections'][0])} detections, "
        f"serving_default {int(by_tensor['num_detections'][0])} detections; "
        f"outputs {sorted(by_bytes)}"
    )

    base = os.path.abspath(args.output)
    bytes_body = {"signature_name": "serving_bytes", "instances": [{"image_bytes": {"b64": base64.b64encode(encoded).decode("ascii")}}]}
    images_body = {"signature_name": "serving_default", "instances": [{"images": image.tolist()}]}
    bytes_path = os.path.join(base, "request_bytes.json")
    images_path = os.path.join(base, "request_images.json")
    with open(bytes_path, "w") as f:
        json.dump(bytes_body, f)
    with open(images_path, "w") as f:
        json.dump(images_body, f)

    url = f"http://localhost:8501/v1/models/{args.name}:predict"
    short_b64 = bytes_body["instances"][0]["image_bytes"]["b64"][:24] + "..."
    print(
        f"""
Serve it (TF Serving serves the highest version folder under the mounted base folder):

  docker run --rm -p 8501:8501 \\
    --mount type=bind,source={base},target=/models/{args.name} \\
    -e MODEL_NAME={args.name} -t tensorflow/serving

Query it with encoded image bytes (JPEG or PNG, base64; images of one request may differ in size):

  curl -s -d @{bytes_path} {url}
  body: {{"signature_name": "serving_bytes", "instances": [{{"image_bytes": {{"b64": "{short_b64}"}}}}]}}

or with a uint8 pixel tensor (all images of one request of one size):

  curl -s -d @{images_path} {url}
  body: {{"signature_name": "serving_default", "instances": [{{"images": [[[r, g, b], ...], ...]}}]}}

The reply has one prediction per instance: boxes (x1, y1, x2, y2 in the image's pixels), scores,
classes, num_detections and masks (28 x 28 box-relative probabilities){" and full_masks" if args.full_masks else ""}."""
    )


if __name__ == "__main__":
    main()
