"""torchvision's ``maskrcnn_resnet50_fpn_v2`` weights in keras_maskrcnn: the layout read off the keys,
the key mapping (batch norms in the FPN and the heads, the two-conv RPN head, the conv + FC box
head), errors, fine-tuning, files, and parity with torchvision.

The first tests need no PyTorch: a synthetic state dict with v2's key names and shapes for a tiny
ResNet-18 model. The parity tests run torchvision's ``maskrcnn_resnet50_fpn_v2`` in the reference
environment (``tests/tvref.py``) and apply the checks of ``tests/test_convert.py``'s v1 parity tests
to the converted model; they are skipped where that environment or the photos are absent.
"""
import keras
import numpy as np
import pytest
import test_convert as v1
import tvref

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.convert import convert_checkpoint, from_torchvision, infer_architecture, load_torchvision_maskrcnn
from keras_maskrcnn.convert_v2 import V1_NAME, V2_NAME, layout_name
from keras_maskrcnn.presets import torchvision_maskrcnn_resnet50_fpn_v2_config

C, R, K, A, S = v1.C, v1.R, v1.K, v1.A, v1.S
TINY = v1.TINY
V2_LAYOUT = dict(fpn_norm="batch_norm", head_norm="batch_norm", rpn_conv_depth=2, box_head_convs=4, box_head_fcs=1)
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def v2_state_dict(seed=0):
    """v2's keys and PyTorch shapes for a ResNet-18 FPN Mask R-CNN, as a current ``state_dict()``:
    ``BatchNorm2d`` everywhere (with ``num_batches_tracked``), statistics random, not 0 / 1."""
    rng = np.random.default_rng(seed)
    state = v1.resnet18_state_dict(rng)
    for key in [k for k in state if k.endswith(".running_var")]:
        state[key.replace("running_var", "num_batches_tracked")] = np.array(100)

    def conv(path, cout, cin, k, bias=False):
        state[f"{path}.weight"] = rng.normal(0.0, 0.1, (cout, cin, k, k)).astype("float32")
        if bias:
            state[f"{path}.bias"] = rng.normal(0.0, 0.1, cout).astype("float32")

    def bn(path, n):
        state[f"{path}.weight"] = rng.uniform(0.5, 1.5, n).astype("float32")
        state[f"{path}.bias"] = rng.normal(0.0, 0.5, n).astype("float32")
        state[f"{path}.running_mean"] = rng.normal(0.0, 0.5, n).astype("float32")
        state[f"{path}.running_var"] = rng.uniform(0.5, 2.0, n).astype("float32")
        state[f"{path}.num_batches_tracked"] = np.array(100)

    for i, cin in enumerate((64, 128, 256, 512)):
        conv(f"backbone.fpn.inner_blocks.{i}.0", C, cin, 1)
        bn(f"backbone.fpn.inner_blocks.{i}.1", C)
        conv(f"backbone.fpn.layer_blocks.{i}.0", C, C, 3)
        bn(f"backbone.fpn.layer_blocks.{i}.1", C)
    conv("rpn.head.conv.0.0", C, C, 3, bias=True)
    conv("rpn.head.conv.1.0", C, C, 3, bias=True)
    conv("rpn.head.cls_logits", A, C, 1, bias=True)
    conv("rpn.head.bbox_pred", 4 * A, C, 1, bias=True)
    for i in range(4):
        conv(f"roi_heads.box_head.{i}.0", C, C, 3)
        bn(f"roi_heads.box_head.{i}.1", C)
        conv(f"roi_heads.mask_head.{i}.0", C, C, 3)
        bn(f"roi_heads.mask_head.{i}.1", C)
    state["roi_heads.box_head.5.weight"] = rng.normal(0.0, 0.1, (R, C * S * S)).astype("float32")
    state["roi_heads.box_head.5.bias"] = rng.normal(0.0, 0.1, R).astype("float32")
    for name, out in (("cls_score", K), ("bbox_pred", 4 * K)):
        state[f"roi_heads.box_predictor.{name}.weight"] = rng.normal(0.0, 0.1, (out, R)).astype("float32")
        state[f"roi_heads.box_predictor.{name}.bias"] = rng.normal(0.0, 0.1, out).astype("float32")
    state["roi_heads.mask_predictor.conv5_mask.weight"] = rng.normal(0.0, 0.1, (C, C, 2, 2)).astype("float32")
    state["roi_heads.mask_predictor.conv5_mask.bias"] = rng.normal(0.0, 0.1, C).astype("float32")
    conv("roi_heads.mask_predictor.mask_fcn_logits", K, C, 1, bias=True)
    return state


