"""Tests of keras_maskrcnn.data.augment: multi-scale and large-scale jitter (images, boxes and
box-relative coverage masks together) against torchvision.transforms.v2 with forced random draws,
the crop's mask re-sampling against full-resolution masks, edge cases and the pipeline."""
import os

import numpy as np
import pytest
import tensorflow as tf

import tvref
from keras_maskrcnn.data import augment
from keras_maskrcnn.data.masks import mini_mask
from keras_maskrcnn.data.pipeline import build_dataset

M = 128

# Measured bounds (see the tests that use them).
IMAGE_ATOL = 0.01  # TF vs torchvision antialiased bilinear on float images: measured 0.004 of 255
BOX_ATOL = 1e-3  # measured: identical (0.0)


# ------------------------------------------------------------------------------------------
# Scenes: full-resolution masks with tight boxes
# ------------------------------------------------------------------------------------------


KINDS = ("disk", "disk", "disk", "bar", "diagonal", "pixel", "corner", "edge")
SOLID = [i for i, kind in enumerate(KINDS) if kind in ("disk", "corner", "edge")]


def _scene(height, width, seed):
    """A noisy image and full-resolution masks: disks, a 3-pixel bar, a diagonal, a one-pixel
    object, objects touching each border. Returns image uint8, masks uint8 [n, H, W], boxes [n, 4]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    masks = []
    for _ in range(3):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, min(height, width) / 3)
        masks.append((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r)
    bar = np.zeros((height, width), bool)
    bar[height // 5:height * 4 // 5, width // 3:width // 3 + 3] = True
    diagonal = (np.abs(xx - yy * width / height) < 2) & (yy > height // 4)
    pixel = np.zeros((height, width), bool)
    pixel[rng.integers(height), rng.integers(width)] = True
    corner = (xx < width // 6) & (yy < height // 6)  # touches the top and left borders
    edge = (xx >= width - width // 5) & (yy >= height // 2)  # touches the right and bottom borders
    masks = np.stack(masks + [bar, diagonal, pixel, corner, edge]).astype(np.uint8)  # in the order of KINDS
    assert masks.any(axis=(1, 2)).all()
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return image, masks, np.asarray(boxes, np.float32)


def _coverage(masks, boxes):
    return np.stack([mini_mask(m, b, M) for m, b in zip(masks, boxes)] or [np.zeros((M, M), np.uint8)])[: len(boxes)]


def _cell_overlaps(lo, hi, n, size):
    """``[n, size]`` length of each of ``n`` equal cells of ``[lo, hi]`` inside pixel ``[k, k + 1]``."""
    edges = lo + (hi - lo) * np.arange(n + 1) / n
    pixels = np.arange(size)
    return np.maximum(np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels), 0)


def _paste(mask, box, height, width):
    """Pixels of a ``height x width`` image at least half covered by a coverage mask in ``box``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    n = mask.shape[0]
    area = _cell_overlaps(y1, y2, n, height).T @ (mask / 255.0) @ _cell_overlaps(x1, x2, n, width)
    return area >= 0.5


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def _apply(aug, image, boxes, masks, **draws):
    classes = np.arange(1, len(boxes) + 1, dtype=np.int32)
    draws = {k: tf.constant(v) for k, v in draws.items()}
    out = aug.apply(tf.constant(image), tf.constant(boxes), tf.constant(classes), tf.constant(masks), draws)
    return [t.numpy() for t in out]


# ------------------------------------------------------------------------------------------
# The crop's mask re-sampling against full-resolution masks
# ------------------------------------------------------------------------------------------


def _random_crops(rng, height, width, count):
    for _ in range(count):
        s = rng.uniform(0.3, 2.5)
        top, left = int(rng.integers(0, int(height * s * 0.6))), int(rng.integers(0, int(width * s * 0.6)))
        crop_h = int(rng.integers(20, int(height * s * 0.7) + 21))
        crop_w = int(rng.integers(20, int(width * s * 0.7) + 21))
        yield s, top, left, crop_h, crop_w


