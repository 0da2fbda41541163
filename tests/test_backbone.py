import keras
import numpy as np
import pytest
import tvref

from keras_maskrcnn.convert import load_torchvision_resnet
from keras_maskrcnn.layers.backbone import (
    FrozenBatchNormalization,
    ResNet,
    backbone_channels,
    build_backbone,
)

TINY = dict(blocks_per_stage=(1, 1, 1, 1))  # one block per stage: same structure, fast
CHANNELS = (256, 512, 1024, 2048)
BASIC_CHANNELS = (64, 128, 256, 512)


def ceil_div(n, d):
    return -(-n // d)


def randomize_weights(layer, seed=0):
    """Non-trivial weights everywhere, BN variances positive, so outputs depend on every weight."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        if v.path.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype("float32"))
        elif v.path.endswith("gamma"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        elif len(v.shape) == 1:
            v.assign(rng.normal(0.0, 0.1, v.shape).astype("float32"))
        else:
            v.assign(v.numpy() * rng.uniform(0.8, 1.2, v.shape).astype("float32"))


def torch_state_dict_like(backbone):
    """A synthetic torchvision-layout state dict (numpy) for a Keras ResNet, with its expected variables."""
    rng = np.random.default_rng(0)
    state = {}
    for path, layer in backbone.named_layers().items():
        if isinstance(layer, FrozenBatchNormalization):
            for key in ("weight", "bias", "running_mean"):
                state[f"{path}.{key}"] = rng.normal(size=layer.gamma.shape).astype("float32")
            state[f"{path}.running_var"] = rng.uniform(0.5, 2.0, layer.gamma.shape).astype("float32")
            state[f"{path}.num_batches_tracked"] = np.array(0)
        else:
            kh, kw, cin, cout = layer.kernel.shape
            state[f"{path}.weight"] = rng.normal(size=(cout, cin, kh, kw)).astype("float32")
    state["fc.weight"] = np.zeros((10, 2048), "float32")
    state["fc.bias"] = np.zeros((10,), "float32")
    return state


@pytest.fixture(scope="module")
def resnet50():
    backbone = build_backbone("resnet50")
    backbone.build((None, None, None, 3))
    return backbone


@pytest.mark.parametrize("height, width", [(64, 64), (65, 97)])
def test_resnet50_feature_shapes(resnet50, height, width):
    features = resnet50(np.zeros((2, height, width, 3), "float32"))
    assert len(features) == 4
    for feature, stride, channels in zip(features, resnet50.feature_strides, CHANNELS):
        # torchvision: every strided op maps n to floor((n - 1) / 2) + 1 = ceil(n / 2).
        assert tuple(feature.shape) == (2, ceil_div(height, stride), ceil_div(width, stride), channels)
    assert resnet50.compute_output_shape((2, height, width, 3)) == [tuple(f.shape) for f in features]
    assert backbone_channels(resnet50) == CHANNELS


def test_resnet50_symbolic_unknown_shapes(resnet50):
    outputs = resnet50(keras.Input((None, None, 3)))
    assert [tuple(o.shape) for o in outputs] == [(None, None, None, c) for c in CHANNELS]


def test_resnet50_weight_count(resnet50):
    # torchvision resnet50 without fc: 23,508,032 parameters (conv + BN affine) + BN running stats.
    bns = [l for l in resnet50.named_layers().values() if isinstance(l, FrozenBatchNormalization)]
    bn_channels = sum(bn.gamma.shape[0] for bn in bns)
    total = sum(int(np.prod(w.shape)) for w in resnet50.weights)
    assert total - 2 * bn_channels == 23_508_032


@pytest.fixture(scope="module")
def resnet18():
    backbone = build_backbone("resnet18")
    backbone.build((None, None, None, 3))
    return backbone


@pytest.mark.parametrize("height, width", [(64, 64), (65, 97)])
def test_resnet18_feature_shapes(resnet18, height, width):
    assert resnet18.name == "resnet18" and resnet18.out_channels == BASIC_CHANNELS
    features = resnet18(np.zeros((2, height, width, 3), "float32"))
    assert len(features) == 4
    for feature, stride, channels in zip(features, resnet18.feature_strides, BASIC_CHANNELS):
        assert tuple(feature.shape) == (2, ceil_div(height, stride), ceil_div(width, stride), channels)
    assert resnet18.compute_output_shape((2, height, width, 3)) == [tuple(f.shape) for f in features]
    assert backbone_channels(resnet18) == BASIC_CHANNELS
    outputs = resnet18(keras.Input((None, None, 3)))
    assert [tuple(o.shape) for o in outputs] == [(None, None, None, c) for c in BASIC_CHANNELS]


def test_resnet18_layer_names(resnet18):
    layers = resnet18.named_layers()
    # torchvision's BasicBlock: conv1/bn1/conv2/bn2, no conv3; layer1.0 keeps 64 channels at stride 1,
    # so it has no downsample, while layer2..4 start with one.
    assert "layer1.0.conv3" not in layers and "layer1.0.downsample.0" not in layers
    assert [p for p in layers if p.startswith("layer2.0.")] == [
        f"layer2.0.{n}" for n in ("conv1", "bn1", "conv2", "bn2", "downsample.0", "downsample.1")
    ]
    assert all(layer.name == path.replace(".", "_") for path, layer in layers.items())
    conv1 = layers["layer2.0.conv1"]
    assert conv1.kernel_size == (3, 3) and conv1.strides == (2, 2)
    assert layers["layer2.0.conv2"].strides == (1, 1)
    assert layers["layer2.0.downsample.0"].kernel_size == (1, 1)


@pytest.mark.parametrize("name, expected", [("resnet18", 11_176_512), ("resnet34", 21_284_672)])
def test_basic_resnet_weight_count(name, expected):
    # torchvision resnet18 / resnet34 without fc (512 * 1000 + 1000): conv + BN affine parameters.
    backbone = build_backbone(name)
    backbone.build((None, None, None, 3))
    assert backbone.out_channels == BASIC_CHANNELS
    assert len([p for p in backbone.named_layers() if p.endswith(".conv1")]) == sum(backbone.blocks_per_stage)
    bns = [l for l in backbone.named_layers().values() if isinstance(l, FrozenBatchNormalization)]
    bn_channels = sum(bn.gamma.shape[0] for bn in bns)
    total = sum(int(np.prod(w.shape)) for w in backbone.weights)
    assert total - 2 * bn_channels == expected


def _basic_resnet_weights(stage_channels, blocks_per_stage):
    """Conv weights of a BasicBlock ResNet from its definition (7x7 stem of 64; per block two 3x3
    convs, and a 1x1 downsample where the stride or the width changes)."""
    total, in_channels = 3 * 64 * 49, 64
    for stage, (planes, blocks) in enumerate(zip(stage_channels, blocks_per_stage)):
        for i in range(blocks):
            total += 9 * in_channels * planes + 9 * planes * planes
            if i == 0 and (stage > 0 or in_channels != planes):
                total += in_channels * planes
            in_channels = planes
    return total


@pytest.mark.parametrize("stage_channels", [(64, 128, 256, 512), (64, 128, 256, 256), (32, 48, 96, 80)])
def test_stage_channels_set_each_stages_width(stage_channels):
    backbone = build_backbone("resnet18", stage_channels=stage_channels)
    backbone.build((None, None, None, 3))
    assert backbone.out_channels == tuple(stage_channels) == backbone_channels(backbone)
    convs = sum(int(np.prod(l.kernel.shape)) for l in backbone.named_layers().values() if hasattr(l, "kernel"))
    assert convs == _basic_resnet_weights(stage_channels, (2, 2, 2, 2))
    features = backbone(np.zeros((1, 64, 64, 3), "float32"))
    assert [f.shape[-1] for f in features] == list(stage_channels)
    if stage_channels == (64, 128, 256, 512):
        assert _basic_resnet_weights(stage_channels, (2, 2, 2, 2)) == 11_176_512 - 2 * 4800  # BN affine apart


def test_stage_channels_are_checked():
    with pytest.raises(ValueError, match="stage_channels"):
        ResNet(depth=18, stage_channels=(64, 128, 256))
    with pytest.raises(ValueError, match="stage_channels"):
        ResNet(depth=18, stage_channels=(64, 128, 0, 256))
    images = keras.Input((None, None, 3))
    user = keras.Model(images, ResNet(depth=18, **TINY)(images))
    with pytest.raises(ValueError, match="named backbones only"):
        build_backbone(user, stage_channels=(64, 128, 256, 256))


def test_basic_resnet_rejects_groups():
    with pytest.raises(ValueError, match="BasicBlock"):
        ResNet(depth=18, groups=32, width_per_group=8)
    with pytest.raises(ValueError, match="`depth` must be one of"):
        ResNet(depth=26, blocks_per_stage=(1, 1, 1, 1))


@pytest.mark.parametrize("depth", [50, 18])
@pytest.mark.parametrize("trainable_layers", range(6))
def test_trainable_layers(trainable_layers, depth):
    backbone = ResNet(depth=depth, trainable_layers=trainable_layers, **TINY)
    backbone.build((None, None, None, 3))
    expected_stages = set(("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable_layers])
    trainable_ids = {id(v) for v in backbone.trainable_weights}
    expected = [
        layer.kernel
        for path, layer in backbone.named_layers().items()
        if path.split(".")[0] in expected_stages and isinstance(layer, keras.layers.Conv2D)
    ]
    assert trainable_ids == {id(v) for v in expected}
    # Frozen BN never trains, whatever the setting.
    for layer in backbone.named_layers().values():
        if isinstance(layer, FrozenBatchNormalization):
            assert not any(id(v) in trainable_ids for v in layer.weights)


def test_trainable_layers_out_of_range():
    with pytest.raises(ValueError, match="trainable_layers"):
        ResNet(trainable_layers=6)


def test_frozen_batch_norm_matches_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 7, 8)).astype("float32")
    gamma, beta, mean = (rng.normal(size=8).astype("float32") for _ in range(3))
    var = rng.uniform(0.1, 2.0, 8).astype("float32")
    bn = FrozenBatchNormalization(epsilon=1e-5)
    bn.build(x.shape)
    bn.set_weights([gamma, beta, mean, var])
    assert not bn.trainable_weights
    scale = gamma / np.sqrt(var + 1e-5)
    expected = x * scale + (beta - mean * scale)
    np.testing.assert_allclose(bn(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_frozen_batch_norm_config_round_trip():
    bn = FrozenBatchNormalization(epsilon=1e-3, name="bn")
    clone = FrozenBatchNormalization.from_config(bn.get_config())
    assert clone.epsilon == 1e-3 and clone.name == "bn"


@pytest.mark.parametrize(
    "kwargs",
    [dict(groups=4, width_per_group=16), dict(depth=18), dict(depth=18, stage_channels=(8, 16, 24, 12))],
    ids=["resnext", "basic", "narrow"],
)
def test_resnet_config_round_trip(kwargs):
    backbone = ResNet(**kwargs, trainable_layers=2, **TINY)
    x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype("float32")
    backbone.build(x.shape)
    randomize_weights(backbone)
    config = backbone.get_config()
    clone = ResNet.from_config(config)
    clone.build(x.shape)
    clone.set_weights(backbone.get_weights())
    assert clone.get_config() == config
    assert clone.out_channels == backbone.out_channels
    assert len(clone.trainable_weights) == len(backbone.trainable_weights)
    for a, b in zip(backbone(x), clone(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("depth", [50, 18])
def test_model_with_resnet_saves_and_loads(tmp_path, depth):
    images = keras.Input((None, None, 3))
    model = keras.Model(images, ResNet(depth=depth, **TINY, name="backbone")(images))
    randomize_weights(model)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype("float32")
    for a, b in zip(model(x), loaded(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mixed_bfloat16():
    x = np.random.default_rng(3).normal(size=(1, 64, 64, 3)).astype("float32")
    reference = ResNet(**TINY)
    reference.build(x.shape)
    randomize_weights(reference)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        backbone = ResNet(**TINY)
        backbone.build(x.shape)
    finally:
        keras.config.set_dtype_policy("float32")
    backbone.set_weights(reference.get_weights())
    assert all(v.dtype == "float32" for v in backbone.weights)
    for low, high in zip(backbone(x), reference(x)):
        assert low.dtype == "bfloat16"
        low = low.numpy().astype("float32")
        high = high.numpy()
        error = np.abs(low - high).max() / np.abs(high).max()
        print(f"mixed_bfloat16 vs float32: max abs error / max |output| = {error:.1e}")
        assert error <= 0.05


def _pyramid_model(num_outputs):
    images = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=4, padding="same")(images)
    outputs = [x]
    for _ in range(num_outputs - 1):
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
        outputs.append(x)
    return keras.Model(images, outputs)


class _Subclassed(keras.Model):
    def __init__(self, num_outputs):
        super().__init__()
        self.convs = [keras.layers.Conv2D(4, 3, strides=2, padding="same") for _ in range(num_outputs)]

    def call(self, images):
        outputs = []
        x = images
        for conv in self.convs:
            x = conv(x)
            outputs.append(x)
        return outputs


def test_user_backbone_passes_through():
    model = _pyramid_model(4)
    assert build_backbone(model) is model
    assert backbone_channels(model) == (8, 8, 8, 8)
    subclassed = _Subclassed(4)
    assert build_backbone(subclassed) is subclassed
    assert backbone_channels(subclassed) == (4, 4, 4, 4)


@pytest.mark.parametrize("model", [_pyramid_model(3), _Subclassed(5)], ids=["functional", "subclassed"])
def test_user_backbone_wrong_outputs(model):
    with pytest.raises(ValueError, match=r"`backbone` must return 4 feature maps"):
        build_backbone(model)


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="`backbone` must be one of"):
        build_backbone("resnet200")


def test_converter_synthetic_state_dict():
    backbone = ResNet(groups=2, width_per_group=32, **TINY)
    backbone.build((None, None, None, 3))
    state = torch_state_dict_like(backbone)
    load_torchvision_resnet(backbone, state)
    layers = backbone.named_layers()
    np.testing.assert_array_equal(
        layers["layer2.0.conv2"].kernel.numpy(), state["layer2.0.conv2.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        layers["layer3.0.downsample.1"].moving_variance.numpy(), state["layer3.0.downsample.1.running_var"]
    )

    broken = {f"backbone.body.{k}": v for k, v in state.items()}
    broken["backbone.fpn.inner_blocks.0.weight"] = np.zeros(3)  # outside the prefix: not ours
    del broken["backbone.body.layer1.0.bn2.running_mean"]
    broken["backbone.body.layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), "float32")
    broken["backbone.body.conv1.weight"] = np.zeros((64, 3, 3, 3), "float32")
    broken["backbone.body.bn1.weight"] = broken["backbone.body.bn1.weight"] + 1
    before = backbone.get_weights()
    with pytest.raises(ValueError) as info:
        load_torchvision_resnet(backbone, broken, prefix="backbone.body.")
    message = str(info.value)
    assert "missing keys (1): backbone.body.layer1.0.bn2.running_mean" in message
    assert "unexpected keys (1): backbone.body.layer5.0.conv1.weight" in message
    assert "shape mismatches (1): backbone.body.conv1.weight: shape (64, 3, 3, 3)" in message
    assert "(7, 7, 3, 64)" in message
    # All or nothing: the valid bn1 weight was not written either.
    for a, b in zip(before, backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


TORCHVISION_SCRIPT = """
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d
torch.manual_seed(0)
spec = {spec}
if spec == "resnet50":
    model = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
elif spec == "resnet18":
    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
else:
    model = ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=8, norm_layer=FrozenBatchNorm2d)