@pytest.fixture(scope="module")
def state():
    return v2_state_dict()


@pytest.fixture(scope="module")
def loaded(state):
    return from_torchvision(state, **TINY)


def assert_bn(layer, state, path):
    for field, variable in zip(BN_FIELDS, (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)):
        np.testing.assert_array_equal(variable.numpy(), state[f"{path}.{field}"], err_msg=f"{path}.{field}")


def kernel(state, key):
    return state[key].transpose(2, 3, 1, 0)


# ----------------------------------------------------------------------------------------------
def test_v2_layout_is_read_off_the_keys(state, capsys):
    config = infer_architecture(state)
    for key, value in V2_LAYOUT.items():
        assert config[key] == value == torchvision_maskrcnn_resnet50_fpn_v2_config()[key], key
    assert config["backbone"] == "resnet18" and config["fpn_channels"] == C and config["representation_size"] == R
    # torchvision's eval-mode BatchNorm2d in the backbone is FrozenBatchNorm2d's affine map.
    assert config["backbone_norm"] == "frozen_bn" and config["mask_head_convs"] == 4
    assert layout_name(config) == V2_NAME
    assert layout_name(infer_architecture(v1.synthetic_state_dict())) == V1_NAME
    from_torchvision(state, **TINY)
    assert f"found the v2 layout (torchvision's {V2_NAME})" in capsys.readouterr().out
    from_torchvision(v1.synthetic_state_dict(), **TINY)
    assert f"found the v1 layout (torchvision's {V1_NAME})" in capsys.readouterr().out
    from_torchvision(state, verbose=False, **TINY)
    assert capsys.readouterr().out == ""