def test_cropped_coverage_masks_against_full_resolution():
    """The re-sampled coverage of a cut box against the coverage computed exactly from the
    full-resolution mask for the clipped box (:func:`mini_mask`).

    Measured here (237 cut instances of disks, a 3-pixel bar, a diagonal, one-pixel objects and
    border objects, scales 0.3-2.5): mean absolute cell error 0.0045 (of 1), at most 0.097 over
    one instance; single cells are off by up to 0.98 where a crop keeps a sliver of a large box (a
    new cell then spans a fraction of an old cell, whose coverage is taken as even). Pasted at
    image resolution, disks of 20+ visible pixels keep an IoU of at least 0.94 (mean 0.997) with
    the exactly computed coverage. Uncut masks are unchanged, bit for bit.
    """
    rng = np.random.default_rng(0)
    height, width = 120, 160
    cell_errors, disk_ious, cut = [], [], 0
    for seed in range(6):
        image, full, boxes = _scene(height, width, seed)
        coverage = _coverage(full, boxes)
        for s, top, left, crop_h, crop_w in _random_crops(rng, height, width, 12):
            scaled = (boxes * np.float32(s)).astype(np.float32)
            new_boxes, kept, new_masks = (t.numpy() for t in augment.crop_instances(
                tf.constant(scaled), tf.range(len(scaled)), tf.constant(coverage), top, left, crop_h, crop_w))
            for box, k, mask in zip(new_boxes, kept, new_masks):
                if np.array_equal(box, scaled[k]):
                    np.testing.assert_array_equal(mask, coverage[k])  # not cut: bit for bit
                    continue
                cut += 1
                original_box = (box.astype(np.float64) + [left, top, left, top]) / s
                exact = mini_mask(full[k], original_box, M)
                error = np.abs(mask.astype(np.float64) - exact) / 255
                cell_errors.append((error.mean(), error.max()))
                exact_pixels = _paste(exact, box, crop_h, crop_w)
                if k < 3 and exact_pixels.sum() >= 20:  # a disk, 20+ pixels visible
                    disk_ious.append(_iou(_paste(mask, box, crop_h, crop_w), exact_pixels))
    cell_errors = np.array(cell_errors)
    print(f"{cut} cut: mean cell error {cell_errors[:, 0].mean():.4f}, per instance <= {cell_errors[:, 0].max():.4f}, "
          f"cells <= {cell_errors[:, 1].max():.3f}; disks IoU min {min(disk_ious):.3f} mean {np.mean(disk_ious):.3f}")
    assert cut > 200
    assert cell_errors[:, 0].mean() < 0.008 and cell_errors[:, 0].max() < 0.15
    assert min(disk_ious) > 0.9 and np.mean(disk_ious) > 0.98


