"""Plain numpy references written from the definitions (torchvision's semantics), for tests."""
import math

import numpy as np


def iou_matrix(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            iw = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            ih = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            inter = iw * ih
            union = area_a[i] + area_b[j] - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def nms(boxes, scores, threshold):
    """Greedy NMS: visit by decreasing score (ties by index); drop boxes with IoU > threshold."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    iou = iou_matrix(boxes, boxes)
    keep, suppressed = [], np.zeros(len(order), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > threshold
    return np.array(keep, np.int64)


def batched_nms(boxes, scores, groups, threshold):
    keep = []
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        keep.extend(idx[nms(boxes[idx], scores[idx], threshold)])
    keep = np.array(keep, np.int64)
    return keep[np.argsort(-scores[keep], kind="stable")]


def decode(deltas, ref, weights=(1, 1, 1, 1), clip=math.log(1000 / 16)):
    deltas = np.asarray(deltas, np.float64)
    ref = np.asarray(ref, np.float64)
    w = ref[:, 2] - ref[:, 0]
    h = ref[:, 3] - ref[:, 1]
    cx = ref[:, 0] + 0.5 * w
    cy = ref[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw = np.minimum(deltas[:, 2] / weights[2], clip)
    dh = np.minimum(deltas[:, 3] / weights[3], clip)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)


def encode(boxes, ref, weights=(1, 1, 1, 1)):
    boxes = np.asarray(boxes, np.float64)
    ref = np.asarray(ref, np.float64)
    w, h = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    dx = weights[0] * ((boxes[:, 0] + gw / 2) - (ref[:, 0] + w / 2)) / w
    dy = weights[1] * ((boxes[:, 1] + gh / 2) - (ref[:, 1] + h / 2)) / h
    return np.stack([dx, dy, weights[2] * np.log(gw / w), weights[3] * np.log(gh / h)], 1)


def clip(boxes, height, width):
    out = np.array(boxes, np.float64)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def anchors(image_hw, feature_hws, sizes, ratios):
    out = []
    for size, (fh, fw) in zip(sizes, feature_hws):
        sy, sx = image_hw[0] // fh, image_hw[1] // fw
        base = []
        for r in ratios:
            hr = math.sqrt(r)
            wr = 1 / hr
            ws, hs = wr * size, hr * size
            base.append([round(-ws / 2), round(-hs / 2), round(ws / 2), round(hs / 2)])
        level = []
        for y in range(fh):
            for x in range(fw):
                for b in base:
                    level.append([x * sx + b[0], y * sy + b[1], x * sx + b[2], y * sy + b[3]])
        out.append(np.array(level, np.float64).reshape(-1, 4))
    return out


def paste_mask(mask, box, im_h, im_w, padding=1):
    """torchvision's expand_masks + expand_boxes + paste_mask_in_image, one mask, loops."""
    m = mask.shape[0]
    padded = np.pad(np.asarray(mask, np.float64), padding)
    p = m + 2 * padding
    scale = p / m
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * scale, (box[3] - box[1]) / 2 * scale
    x1, y1, x2, y2 = (int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh))  # truncation
    w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)

    def src_weights(out_len, in_len):
        rows = []
        for j in range(out_len):
            s = max((j + 0.5) * in_len / out_len - 0.5, 0.0)
            i0 = int(math.floor(s))
            i1 = i0 + 1 if i0 < in_len - 1 else i0
            lam = s - i0
            rows.append((i0, i1, lam))
        return rows

    ry, rx = src_weights(h, p), src_weights(w, p)
    resized = np.zeros((h, w))
    for yy, (a0, a1, ly) in enumerate(ry):
        for xx, (b0, b1, lx) in enumerate(rx):
            resized[yy, xx] = (
                (1 - ly) * ((1 - lx) * padded[a0, b0] + lx * padded[a0, b1])
                + ly * ((1 - lx) * padded[a1, b0] + lx * padded[a1, b1])
            )
    out = np.zeros((im_h, im_w))
    xa, xb = max(x1, 0), min(x2 + 1, im_w)
    ya, yb = max(y1, 0), min(y2 + 1, im_h)
    if xb > xa and yb > ya:
        out[ya:yb, xa:xb] = resized[ya - y1 : yb - y1, xa - x1 : xb - x1]
    return out