def test_v2_mapping_of_every_layer(state, loaded):
    model = loaded
    for key, value in V2_LAYOUT.items():
        assert model.get_config()[key] == value, key
    assert model.num_classes == K - 1 and model.fpn_channels == C and model.representation_size == R
    fpn = model.fpn
    for i in range(4):
        assert not fpn.lateral_convs[i].use_bias and not fpn.output_convs[i].use_bias
        np.testing.assert_array_equal(fpn.lateral_convs[i].kernel.numpy(), kernel(state, f"backbone.fpn.inner_blocks.{i}.0.weight"))
        np.testing.assert_array_equal(fpn.output_convs[i].kernel.numpy(), kernel(state, f"backbone.fpn.layer_blocks.{i}.0.weight"))
        assert isinstance(fpn.lateral_norms[i], keras.layers.BatchNormalization)
        assert_bn(fpn.lateral_norms[i], state, f"backbone.fpn.inner_blocks.{i}.1")
        assert_bn(fpn.output_norms[i], state, f"backbone.fpn.layer_blocks.{i}.1")
    rpn = model.rpn_head
    for i, conv in enumerate([rpn.conv] + rpn.extra_convs):
        np.testing.assert_array_equal(conv.kernel.numpy(), kernel(state, f"rpn.head.conv.{i}.0.weight"))
        np.testing.assert_array_equal(conv.bias.numpy(), state[f"rpn.head.conv.{i}.0.bias"])
    box, mask = model.box_head, model.mask_head
    for i in range(4):
        np.testing.assert_array_equal(box.convs[i].kernel.numpy(), kernel(state, f"roi_heads.box_head.{i}.0.weight"))
        assert_bn(box.conv_norms[i], state, f"roi_heads.box_head.{i}.1")
        np.testing.assert_array_equal(mask.convs[i].kernel.numpy(), kernel(state, f"roi_heads.mask_head.{i}.0.weight"))
        assert_bn(mask.norms[i], state, f"roi_heads.mask_head.{i}.1")
    assert box.fcs == [box.fc6]
    np.testing.assert_array_equal(box.fc6.bias.numpy(), state["roi_heads.box_head.5.bias"])
    np.testing.assert_array_equal(box.cls_score.kernel.numpy(), state["roi_heads.box_predictor.cls_score.weight"].T)
    np.testing.assert_array_equal(mask.logits.bias.numpy(), state["roi_heads.mask_predictor.mask_fcn_logits.bias"])
    assert_bn(model.backbone.bn1, state, "backbone.body.bn1")
    # box_head.5 sees torchvision's Flatten of C, H, W conv features; fc6 ours, flattened H, W, C.
    roi = np.random.default_rng(1).normal(size=(2, C, S, S)).astype("float32")
    w, b = state["roi_heads.box_head.5.weight"], state["roi_heads.box_head.5.bias"]
    expected = np.maximum(roi.reshape(2, -1) @ w.T + b, 0)
    got = box.fc6(roi.transpose(0, 2, 3, 1).reshape(2, -1)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_v2_backbone_as_trainable_batch_norm(state, loaded):
    """``backbone_norm="batch_norm"`` takes the same keys into Keras batch norms; same outputs in inference."""
    model = from_torchvision(state, backbone_norm="batch_norm", **TINY)
    assert isinstance(model.backbone.bn1, keras.layers.BatchNormalization)
    assert_bn(model.backbone.bn1, state, "backbone.body.bn1")
    images = np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype("float32")
    for ours, frozen in zip(model.backbone(images, training=False), loaded.backbone(images, training=False)):
        np.testing.assert_allclose(ours.numpy(), frozen.numpy(), rtol=1e-4, atol=1e-4 * np.abs(frozen.numpy()).max())


def test_v2_one_error_lists_every_problem(state, loaded):
    broken = dict(state)
    del broken["roi_heads.mask_head.2.1.running_var"]
    del broken["rpn.head.conv.1.0.bias"]
    broken["roi_heads.box_head.7.weight"] = np.zeros((R, R), "float32")  # a second FC: not this model's
    broken["backbone.fpn.layer_blocks.1.1.running_mean"] = np.zeros(C + 1, "float32")
    before = v1.weights_of(loaded)
    with pytest.raises(ValueError) as info:
        load_torchvision_maskrcnn(loaded, broken)
    message = str(info.value)
    assert "missing keys (2): rpn.head.conv.1.0.bias, roi_heads.mask_head.2.1.running_var" in message
    assert "unexpected keys (1): roi_heads.box_head.7.weight" in message
    assert "shape mismatches (1): backbone.fpn.layer_blocks.1.1.running_mean: shape (17,)" in message
    assert "num_batches_tracked" not in message
    after = v1.weights_of(loaded)  # all or nothing: not one variable written
    for path, value in before.items():
        np.testing.assert_array_equal(value, after[path], err_msg=path)
    # A v1 model cannot take v2 weights: every differing key is listed.
    v1_model = from_torchvision(v1.synthetic_state_dict(), **TINY)
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): .*backbone\.fpn\.inner_blocks\.0\.1\.weight"):
        load_torchvision_maskrcnn(v1_model, state)