def test_uncut_window_is_identity_and_half_window_doubles_cells():
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 256, (3, M, M)).astype(np.uint8)
    whole = tf.constant([[0.0, 0.0, M, M]] * 3, tf.float64)
    np.testing.assert_array_equal(augment.resample_coverage_window(tf.constant(masks), whole).numpy(), masks)
    left_half = tf.constant([[0.0, 0.0, M / 2, M]] * 3, tf.float64)
    out = augment.resample_coverage_window(tf.constant(masks), left_half).numpy()
    np.testing.assert_array_equal(out, np.repeat(masks[:, :, : M // 2], 2, axis=2))


def test_resampling_only_the_window_equals_resample_then_crop():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
    for size, top, left, window in [((96, 128), 30, 50, (40, 60)), ((20, 27), 0, 0, (20, 27)),
                                    ((70, 93), 5, 0, (64, 93)), ((5, 6), 1, 2, (3, 4))]:
        for antialias in (True, False):
            whole = augment.resample(image, size, antialias).numpy()[top:top + window[0], left:left + window[1]]
            part = augment.resample_window(image, tf.constant(size), top, left, tf.constant(window), antialias)
            np.testing.assert_allclose(part.numpy(), whole, atol=2e-3, err_msg=str((size, antialias)))  # 0.0009


# ------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------


def test_crop_that_removes_every_instance_gives_empty_targets():
    image, full, boxes = _scene(60, 80, 3)
    keep = boxes[:, 2] <= 39  # objects left of x = 39 only
    assert keep.any()
    boxes, coverage = boxes[keep], _coverage(full[keep], boxes[keep])
    # Scale 2 of min(60 / 60, 40 / 80) keeps 60 x 80; the crop is [39, 79) in x.
    aug = augment.LargeScaleJitter(target_size=(60, 40), scale_range=(2.0, 2.0), flip_probability=0.0)
    out_image, out_boxes, classes, masks = _apply(aug, image, boxes, coverage, flip=False, scale=0.0, crop=0.9999)
    assert out_image.shape == (60, 40, 3)
    assert out_boxes.shape == (0, 4) and classes.shape == (0,) and masks.shape == (0, M, M)


def test_one_pixel_objects_and_border_boxes():
    image = np.zeros((10, 10, 3), np.uint8)
    boxes = np.array([[0, 0, 1, 1], [9, 9, 10, 10], [4, 4, 5, 5], [0, 0, 10, 10]], np.float32)
    masks = np.full((4, M, M), 255, np.uint8)
    # Scale 2 of min(5 / 10, 5 / 10) keeps 10 x 10; the 5 x 5 crop at 0.5 is [2, 7) x [2, 7).
    aug = augment.LargeScaleJitter(target_size=(5, 5), scale_range=(2.0, 2.0), flip_probability=0.0)
    _, out_boxes, classes, out_masks = _apply(aug, image, boxes, masks, flip=False, scale=0.0, crop=0.5)
    # Corner pixels are cropped out; the centre pixel is kept, the image box clipped to the crop.
    np.testing.assert_array_equal(classes, [3, 4])
    np.testing.assert_array_equal(out_boxes, [[2, 2, 3, 3], [0, 0, 5, 5]])
    assert (out_masks == 255).all()  # a full mask stays full wherever it is cut
    # A box touching the crop from outside is dropped; one ending on its edges is kept, uncut.
    boxes = np.array([[7, 2, 8, 3], [2, 2, 7, 7]], np.float32)
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 256, (2, M, M)).astype(np.uint8)
    _, out_boxes, classes, out_masks = _apply(aug, image, boxes, masks, flip=False, scale=0.0, crop=0.5)
    np.testing.assert_array_equal(classes, [2])
    np.testing.assert_array_equal(out_boxes, [[0, 0, 5, 5]])
    np.testing.assert_array_equal(out_masks, masks[1:])


def test_padding_is_the_mean_colour_and_normalises_to_zero():
    from keras_maskrcnn import transform

    image = np.full((16, 32, 3), 7, np.uint8)
    aug = augment.LargeScaleJitter(target_size=(64, 64), scale_range=(0.5, 0.5), flip_probability=0.0)
    out, *_ = _apply(aug, image, np.zeros((0, 4), np.float32), np.zeros((0, M, M), np.uint8),
                     flip=False, scale=0.0, crop=0.0)
    # 0.5 * min(64 / 16, 64 / 32) = 1: 16 x 32, padded with the mean at the bottom and right.
    np.testing.assert_allclose(out[:16, :32], 7.0, atol=1e-4)
    mean = np.asarray(augment.MEAN_FILL, np.float32)
    np.testing.assert_array_equal(out[16:], np.broadcast_to(mean, (48, 64, 3)))
    np.testing.assert_array_equal(out[:, 32:], np.broadcast_to(mean, (64, 32, 3)))
    np.testing.assert_allclose(transform.normalize(out[16:]).numpy(), 0.0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# torchvision.transforms.v2 with the same draws
# ------------------------------------------------------------------------------------------

# torchvision's ScaleJitter and RandomShortestSize with their random draws forced (torch.rand /
# torch.randint patched), FixedSizeCrop's rule of torchvision's detection reference (one draw r for
# both axes, offsets int(excess * r), boxes clipped, instances without area dropped, padding at the
# bottom/right with fill) with v2's functional crop/pad, and the flip.
TORCH_AUGMENT = """
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors


def forced(name, value):
    original = getattr(torch, name)
    setattr(torch, name, lambda *args, **kwargs: torch.tensor(value))
    return lambda: setattr(torch, name, original)


def fixed_size_crop(image, boxes, masks, labels, size, r, fill):
    _, h, w = image.shape
    new_h, new_w = min(h, size[0]), min(w, size[1])
    if (new_h, new_w) != (h, w):
        r = torch.tensor([r], dtype=torch.float32)
        top, left = int(max(h - size[0], 0) * r), int(max(w - size[1], 0) * r)
        image, boxes = F.crop(image, top, left, new_h, new_w), F.crop(boxes, top, left, new_h, new_w)
        valid = (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
        boxes, labels = tv_tensors.wrap(boxes[valid], like=boxes), labels[valid]
        masks = F.crop(masks[valid], top, left, new_h, new_w)
    padding = [0, 0, size[1] - new_w, size[0] - new_h]
    if padding[2] or padding[3]:
        image, boxes = F.pad(image, padding, fill=list(fill)), F.pad(boxes, padding)
        masks = F.pad(masks, padding, fill=0)
    return image, boxes, masks, labels


def flip(image, boxes, masks, on):
    if not on:
        return image, boxes, masks
    return F.horizontal_flip(image), F.horizontal_flip(boxes), F.horizontal_flip(masks)


def run_scene(scene):
    image = tv_tensors.Image(torch.from_numpy(inputs[f"{scene}_image"]).permute(2, 0, 1).float())
    h, w = image.shape[-2:]
    boxes0 = tv_tensors.BoundingBoxes(torch.from_numpy(inputs[f"{scene}_boxes"]), format="XYXY", canvas_size=(h, w))
    masks0 = tv_tensors.Mask(torch.from_numpy(inputs[f"{scene}_masks"]))
    labels0 = torch.arange(1, len(boxes0) + 1)
    fill = [float(v) for v in inputs["fill"]]
    for i, (u_scale, u_crop, on, th, tw) in enumerate(inputs["lsj"]):
        size = (int(th), int(tw))
        restore = forced("rand", [float(np.float32(u_scale))])
        jitter = T.ScaleJitter(target_size=(size[1], size[0]), scale_range=tuple(inputs["scale_range"]), antialias=True)
        image1, boxes1, masks1 = jitter(image, boxes0, masks0)
        restore()
        image1, boxes1, masks1, labels = fixed_size_crop(
            image1, boxes1, masks1, labels0, size, np.float32(u_crop), fill)
        image1, boxes1, masks1 = flip(image1, boxes1, masks1, bool(on))
        outputs.update({f"{scene}_lsj{i}_image": image1.permute(1, 2, 0), f"{scene}_lsj{i}_boxes": boxes1,
                        f"{scene}_lsj{i}_masks": masks1, f"{scene}_lsj{i}_labels": labels})
    for i, (index, on) in enumerate(inputs["multiscale"]):
        restore = forced("randint", int(index))
        resize = T.RandomShortestSize(min_size=[int(m) for m in inputs["min_sizes"]], max_size=int(inputs["max_size"]))
        image1, boxes1, masks1 = resize(image, boxes0, masks0)
        restore()
        image1, boxes1, masks1 = flip(image1, boxes1, masks1, bool(on))
        outputs.update({f"{scene}_ms{i}_image": image1.permute(1, 2, 0), f"{scene}_ms{i}_boxes": boxes1,
                        f"{scene}_ms{i}_masks": masks1})


for scene in range(int(inputs["scenes"])):
    run_scene(scene)
"""


def _exact_masks(full, resized, top, left, size, flip):
    """Full-resolution masks moved through the same geometry exactly: output pixels at least half
    covered by the object (``resized``: size after the resize, ``top``/``left``: crop, ``size``:
    output, padding at the bottom/right)."""
    (height, width), (kept_h, kept_w) = full.shape[1:], np.minimum(resized, size)
    sy, sx = resized[0] / height, resized[1] / width
    rows = _cell_overlaps(top / sy, (top + kept_h) / sy, kept_h, height) * sy
    cols = _cell_overlaps(left / sx, (left + kept_w) / sx, kept_w, width) * sx
    out = np.zeros((len(full),) + tuple(size), bool)
    out[:, :kept_h, :kept_w] = rows @ full.astype(np.float64) @ cols.T >= 0.5
    return out[:, :, ::-1] if flip else out


def _compare_instances(name, ours, theirs, labels, exact, ious, box_errors, min_area=16):
    """Kept instances and boxes; our coverage masks pasted at the output size against torchvision's
    transformed full masks and the exact ones (``ious`` collects (ours-torchvision, ours-exact,
    torchvision-exact) for solid objects of ``min_area`` pixels, ``box_errors`` the largest box
    difference)."""
    out_image, out_boxes, classes, masks = ours
    np.testing.assert_array_equal(classes, labels, err_msg=f"{name}: dropped instances differ")
    np.testing.assert_allclose(out_boxes, theirs["boxes"], atol=BOX_ATOL, rtol=0, err_msg=name)
    box_errors.append(np.abs(out_boxes - theirs["boxes"]).max(initial=0.0))
    height, width = out_image.shape[:2]
    for mask, box, full, k in zip(masks, out_boxes, theirs["masks"], classes - 1):
        if k in SOLID and full.sum() >= min_area:
            pasted, full = _paste(mask, box, height, width), full.astype(bool)
            ious.append((_iou(pasted, full), _iou(pasted, exact[k]), _iou(full, exact[k])))


# Draws: (u_scale, u_crop, flip, target height, target width). Scale range 0.1-2.0: u 0 -> 0.1
# (a 10x downscale, padded), u 0.99 -> 1.98 (cropped); 64 x 96 targets crop one axis, pad the other.
LSJ_DRAWS = np.array([
    [0.0, 0.5, 0, 64, 64], [0.25, 0.3, 1, 64, 64], [0.47, 0.0, 0, 64, 64], [0.5, 0.999, 1, 64, 64],
    [0.7, 0.5, 0, 64, 64], [0.99, 0.0, 1, 64, 64], [0.99, 0.999, 0, 64, 64], [0.8, 0.61, 0, 64, 96],
    [0.6, 0.2, 1, 96, 64], [0.33, 0.77, 0, 96, 64],
], np.float64)
MIN_SIZES = (32, 48, 64, 80, 96, 112)
MULTISCALE_DRAWS = np.array([[0, 0], [1, 1], [2, 0], [3, 1], [4, 0], [5, 1]])


SHAPES = [(90, 120), (150, 70), (64, 64), (200, 260)]
SCALE_RANGE, MAX_SIZE = (0.1, 2.0), 100


@pytest.fixture(scope="module")
def torchvision_outputs():
    """torchvision's outputs for the scenes of SHAPES and every draw (one reference run)."""
    arrays = {}
    for j, shape in enumerate(SHAPES):
        arrays.update(zip((f"{j}_image", f"{j}_masks", f"{j}_boxes"), _scene(*shape, seed=shape[0])))
    return tvref.run(
        TORCH_AUGMENT, scenes=np.array(len(SHAPES)), fill=np.array(augment.MEAN_FILL), lsj=LSJ_DRAWS,
        scale_range=np.array(SCALE_RANGE), multiscale=MULTISCALE_DRAWS, min_sizes=np.array(MIN_SIZES),
        max_size=np.array(MAX_SIZE), **arrays,
    )


@tvref.requires_torchvision
@pytest.mark.parametrize("scene", range(len(SHAPES)))
def test_lsj_and_multiscale_match_torchvision(scene, torchvision_outputs):
    """Same draws as torchvision.transforms.v2 (ScaleJitter, the detection reference's FixedSizeCrop,
    RandomShortestSize, flip): output sizes, kept instances and boxes identical (measured
    difference 0.0), images within 0.01 of 255 (antialiased bilinear on float images: measured
    0.004).

    Masks differ by construction: torchvision resizes full-image masks by nearest neighbour (each
    new pixel takes the old pixel under its top-left corner, so edges move by up to a resized
    pixel), the coverage masks follow the geometry exactly. So both are also compared with the
    full-resolution masks moved exactly (:func:`_exact_masks`). Solid objects (disks, rectangles
    at the borders) of 16+ pixels, measured over the four shapes: IoU with torchvision's masks
    min 0.60, mean 0.88; with the exact masks min 0.80, mean 0.99; torchvision's own IoU with the
    exact masks min 0.60, mean 0.88. Thin parts (a 3-pixel bar, a diagonal) are not compared:
    scaled below a pixel, nearest neighbour keeps a 1-pixel line where their coverage is under
    half a pixel (their coverage is checked in :func:`test_cropped_coverage_masks_against_full_resolution`).
    """
    shape = SHAPES[scene]
    image, full, boxes = _scene(*shape, seed=shape[0])
    coverage = _coverage(full, boxes)
    scale_range, max_size = SCALE_RANGE, MAX_SIZE
    theirs = {k[len(f"{scene}_"):]: v for k, v in torchvision_outputs.items() if k.startswith(f"{scene}_")}
    ious, image_errors, box_errors, dropped = [], [], [], 0
    for i, (u_scale, u_crop, on, th, tw) in enumerate(LSJ_DRAWS):
        size, u_scale, u_crop = (int(th), int(tw)), np.float32(u_scale), np.float32(u_crop)
        ours = _apply(augment.LargeScaleJitter(size, scale_range), image, boxes, coverage, flip=bool(on),
                      scale=u_scale, crop=u_crop)
        expected = {k: theirs[f"lsj{i}_{k}"] for k in ("image", "boxes", "masks")}
        assert ours[0].shape == expected["image"].shape
        image_errors.append(np.abs(ours[0] - expected["image"]).max())
        resized = augment.scale_jitter_size(shape, size, scale_range, u_scale).numpy()
        top, left = augment.crop_offsets(resized, size, u_crop).numpy()
        exact = _exact_masks(full, resized, top, left, size, bool(on))
        _compare_instances(f"lsj draw {i}", ours, expected, theirs[f"lsj{i}_labels"], exact, ious, box_errors)
        dropped += len(boxes) - len(ours[2])
    for i, (index, on) in enumerate(MULTISCALE_DRAWS):
        ours = _apply(augment.MultiScale(MIN_SIZES, max_size), image, boxes, coverage, flip=bool(on),
                      index=np.int32(index))
        expected = {k: theirs[f"ms{i}_{k}"] for k in ("image", "boxes", "masks")}
        assert ours[0].shape == expected["image"].shape
        image_errors.append(np.abs(ours[0] - expected["image"]).max())
        exact = _exact_masks(full, ours[0].shape[:2], 0, 0, ours[0].shape[:2], bool(on))
        _compare_instances(f"multiscale draw {i}", ours, expected, np.arange(1, len(boxes) + 1), exact, ious,
                           box_errors)
    ious = np.array(ious)
    print(f"{shape}: image max error {max(image_errors):.4f}, box {max(box_errors)}; {len(ious)} masks, "
          "IoU min / mean: "
          f"ours-torchvision {ious[:, 0].min():.3f} / {ious[:, 0].mean():.3f}, ours-exact "
          f"{ious[:, 1].min():.3f} / {ious[:, 1].mean():.3f}, torchvision-exact {ious[:, 2].min():.3f} / "
          f"{ious[:, 2].mean():.3f}")
    assert dropped > 0  # some draws crop instances out
    assert max(image_errors) < IMAGE_ATOL
    assert ious[:, 0].min() >= 0.55 and ious[:, 0].mean() >= 0.8
    assert ious[:, 1].min() >= 0.75 and ious[:, 1].mean() >= 0.97
    assert ious[:, 1].mean() >= ious[:, 2].mean()  # closer to the exact masks than nearest neighbour


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------


class _Forced(augment.LargeScaleJitter):
    def sample(self, seed):
        return {"flip": tf.constant(True), "scale": tf.constant(0.99), "crop": tf.constant(0.999)}


def _loader(scenes):
    def load(index):
        image, full, boxes = scenes[index]
        return image, boxes, np.arange(1, len(boxes) + 1, dtype=np.int32), _coverage(full, boxes), index
    return load


def test_pipeline_lsj_in_the_graph_equals_the_function():
    scenes = [_scene(90, 120, 5), _scene(60, 40, 6)]
    aug = _Forced(target_size=64, scale_range=(0.1, 2.0))
    dataset = build_dataset(2, _loader(scenes), batch_size=2, training=True, shuffle=False, max_instances=12,
                            augmentation=aug)
    inputs, targets = next(iter(dataset))
    assert inputs["images"].shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(inputs["image_sizes"].numpy(), [[64, 64], [64, 64]])
    for b, (image, full, boxes) in enumerate(scenes):
        out_image, out_boxes, classes, masks = _apply(aug, image, boxes, _coverage(full, boxes),
                                                      flip=True, scale=np.float32(0.99), crop=np.float32(0.999))
        n = len(classes)
        np.testing.assert_allclose(inputs["images"][b].numpy(), out_image, atol=1e-4)
        np.testing.assert_array_equal(targets["boxes"][b, :n].numpy(), out_boxes)
        np.testing.assert_array_equal(targets["classes"][b].numpy(), np.pad(classes, (0, 12 - n)))
        np.testing.assert_array_equal(targets["masks"][b, :n].numpy(), masks)


@pytest.mark.parametrize("name, options", [("multiscale", {"min_sizes": (48, 64)}), ("lsj", {"target_size": 96}),
                                           ("flip", None), ("none", None)])
def test_pipeline_presets_by_name(name, options):
    scenes = [_scene(90, 120, 7), _scene(60, 40, 8), (np.zeros((50, 50, 3), np.uint8), np.zeros((0, 50, 50), np.uint8),
                                                      np.zeros((0, 4), np.float32))]
    dataset = build_dataset(3, _loader(scenes), batch_size=3, training=True, shuffle=False, seed=3, min_size=64,
                            max_size=200, max_instances=None, augmentation=name, augmentation_options=options)
    for _ in range(2):  # new draws each epoch, empty ground truth included
        inputs, targets = next(iter(dataset))
        sizes = inputs["image_sizes"].numpy()
        if name == "lsj":
            assert (sizes == 96).all()
        elif name == "multiscale":
            assert np.isin(sizes.min(1), [48, 64]).all()
        else:
            assert (sizes.min(1) == 64).all()
        counts = (targets["classes"].numpy() > 0).sum(1)
        assert counts[2] == 0
        boxes = targets["boxes"].numpy()
        for b in range(3):
            h, w = sizes[b]
            valid = boxes[b, : counts[b]]
            assert (valid[:, 0] >= 0).all() and (valid[:, 2] <= w).all() and (valid[:, 3] <= h).all()
            assert (valid[:, 2] > valid[:, 0]).all() and (valid[:, 3] > valid[:, 1]).all()


def test_unknown_augmentation_name():
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.get("mosaic")


def test_show_augmentations_example_draws_every_preset(tmp_path):
    import importlib.util

    from PIL import Image

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "show_augmentations.py")
    spec = importlib.util.spec_from_file_location("show_augmentations", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    example.main(["--data", str(tmp_path / "absent"), "--output", str(out), "--batch", "2",
                  "--min-size", "128", "--max-size", "160"])
    for name in example.PRESETS:
        picture = np.asarray(Image.open(out / f"{name}.png"))
        assert picture.ndim == 3 and picture.shape[0] >= 64 and picture.shape[1] >= 2 * 64, (name, picture.shape)