def random_boxes(rng, n, height, width, min_size=1.0, max_size=None):
    max_size = max_size or max(height, width) / 2
    wh = rng.uniform(min_size, max_size, (n, 2))
    xy = rng.uniform(-0.1 * width, width * 1.0, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def _roi_align_taps(v, size):
    """torchvision's ``bilinear_interpolate`` along one axis: ``[(index, weight), ...]``, or ``None``
    for a sample beyond ``-1`` / ``size`` (which contributes 0)."""
    if v < -1.0 or v > size:
        return None
    v = max(v, 0.0)
    low = int(v)
    if low >= size - 1:
        low = high = size - 1
        v = float(low)
    else:
        high = low + 1
    frac = v - low
    return [(low, 1.0 - frac), (high, frac)]


def roi_align(features, boxes, box_indices, output_size, spatial_scale, sampling_ratio, aligned, grad=None):
    """torchvision's ``roi_align`` on NHWC ``features [B, H, W, C]``, from the definition, loops.

    ``boxes [K, 4]`` (x1, y1, x2, y2) in input pixels, ``output_size (out_h, out_w)``;
    ``sampling_ratio <= 0`` is torchvision's adaptive grid, ``ceil(roi_size / out_size)`` per box.
    Sample coordinates use float32 in the C++ kernel's order of operations (so samples on the
    ``-1`` / ``H`` limits count as in torchvision); sums are float64. Returns ``[K, out_h, out_w, C]``
    float64, and with ``grad`` (same shape) also d(sum(out * grad))/d(features).
    """
    f32 = np.float32
    features = np.asarray(features, np.float64)
    _, height, width, channels = features.shape
    out_h, out_w = output_size
    out = np.zeros((len(boxes), out_h, out_w, channels))
    d_features = np.zeros(features.shape)
    offset = f32(0.5 if aligned else 0.0)
    for k, (box, b) in enumerate(zip(np.asarray(boxes, np.float32), box_indices)):
        x1, y1, x2, y2 = (f32(v) * f32(spatial_scale) - offset for v in box)
        roi_w, roi_h = f32(x2 - x1), f32(y2 - y1)
        if not aligned:
            roi_w, roi_h = max(roi_w, f32(1.0)), max(roi_h, f32(1.0))
        bin_h, bin_w = f32(roi_h / f32(out_h)), f32(roi_w / f32(out_w))
        grid_h = sampling_ratio if sampling_ratio > 0 else int(np.ceil(f32(roi_h / f32(out_h))))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(np.ceil(f32(roi_w / f32(out_w))))
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                weights = {}
                for iy in range(grid_h):
                    y = f32(y1 + f32(ph) * bin_h) + f32(f32(iy + 0.5) * bin_h) / f32(grid_h)
                    ty = _roi_align_taps(float(y), height)
                    for ix in range(grid_w):
                        x = f32(x1 + f32(pw) * bin_w) + f32(f32(ix + 0.5) * bin_w) / f32(grid_w)
                        tx = _roi_align_taps(float(x), width)
                        if ty is None or tx is None:
                            continue
                        for r, wr in ty:
                            for c, wc in tx:
                                weights[r, c] = weights.get((r, c), 0.0) + wr * wc / count
                for (r, c), w in weights.items():
                    out[k, ph, pw] += w * features[b, r, c]
                    if grad is not None:
                        d_features[b, r, c] += w * np.asarray(grad[k, ph, pw], np.float64)
    return (out, d_features) if grad is not None else out


def _adaptive_roi_align_weights(lo, hi, out, size):
    """``[out, size]``: along one axis, what torchvision's ``roi_align(spatial_scale=1,
    sampling_ratio=-1, aligned=False)`` averages per output bin (``ceil(roi / out)`` samples per
    bin, bilinear, zero beyond ``-1`` / ``size``, clamped to ``[0, size - 1]`` otherwise).
    Sample coordinates in float32 in the C++ kernel's order of operations."""
    f32 = np.float32
    lo, hi = f32(lo), f32(hi)
    length = max(f32(hi - lo), f32(1.0))
    bin_size = f32(length / f32(out))
    grid = int(np.ceil(f32(length / f32(out))))
    p = np.arange(out, dtype=f32)[:, None]
    k = np.arange(grid, dtype=f32)[None, :]
    y = (lo + p * bin_size) + (k + f32(0.5)) * bin_size / f32(grid)  # [out, grid] float32
    valid = (y >= -1.0) & (y <= size)
    y = np.maximum(y.astype(np.float64), 0.0)
    low = np.floor(y).astype(np.int64)
    last = low >= size - 1
    low = np.where(last, size - 1, low)
    high = np.where(last, size - 1, low + 1)
    frac = np.where(last, 0.0, y - low)
    rows = np.broadcast_to(np.arange(out)[:, None], y.shape)
    weights = np.zeros((out, size))
    np.add.at(weights, (rows[valid], low[valid]), (1.0 - frac[valid]) / grid)
    np.add.at(weights, (rows[valid], high[valid]), frac[valid] / grid)
    return weights


def project_masks_on_boxes(masks, rois, matched, size):
    """torchvision's ``project_masks_on_boxes`` (Mask R-CNN's mask targets): ``roi_align`` of the
    full-resolution ``masks [G, H, W]`` over ``rois [K, 4]`` (x1, y1, x2, y2) of ground truth
    ``matched [K]`` to ``size x size``, with ``spatial_scale=1``, adaptive ``sampling_ratio=-1``
    and ``aligned=False``. Separable, so each RoI is ``Wy @ mask @ Wx^T``. ``[K, size, size]`` float64.
    """
    masks = np.asarray(masks, np.float64)
    _, height, width = masks.shape
    out = np.zeros((len(rois), size, size))
    for k, (roi, g) in enumerate(zip(np.asarray(rois, np.float32), matched)):
        wy = _adaptive_roi_align_weights(roi[1], roi[3], size, height)
        wx = _adaptive_roi_align_weights(roi[0], roi[2], size, width)
        out[k] = wy @ masks[g] @ wx.T
    return out
