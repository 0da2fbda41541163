"""The CUDA RoIAlign kernel against torchvision's own ``roi_align`` (CPU and CUDA: independent references).

Reads what ``roi_align/standalone_test --dump DIR`` wrote (float32 NHWC maps, boxes, their images and
levels, and for each case the GPU kernel's output, the upstream gradient and the gradient w.r.t. the
maps) and runs ``torchvision.ops.roi_align`` level by level on the same inputs (NCHW maps, as
``MultiScaleRoIAlign`` does), on the CPU and on the GPU, comparing forward outputs and map
gradients. Also times torchvision's GPU forward and forward + backward over all levels (CUDA events,
median of 20), to be read beside the standalone test's own timings.

    python custom_ops/compare_torchvision_cuda.py DIR [--device cuda]

Needs PyTorch and torchvision (the GPU machine has them); not TensorFlow. Exit status 0 when every
case is within tolerance, 1 otherwise.

Tolerances (maps of N(0, 1) values):

* torchvision's CPU kernel: forward 1e-5, backward 1e-4 absolute. Both compute each sample
  coordinate and bilinear sum in float32 without FMA contraction (our CUDA kernel is built with
  ``--fmad=false`` for this), so forward results agree to float32 rounding of the final sums
  (measured 5e-7 with the CPU op); gradients are sums in another order (atomics).
* torchvision's CUDA kernel: nvcc contracts ``start + p * bin + (i + 0.5) * bin / grid`` into FMAs
  there, so a sample coordinate y can differ by about 2 ulp(y) <= 2 * 2**-23 * H (H the largest
  map side in feature pixels), which moves each bilinear weight by as much and each sample by at
  most that times |f_high - f_low| <= 2 max|f| per axis: bound 8 * 2**-23 * H * max|f| (about 1e-3
  for 200-pixel maps, 3e-4 for 64-pixel ones); the same form with max|upstream gradient| plus
  1e-4 for the gradients. Measured on an H200: 2e-5 (64-pixel maps) and 8e-5 (200-pixel maps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

FORWARD_TOLERANCE = 1e-5
BACKWARD_TOLERANCE = 1e-4
FLOAT32_ULP = 2.0**-23


def read_meta(folder: Path) -> tuple[int, int, list[tuple[int, int, float]], list[tuple[int, int, bool]]]:
    batch = channels = 0
    levels, cases = [], []
    for line in (folder / "cases.txt").read_text().splitlines():
        key, *values = line.split()
        if key == "batch":
            batch = int(values[0])
        elif key == "channels":
            channels = int(values[0])
        elif key == "level":
            levels.append((int(values[0]), int(values[1]), float(values[2])))
        elif key == "case":
            cases.append((int(values[0]), int(values[1]), values[2] == "1"))
    return batch, channels, levels, cases


def load(path: Path, dtype, shape) -> np.ndarray:
    array = np.fromfile(path, dtype=dtype)
    if -1 not in shape and array.size != int(np.prod(shape)):
        raise SystemExit(f"{path}: {array.size} values, expected shape {shape}")
    return array.reshape(shape)


def multilevel_roi_align(maps, boxes, box_indices, levels, scales, pooled, ratio, aligned):
    """torchvision's roi_align per level, results put back in box order: [K, C, P, P]."""
    num_boxes, channels = boxes.shape[0], maps[0].shape[1]
    out = maps[0].new_zeros((num_boxes, channels, pooled, pooled))
    rois = torch.cat([box_indices[:, None].to(boxes.dtype), boxes], dim=1)
    for level, (feature, scale) in enumerate(zip(maps, scales)):
        index = torch.nonzero(levels == level).squeeze(1)
        pooled_level = torchvision.ops.roi_align(
            feature, rois[index], output_size=pooled, spatial_scale=scale, sampling_ratio=ratio, aligned=aligned
        )
        out = out.index_put((index,), pooled_level)
    return out