model.eval()
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n) + 0.5)
            m.bias.copy_(0.1 * torch.randn(n))
            m.running_mean.copy_(0.1 * torch.randn(n))
            m.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
    x = torch.from_numpy(inputs["x"])
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for i in range(1, 5):
        x = getattr(model, f"layer{{i}}")(x)
        outputs[f"c{{i + 1}}"] = x
for k, v in model.state_dict().items():
    outputs["sd." + k] = v
"""

# Max abs error relative to the output's max magnitude; float32 gives ~1e-6, 1e-4 leaves margin.
PARITY_RTOL = 1e-4


def _check_parity(spec, backbone, shape, prefix=""):
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    ref = tvref.run(TORCHVISION_SCRIPT.format(spec=repr(spec)), x=x)
    state = {prefix + k[3:]: v for k, v in ref.items() if k.startswith("sd.")}
    assert "fc.weight" in {k[len(prefix):] for k in state}  # the converter must skip it
    load_torchvision_resnet(backbone, state, prefix=prefix)
    features = backbone(x.transpose(0, 2, 3, 1))
    errors = []
    for i, feature in enumerate(features):
        expected = ref[f"c{i + 2}"].transpose(0, 2, 3, 1)
        assert feature.shape == expected.shape
        scale = np.abs(expected).max()
        error = np.abs(feature.numpy() - expected).max() / scale
        errors.append(error)
        assert error < PARITY_RTOL, (i, error, scale)
    print(f"{spec}: max abs error / max |output| per level: {['%.1e' % e for e in errors]}")


@tvref.requires_torchvision
def test_parity_torchvision_resnet50():
    _check_parity("resnet50", build_backbone("resnet50"), (2, 3, 67, 93))


@tvref.requires_torchvision
def test_parity_torchvision_resnext_32x8d():
    # ResNeXt-101 32x8d blocks, one per stage; the state dict sits under a Mask R-CNN-style prefix.
    backbone = ResNet(groups=32, width_per_group=8, **TINY)
    _check_parity("resnext_tiny", backbone, (1, 3, 61, 77), prefix="backbone.body.")


@tvref.requires_torchvision
def test_parity_torchvision_resnet18():
    _check_parity("resnet18", build_backbone("resnet18"), (2, 3, 67, 93))