def test_v2_fine_tuning_and_files(state, loaded, tmp_path):
    model = from_torchvision(state, num_classes=6, **TINY)
    assert tuple(model.box_head.cls_score.kernel.shape) == (R, 7)
    assert tuple(model.mask_head.logits.kernel.shape) == (1, 1, C, 7)
    predictors = (model.box_head.cls_score, model.box_head.bbox_pred, model.mask_head.logits)
    predictor_paths = {v.path.split("/", 1)[1] for layer in predictors for v in layer.weights}
    kept = v1.weights_of(loaded)
    for path, value in v1.weights_of(model).items():
        if path not in predictor_paths:
            np.testing.assert_array_equal(value, kept[path], err_msg=path)
    # The published file's names are current ones: the same keys from a file, then to .keras.
    np.savez(tmp_path / "v2.npz", **state)
    convert_checkpoint(tmp_path / "v2.npz", tmp_path / "v2.keras", **TINY)
    restored = keras.models.load_model(tmp_path / "v2.keras")
    assert isinstance(restored, MaskRCNN)
    assert {k: restored.get_config()[k] for k in V2_LAYOUT} == V2_LAYOUT
    other = v1.weights_of(restored)
    for path, value in kept.items():
        np.testing.assert_array_equal(value, other[path], err_msg=path)


# ----------------------------------------------------------------------------------------------
# Parity with torchvision's maskrcnn_resnet50_fpn_v2 on the same random weights (torch.manual_seed),
# made to behave like trained ones. Every BatchNorm2d (backbone, FPN, box and mask heads) gets a
# random affine map and running statistics measured on what reaches it in eval mode, then perturbed
# (means shifted by PERTURB std, variances scaled by 1 +- PERTURB): not 0 / 1, and not the test
# batch's own statistics. The ResNet's residual branches end in a small scale (bn3 gamma 0.1..0.5,
# as trained ResNets have): with gamma 0.5..1.5 there too the random ResNet-50 amplifies float32
# rounding chaotically (torchvision's own float32 and float64 C5 then differ by 6e-4 of its std,
# 6e-5 with this) and float32 noise alone moves scores by more than 1e-4. The RPN and predictor
# outputs are rescaled as for v1: scores decisive but not saturated.
PERTURB = 0.1
TV_V2_SCRIPT = v1.TV_FAST_ROI_ALIGN + v1.TV_RESCALE + r"""
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

torch.manual_seed(0)
names = sorted((k for k in inputs if k.startswith("image")), key=lambda k: int(k[5:]))
images = [torch.from_numpy(inputs[k]).permute(2, 0, 1).float() / 255 for k in names]
m = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=int(inputs["num_classes"]),
                             min_size=int(inputs["min_size"]), max_size=int(inputs["max_size"]),
                             rpn_pre_nms_top_n_test=int(inputs["pre_nms"]), rpn_post_nms_top_n_test=int(inputs["post_nms"]))
assert isinstance(m.backbone.body.bn1, torch.nn.BatchNorm2d) and isinstance(m.backbone.fpn.inner_blocks[0][1], torch.nn.BatchNorm2d)
norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
for mod in norms:
    mod.weight.data.uniform_(0.5, 1.5)
    mod.bias.data.normal_(0.0, 0.2)
    mod.reset_running_stats()
    mod.momentum = None  # running statistics = those of the one call in calibrate
for name, mod in m.backbone.body.named_modules():
    if name.endswith(".bn3"):  # residual branches scaled down, as in trained ResNets
        mod.weight.data.uniform_(0.1, 0.5)
m.eval()
perturb = float(inputs["perturb"])


def calibrate(module, *args):
    # Each batch norm of `module` measures what reaches it in one train-mode call, then is perturbed.
    module.train()
    module(*args)
    module.eval()
    for mod in module.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.add_(perturb * mod.running_var.sqrt() * torch.randn_like(mod.running_mean))
            mod.running_var.mul_(torch.empty_like(mod.running_var).uniform_(1 - perturb, 1 + perturb))


with torch.no_grad():
    batch, _ = m.transform(images)
    calibrate(m.backbone.body, batch.tensors)
    calibrate(m.backbone.fpn, m.backbone.body(batch.tensors))
    features = m.backbone(batch.tensors)

    rescale_rpn_head(m.rpn.head, features)  # v2's head.conv: two Conv2d + ReLU
    proposals, _ = m.rpn(batch, features)
    roi_heads = m.roi_heads
    pooled = roi_heads.box_roi_pool(features, proposals, batch.image_sizes)
    calibrate(roi_heads.box_head, pooled)
    x = roi_heads.box_head(pooled)
    rescale_box_predictor(roi_heads.box_predictor, x, float(inputs["cls_std"]))
    # The mask head's statistics on the RoIs it sees at inference: the detections.
    detected, _ = roi_heads(features, proposals, batch.image_sizes)
    calibrate(roi_heads.mask_head, roi_heads.mask_roi_pool(features, [d["boxes"] for d in detected], batch.image_sizes))
    captured = []
    hook = roi_heads.mask_predictor.mask_fcn_logits.register_forward_hook(lambda mod, i, o: captured.append(o))
    roi_heads(features, proposals, batch.image_sizes)
    hook.remove()
    rescale(roi_heads.mask_predictor.mask_fcn_logits, captured[0], 4.0)
    variances = torch.cat([n.running_var for n in norms])
    outputs["running_var_range"] = torch.stack([variances.min(), variances.max()])
""" + v1.TV_COMPARED


