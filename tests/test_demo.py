"""examples/demo.py, the README's main job, end to end in a few seconds of training: it trains,
evaluates and writes its model, metrics and pictures (how well it learns in its full 5.3 minutes
is measured in BENCHMARKS.md, not here)."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_trains_evaluates_and_writes_pictures(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--output", str(out), "--minutes", "0.1",
               "--eval-images", "2", "--pictures", "2", "--image-size", "96", "--warmup-steps", "2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "precision auto ->" in run.stdout + run.stderr  # the choice is logged
    steps = int(run.stdout.split("Trained ")[1].split(" steps")[0])
    assert steps >= 1
    metrics = json.loads((out / "metrics.json").read_text())
    for iou_type in ("bbox", "segm"):
        assert -1.0 <= metrics[iou_type]["AP50"] <= 1.0  # pycocotools' -1: no detections to score
    assert (out / "model.keras").stat().st_size > 0
    for i in range(2):
        picture = np.asarray(Image.open(out / f"detections_{i}.png"))
        assert picture.shape[-1] == 3 and picture.shape[0] >= 96
