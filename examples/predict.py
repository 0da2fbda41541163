"""Detect objects with a saved model and write the images with the detections drawn.

    python examples/predict.py --model runs/train_coco/model.keras photo1.jpg photo2.jpg
"""
import argparse
import os

import keras

import keras_maskrcnn  # noqa: F401  (registers the model's classes for load_model)
from keras_maskrcnn.data import load_image
from keras_maskrcnn.label_maps import load_label_map
from keras_maskrcnn.visualize import draw_detections, save_png

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="saved model (.keras)")
parser.add_argument("--output", default="predictions", help="output folder")
parser.add_argument("--score-threshold", type=float, default=0.5)
parser.add_argument("--classes", help="label map (default: classes.json next to the model)")
parser.add_argument("images", nargs="+")
args = parser.parse_args()

model = keras.models.load_model(args.model, compile=False)
classes = args.classes or os.path.join(os.path.dirname(os.path.abspath(args.model)), "classes.json")
class_names = load_label_map(classes)[1] if os.path.isfile(classes) else None

for path in args.images:
    image = load_image(path)
    prediction = model.predict_images([image])[0]
    drawn = draw_detections(image, **prediction, class_names=class_names, score_threshold=args.score_threshold)
    out = save_png(drawn, os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png"))
    print(f"{path}: {int((prediction['scores'] >= args.score_threshold).sum())} detections -> {out}")