@pytest.fixture(scope="module")
def parity():
    if not (tvref.DATASETS / "fruits_nuts" / "images" / "0.jpg").exists():
        pytest.skip("fruits_nuts images absent")
    images = v1.parity_images()
    reference = tvref.run(
        TV_V2_SCRIPT,
        num_classes=np.array(v1.NUM_CLASSES),
        min_size=np.array(v1.SETTINGS["min_size"]),
        max_size=np.array(v1.SETTINGS["max_size"]),
        pre_nms=np.array(v1.SETTINGS["rpn_pre_nms_top_n_test"]),
        post_nms=np.array(v1.SETTINGS["rpn_post_nms_top_n_test"]),
        cls_std=np.array(1.0),
        perturb=np.array(PERTURB),
        **{f"image{i}": image for i, image in enumerate(images)},
    )
    state = {k[3:]: v for k, v in reference.items() if k.startswith("sd.")}
    assert "backbone.fpn.layer_blocks.0.1.running_var" in state and "roi_heads.box_head.5.weight" in state
    model = from_torchvision(state, **v1.SETTINGS)
    assert {k: model.get_config()[k] for k in V2_LAYOUT} == V2_LAYOUT
    return images, reference, model


@tvref.requires_torchvision
def test_v2_statistics_are_not_trivial(parity):
    _, reference, model = parity
    low, high = reference["running_var_range"]
    assert low > 0 and high != 1.0
    norm = model.mask_head.norms[0]
    assert not np.allclose(norm.moving_mean.numpy(), 0) and not np.allclose(norm.moving_variance.numpy(), 1)


@tvref.requires_torchvision
def test_v2_predict_images_matches_torchvision(parity):
    """``predict_images`` against torchvision's ``model(list)``: v1's checks (same detections in the
    same order, boxes within 0.05 px, scores within 1e-4, pasted mask pixels differing only within 5e-3 of the threshold)."""
    v1.test_predict_images_matches_torchvision(parity)


@tvref.requires_torchvision
def test_v2_model_matches_torchvision_on_its_batch(parity):
    """On torchvision's resized, padded batch; 28 x 28 mask probabilities within 5e-3."""
    v1.test_model_matches_torchvision_on_its_batch(parity)


@tvref.requires_torchvision
def test_v2_rpn_proposals_match_torchvision(parity):
    """The two-conv RPN head's proposals, from torchvision's features and from our own."""
    v1.test_rpn_proposals_match_torchvision(parity)