def median_ms(device: torch.device, fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch, channels, level_shapes, cases = read_meta(args.folder)
    maps_nhwc = [
        load(args.folder / f"features{l}.f32", np.float32, (batch, h, w, channels)) for l, (h, w, _) in enumerate(level_shapes)
    ]
    scales = [scale for _, _, scale in level_shapes]
    boxes = torch.from_numpy(load(args.folder / "boxes.f32", np.float32, (-1,)).reshape(-1, 4).copy()).to(device)
    num_boxes = boxes.shape[0]
    box_indices = torch.from_numpy(load(args.folder / "box_indices.i32", np.int32, (num_boxes,)).copy()).to(device)
    levels = torch.from_numpy(load(args.folder / "levels.i32", np.int32, (num_boxes,)).copy()).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {name}; {num_boxes} boxes, "
          f"{channels} channels, maps " + ", ".join(f"{h}x{w}" for h, w, _ in level_shapes))
    max_side = max(max(h, w) for h, w, _ in level_shapes)
    max_map = max(float(np.abs(m).max()) for m in maps_nhwc)
    print(f"{'case':<24} {'cpu fwd err':>11} {'cpu bwd err':>11} {'gpu fwd err':>11} {'gpu bwd err':>11} "
          f"{'fma bound':>9} {'tv fwd ms':>9} {'tv fwd+bwd ms':>13}")
    ok = True
    for i, (pooled, ratio, aligned) in enumerate(cases):
        ours = load(args.folder / f"case{i}_out.f32", np.float32, (num_boxes, pooled, pooled, channels))
        upstream = load(args.folder / f"case{i}_grad.f32", np.float32, (num_boxes, pooled, pooled, channels))
        ours_grads = [
            load(args.folder / f"case{i}_dfeatures{l}.f32", np.float32, m.shape) for l, m in enumerate(maps_nhwc)
        ]
        errors, timings = {}, {}
        for second, where in enumerate(("cpu", device.type)):
            dev = device if second else torch.device("cpu")
            maps = [torch.from_numpy(m).to(dev).permute(0, 3, 1, 2).contiguous().requires_grad_(True) for m in maps_nhwc]
            upstream_nchw = torch.from_numpy(upstream).to(dev).permute(0, 3, 1, 2).contiguous()
            geometry = (boxes.to(dev), box_indices.to(dev), levels.to(dev), scales, pooled, ratio, aligned)
            out = multilevel_roi_align(maps, *geometry)
            forward_error = float(np.abs(out.detach().permute(0, 2, 3, 1).cpu().numpy() - ours).max()) if num_boxes else 0.0
            grads = torch.autograd.grad(out, maps, grad_outputs=upstream_nchw, allow_unused=True)
            backward_error = 0.0
            for grad, ours_grad in zip(grads, ours_grads):
                theirs = np.zeros_like(ours_grad) if grad is None else grad.permute(0, 2, 3, 1).cpu().numpy()
                backward_error = max(backward_error, float(np.abs(theirs - ours_grad).max()))
            errors[where] = (forward_error, backward_error)
            if second:

                def forward():
                    with torch.no_grad():
                        multilevel_roi_align(maps, *geometry)

                def forward_backward():
                    result = multilevel_roi_align(maps, *geometry)
                    torch.autograd.grad(result, maps, grad_outputs=upstream_nchw, allow_unused=True)

                timings = (median_ms(device, forward), median_ms(device, forward_backward))
        fma_forward = 8 * FLOAT32_ULP * max_side * max_map
        fma_backward = BACKWARD_TOLERANCE + 8 * FLOAT32_ULP * max_side * float(np.abs(upstream).max(initial=0.0))
        cpu_ok = errors["cpu"][0] <= FORWARD_TOLERANCE and errors["cpu"][1] <= BACKWARD_TOLERANCE
        gpu_ok = errors[device.type][0] <= fma_forward and errors[device.type][1] <= fma_backward
        ok = ok and cpu_ok and gpu_ok
        label = f"{pooled}x{pooled} ratio {ratio}{' aligned' if aligned else ''}{'' if cpu_ok and gpu_ok else ' FAIL'}"
        print(f"{label:<24} {errors['cpu'][0]:11.3g} {errors['cpu'][1]:11.3g} {errors[device.type][0]:11.3g} "
              f"{errors[device.type][1]:11.3g} {fma_forward:9.2g} {timings[0]:9.3f} {timings[1]:13.3f}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
