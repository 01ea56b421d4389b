"""The model zoo without torch: registry, structure, conversion rules, state-dict files,
evaluation transform. Parity with torchvision itself is in test_models_parity.py."""

from __future__ import annotations

import collections
import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from affjax import models
from affjax.models.convert import default_rule
from affjax.models.layers import adaptive_avg_pool
from affjax.models.registry import ModelSpec
from affjax.models.transforms import resized_shape
from affjax.signature import capture_layers

# Activation calls per model, counted from torchvision's architectures: AlexNet 5 conv + 2
# hidden Linear ReLUs; VGG one ReLU per conv + 2; ResNet the stem ReLU + 2 per basic block
# (18: 8 blocks, 34: 16) or 3 per bottleneck (50: 16 blocks, 101: 33, 152: 50).
EXPECTED_CALLS = {
    "alexnet": 7,
    "vgg11": 10, "vgg11_bn": 10, "vgg13": 12, "vgg13_bn": 12,
    "vgg16": 15, "vgg16_bn": 15, "vgg19": 18, "vgg19_bn": 18,
    "resnet18": 17, "resnet34": 33, "resnet50": 49, "resnet101": 100, "resnet152": 151,
    "wide_resnet50_2": 49, "wide_resnet101_2": 100,
    "resnext50_32x4d": 49, "resnext101_32x8d": 100, "resnext101_64x4d": 100,
    # DenseNet: stem + 2 per dense layer (121: 58 layers, 161: 78, 169: 82, 201: 98) + 3
    # transitions + the final functional ReLU (scored, docs/models.md).
    "densenet121": 121, "densenet161": 161, "densenet169": 169, "densenet201": 201,
    # MobileNetV2: stem + 1 (first block, no expansion) + 2 per other block (16) + last conv.
    # V3: stem, per block expand (if wider) + depthwise + 2 in squeeze-excitation, last conv,
    # the classifier's Hardswish (small: 11 blocks, large: 15).
    "mobilenet_v2": 35, "mobilenet_v3_small": 42, "mobilenet_v3_large": 48,
    # SqueezeNet: stem + 3 per Fire module (8) + the ReLU on the class maps.
    "squeezenet1_0": 26, "squeezenet1_1": 26,
    # ShuffleNet V2: conv1 + 3 per strided unit (3) + 2 per other unit (3 + 7 + 3) + conv5.
    "shufflenet_v2_x0_5": 37, "shufflenet_v2_x1_0": 37, "shufflenet_v2_x1_5": 37,
    "shufflenet_v2_x2_0": 37,
    # MNASNet: 2 in the stem + 2 per inverted residual (3 + 3 + 3 + 2 + 4 + 1) + layers.16.
    "mnasnet0_5": 35, "mnasnet0_75": 35, "mnasnet1_0": 35, "mnasnet1_3": 35,
    # ViT: one MLP GELU per encoder layer (B: 12, L: 24, H: 32).
    "vit_b_16": 12, "vit_b_32": 12, "vit_l_16": 24, "vit_l_32": 24, "vit_h_14": 32,
    # ConvNeXt: one block-MLP GELU per CNBlock (T: 3 + 3 + 9 + 3, others 3 + 3 + 27 + 3).
    "convnext_tiny": 18, "convnext_small": 36, "convnext_base": 36, "convnext_large": 36,
    # Swin V1/V2: one MLP GELU per block (T: 2 + 2 + 6 + 2, S/B: 2 + 2 + 18 + 2); V2's
    # position-bias ReLU is input-independent and not a layer (docs/models.md).
    "swin_t": 12, "swin_s": 24, "swin_b": 24, "swin_v2_t": 12, "swin_v2_s": 24, "swin_v2_b": 24,
    # MaxViT-T: stem GELU + 11 layers x (MBConv 2 GELU + SE SiLU, Sigmoid + 2 MLP GELU) + Tanh.
    "maxvit_t": 68,
    # EfficientNet: stem + last conv SiLU; per MBConv block expansion SiLU (not when the ratio
    # is 1, B0-B7's first stage), depthwise SiLU, SE SiLU, SE Sigmoid; per FusedMBConv one
    # SiLU. Blocks per stage ceil(n * depth_mult) of (1, 2, 2, 3, 3, 4, 1) for B0-B7.
    "efficientnet_b0": 65, "efficientnet_b1": 92, "efficientnet_b2": 92,
    "efficientnet_b3": 104, "efficientnet_b4": 128, "efficientnet_b5": 155,
    "efficientnet_b6": 179, "efficientnet_b7": 218,
    "efficientnet_v2_s": 132, "efficientnet_v2_m": 191, "efficientnet_v2_l": 264,
    # RegNet: stem ReLU + per block f.a, f.b and the post-residual ReLU (X: 3) plus the SE
    # ReLU and Sigmoid (Y: 5); blocks = torchvision's `depth` parameter.
    "regnet_x_400mf": 1 + 3 * 22, "regnet_x_800mf": 1 + 3 * 16, "regnet_x_1_6gf": 1 + 3 * 18,
    "regnet_x_3_2gf": 1 + 3 * 25, "regnet_x_8gf": 1 + 3 * 23, "regnet_x_16gf": 1 + 3 * 22,
    "regnet_x_32gf": 1 + 3 * 23,
    "regnet_y_400mf": 1 + 5 * 16, "regnet_y_800mf": 1 + 5 * 14, "regnet_y_1_6gf": 1 + 5 * 27,
    "regnet_y_3_2gf": 1 + 5 * 21, "regnet_y_8gf": 1 + 5 * 17, "regnet_y_16gf": 1 + 5 * 18,
    "regnet_y_32gf": 1 + 5 * 20, "regnet_y_128gf": 1 + 5 * 27,
    # GoogLeNet: one (functional) ReLU per BasicConv2d: conv1-3 + 6 per inception block x 9.
    "googlenet": 3 + 6 * 9,
    # Inception v3: 5 stem BasicConv2d + 7 per InceptionA (x3) + 4 (B) + 10 per C (x4)
    # + 6 (D) + 9 per E (x2).
    "inception_v3": 5 + 7 * 3 + 4 + 10 * 4 + 6 + 9 * 2,
}
# Calls per activation kind where a model is not ReLU-only (counted with torch hooks on
# torchvision's modules: Hardswish -> hard_silu, Hardsigmoid -> hard_sigmoid).
EXPECTED_KINDS: dict[str, dict[str, int]] = {
    "mobilenet_v2": {"relu6": 35},
    "mobilenet_v3_small": {"hard_silu": 19, "relu": 14, "hard_sigmoid": 9},
    "mobilenet_v3_large": {"hard_silu": 21, "relu": 19, "hard_sigmoid": 8},
}
# Models without BatchNorm.
NO_BATCH_NORM = {"alexnet", "vgg11", "vgg13", "vgg16", "vgg19",
                 "squeezenet1_0", "squeezenet1_1",
                 # LayerNorm only
                 "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14",
                 "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
                 "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"}
# torchvision's default-weights transforms (IMAGENET1K_V2 where it exists: resize 232).
EXPECTED_RESIZE = {name: 256 for name in EXPECTED_CALLS} | {
    name: 232 for name in ("resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                           "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
                           "resnext101_64x4d")} | {
    name: 232 for name in ("mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_5",
                           "shufflenet_v2_x2_0", "mnasnet0_75", "mnasnet1_3")} | {
    "vit_l_16": 242, "vit_h_14": 518,
    "convnext_tiny": 236, "convnext_small": 230, "convnext_base": 232, "convnext_large": 232,
    "swin_t": 232, "swin_s": 246, "swin_b": 238, "swin_v2_t": 260, "swin_v2_s": 260,
    "swin_v2_b": 272, "maxvit_t": 224} | {
    "efficientnet_b0": 256, "efficientnet_b1": 255, "efficientnet_b2": 288,
    "efficientnet_b3": 320, "efficientnet_b4": 384, "efficientnet_b5": 456,
    "efficientnet_b6": 528, "efficientnet_b7": 600, "efficientnet_v2_s": 384,
    "efficientnet_v2_m": 480, "efficientnet_v2_l": 480} | {
    name: 232 for name in EXPECTED_CALLS if name.startswith("regnet")} | {"regnet_y_128gf": 384,
                                                                        "inception_v3": 342}
# Crop sizes other than 224 (vit_h_14's default weights are SWAG at 518).
EXPECTED_CROP = {
    "vit_h_14": 518, "swin_v2_t": 256, "swin_v2_s": 256, "swin_v2_b": 256,
    "efficientnet_b1": 240, "efficientnet_b2": 288, "efficientnet_b3": 300,
    "efficientnet_b4": 380, "efficientnet_b5": 456, "efficientnet_b6": 528,
    "efficientnet_b7": 600, "efficientnet_v2_s": 384, "efficientnet_v2_m": 480,
    "efficientnet_v2_l": 480, "regnet_y_128gf": 384, "inception_v3": 299}
# Activation kinds other than relu (the set; EXPECTED_KINDS above has counts where known).
EXPECTED_KIND = {name: {"gelu"} for name in (
    "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "convnext_tiny",
    "convnext_small", "convnext_base", "convnext_large", "swin_t", "swin_s", "swin_b",
    "swin_v2_t", "swin_v2_s", "swin_v2_b")} | {"maxvit_t": {"gelu", "silu", "sigmoid", "tanh"}} | {
    name: {"silu", "sigmoid"} for name in EXPECTED_CALLS if name.startswith("efficientnet")} | {
    name: {"relu", "sigmoid"} for name in EXPECTED_CALLS if name.startswith("regnet_y")}


def _abstract(name, num_classes=7, batch=2, **kw):
    """Activation calls, output shape and variable shapes, traced without computing."""
    spec = models.get_spec(name)
    module = spec.build(num_classes=num_classes, **kw)
    x = jax.ShapeDtypeStruct((batch, spec.min_size, spec.min_size, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    found = {}

    def run(v, x):
        found["layers"] = capture_layers(module, v, x)
        return module.apply(v, x)

    out = jax.eval_shape(run, variables, x)
    return found["layers"], out, variables


def test_list_models_equals_the_table_of_expected_counts():
    assert models.list_models() == sorted(EXPECTED_CALLS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CALLS))
def test_structure_calls_and_output_shape(name):
    layers, out, variables = _abstract(name)
    assert len(layers) == EXPECTED_CALLS[name]
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    kinds = collections.Counter(layer.kind for layer in layers)
    if name in EXPECTED_KINDS:
        assert kinds == EXPECTED_KINDS[name]
    else:
        assert set(kinds) == EXPECTED_KIND.get(name, {"relu"})
    assert ("batch_stats" in variables) == (name not in NO_BATCH_NORM)
    assert models.eval_transform(name).resize_size == EXPECTED_RESIZE[name]
    assert models.eval_transform(name).crop_size == EXPECTED_CROP.get(name, 224)


@pytest.fixture(scope="module")
def resnet18():
    return models.create("resnet18", num_classes=10)


def test_create_resnet18_values_seed_and_names(resnet18):
    module, variables = resnet18
    assert set(variables) == {"params", "batch_stats"}
    bn = variables["batch_stats"]["layer1.0"]["bn1"]
    np.testing.assert_array_equal(bn["mean"], 0.0)
    np.testing.assert_array_equal(bn["var"], 1.0)
    x = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
    logits = jax.jit(module.apply)(variables, x)
    assert logits.shape == (6, 10) and bool(jnp.all(jnp.isfinite(logits)))
    _, other = models.create("resnet18", num_classes=10, seed=1)
    k = ("params", "layer2.0", "conv2", "kernel")
    flat, flat_other = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(other)
    assert not np.allclose(flat[k], flat_other[k])
    # torchvision's kaiming_normal_(fan_out) init: std sqrt(2 / (3 * 3 * 128)).
    assert abs(float(jnp.std(flat[k])) - np.sqrt(2 / (9 * 128))) < 0.05 * np.sqrt(2 / (9 * 128))
    layers, _, _ = _abstract("resnet18")
    names = [layer.name for layer in layers]
    assert names[:6] == ["relu:0", "layer1.0/relu:0", "layer1.0/relu:1", "layer1.1/relu:0",
                         "layer1.1/relu:1", "layer2.0/relu:0"]
    assert names[-1] == "layer4.1/relu:1"


def test_train_mode_uses_batch_statistics_and_updates_them(resnet18):
    module, variables = resnet18
    x = 3.0 + jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    eval_out = jax.jit(module.apply)(variables, x)
    train_out, state = jax.jit(
        lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert not np.allclose(eval_out, train_out)
    mean = state["batch_stats"]["bn1"]["mean"]
    assert float(jnp.abs(mean).max()) > 0  # 0.1 of the batch mean, torch's momentum


def test_injected_activation_is_used_everywhere():
    layers, _, _ = _abstract("resnet18", activation=jax.nn.gelu)
    assert [layer.kind for layer in layers] == ["gelu"] * 17


def test_unknown_name_and_option():
    with pytest.raises(ValueError, match="unknown model 'resnet17'.*resnet18"):
        models.create("resnet17")
    with pytest.raises(ValueError, match="unknown model"):
        models.eval_transform("vit_b_8")  # not a torchvision name
    with pytest.raises(TypeError, match="resnet18: bad option.*activation"):
        models.create("resnet18", widht=2)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got True"):
        models.create("alexnet", num_classes=True)  # built a 1-class model before
    module, _ = models.create("alexnet", num_classes=np.int64(7))  # refused before
    assert module.num_classes == 7 and type(module.num_classes) is int


def test_kernel_rules_match_index_formulas():
    spec = ModelSpec(name="toy", family="toy", build=None, transform=None, head="fc",
                     flatten={"fc": (2, 3, 4)})
    rng = np.random.default_rng(0)
    # Conv: torch (O, I, kh, kw) -> Flax (kh, kw, I, O).
    rule = default_rule(spec, "params", ("block.0", "conv"), "kernel", (3, 2, 5, 6))
    assert rule.torch_key == "block.0.conv.weight" and rule.torch_shape == (6, 5, 3, 2)
    w = rng.standard_normal(rule.torch_shape)
    k = rule.to_flax(w)
    assert k[1, 0, 4, 2] == w[2, 4, 1, 0]
    np.testing.assert_array_equal(rule.to_torch(k), w)
    # Linear after flattening an (H, W, C) = (2, 3, 4) map: torch column c*H*W + h*W + w is
    # Flax row (h*W + w)*C + c.
    rule = default_rule(spec, "params", ("fc",), "kernel", (24, 5))
    w = rng.standard_normal(rule.torch_shape)
    k = rule.to_flax(w)
    for h in range(2):
        for x in range(3):
            for c in range(4):
                np.testing.assert_array_equal(k[(h * 3 + x) * 4 + c], w[:, c * 6 + h * 3 + x])
    np.testing.assert_array_equal(rule.to_torch(k), w)
    plain = default_rule(spec, "params", ("other",), "kernel", (24, 5))
    assert plain.torch_shape == (5, 24)
    np.testing.assert_array_equal(plain.to_flax(w), w.T)
    names = {(c, leaf): default_rule(spec, c, ("bn",), leaf, (4,)).torch_key
             for c, leaf in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"),
                             ("batch_stats", "var"), ("params", "class_token"))}
    assert names == {("params", "scale"): "bn.weight", ("params", "bias"): "bn.bias",
                     ("batch_stats", "mean"): "bn.running_mean",
                     ("batch_stats", "var"): "bn.running_var",
                     ("params", "class_token"): "bn.class_token"}


@pytest.fixture(scope="module")
def resnet18_state(resnet18):
    _, variables = resnet18
    return variables, models.to_torchvision("resnet18", variables)


def _assert_same(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


def test_state_dict_round_trip_and_torchvision_names(resnet18_state):
    variables, sd = resnet18_state
    # torchvision's resnet18 state dict: 122 tensors, 20 of them num_batches_tracked.
    assert len(sd) == 122 - 20
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer2.0.downsample.1.running_var"].shape == (128,)
    assert sd["fc.weight"].shape == (10, 512)
    sd = dict(sd, **{"bn1.num_batches_tracked": np.array(7)})  # accepted and ignored
    _, back = models.from_torchvision("resnet18", sd)
    _assert_same(back, variables)


def test_imported_variables_do_not_share_memory_with_the_source(resnet18_state):
    # jnp.asarray of a float32 array is zero-copy on CPU: changing the torch model (BatchNorm
    # statistics updated in place by training) or the arrays afterwards moved the variables.
    _, sd = resnet18_state
    sd = {k: np.array(v, copy=True) for k, v in sd.items()}
    _, variables = models.from_torchvision("resnet18", sd)
    before = np.array(variables["batch_stats"]["bn1"]["mean"], copy=True)
    bias = np.array(variables["params"]["fc"]["bias"], copy=True)
    sd["bn1.running_mean"] += 5.0
    sd["fc.bias"] += 3.0
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["bn1"]["mean"]), before)
    np.testing.assert_array_equal(np.asarray(variables["params"]["fc"]["bias"]), bias)


def test_num_classes_is_read_from_the_head(resnet18_state):
    _, sd = resnet18_state
    sd = dict(sd, **{"fc.weight": sd["fc.weight"][:3], "fc.bias": sd["fc.bias"][:3]})
    module, variables = models.from_torchvision("resnet18", sd)
    assert module.num_classes == 3
    assert variables["params"]["fc"]["kernel"].shape == (512, 3)


def test_bad_state_dicts_name_the_tensors(resnet18_state):
    _, sd = resnet18_state
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_mean"}
    with pytest.raises(ValueError, match=r"resnet18.*1 missing: layer3\.1\.bn2\.running_mean"):
        models.from_torchvision("resnet18", missing)
    extra = dict(sd, **{"layer5.0.conv1.weight": np.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"resnet18.*1 unexpected: layer5\.0\.conv1\.weight"):
        models.from_torchvision("resnet18", extra)
    wrong = dict(sd, **{"layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"wrongly shaped: layer1\.0\.conv2\.weight "
                                         r"\(64, 64, 1, 1\) \(expected \(64, 64, 3, 3\)\)"):
        models.from_torchvision("resnet18", wrong)
    many = {k: v for k, v in sd.items() if not k.startswith("layer4")}
    with pytest.raises(ValueError, match=r"missing: .* and \d+ more"):
        models.from_torchvision("resnet18", many)
    with pytest.raises(TypeError, match="mapping of arrays or a file path"):
        models.from_torchvision("resnet18", 3)


def test_safetensors_round_trip(tmp_path, resnet18_state):
    variables, sd = resnet18_state
    path = tmp_path / "resnet18.safetensors"
    models.save_safetensors(path, sd, metadata={"format": "pt"})
    loaded = models.load_safetensors(path)
    assert sorted(loaded) == sorted(sd)  # the writer orders tensors by dtype, then name
    for k in sd:
        np.testing.assert_array_equal(loaded[k], sd[k])
    _, back = models.from_torchvision("resnet18", str(path))
    _assert_same(back, variables)


def _handmade_safetensors(path, entries, pad=True):
    """A file written byte by byte from the format's description (not by our writer)."""
    header, blobs, offset = {"__metadata__": {"k": "v"}}, [], 0
    for name, (code, array) in entries.items():
        raw = array.tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_reader_on_a_handmade_file(tmp_path):
    f64 = np.arange(6, dtype="<f8").reshape(2, 3) / 7
    bf16 = np.array([1.0, -2.5, 3.0], dtype=jnp.bfloat16)
    i64 = np.array([5], dtype="<i8")
    path = tmp_path / "hand.safetensors"
    _handmade_safetensors(path, {"a.weight": ("F64", f64), "b": ("BF16", bf16),
                                 "c.num_batches_tracked": ("I64", i64)}, pad=False)
    loaded = models.load_safetensors(path)
    np.testing.assert_array_equal(loaded["a.weight"], f64)
    assert loaded["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["b"].astype(np.float32), [1.0, -2.5, 3.0])
    assert int(loaded["c.num_batches_tracked"][0]) == 5


def test_safetensors_writer_bfloat16_and_byte_layout(tmp_path):
    """bfloat16 JAX arrays and big-endian NumPy arrays are written as the format prescribes."""
    path = tmp_path / "w.safetensors"
    bf16 = jnp.array([1.0, -2.5, 3.0], jnp.bfloat16)
    big = np.arange(4, dtype=">f4")
    models.save_safetensors(path, {"b": bf16, "big": big}, metadata={"epoch": 3})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"epoch": "3"}
    assert header["b"]["dtype"] == "BF16" and header["big"]["dtype"] == "F32"
    begin, end = header["big"]["data_offsets"]
    body = raw[8 + n:]
    np.testing.assert_array_equal(np.frombuffer(body[begin:end], "<f4"), [0, 1, 2, 3])
    loaded = models.load_safetensors(path)
    np.testing.assert_array_equal(loaded["b"].astype(np.float32), [1.0, -2.5, 3.0])
    with pytest.raises(ValueError, match="tensor 'x': dtype complex128 has no safetensors code"):
        models.save_safetensors(path, {"x": np.zeros(2, np.complex128)})


def test_safetensors_reader_rejects_malformed_files(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="bad.safetensors: not a valid .safetensors file.*"
                                         "header too small"):
        models.load_safetensors(path)
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ValueError, match="invalid header length"):
        models.load_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{x}!")
    with pytest.raises(ValueError, match="invalid JSON"):
        models.load_safetensors(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match="invalid shape, data type, or offset"):
        models.load_safetensors(path)
    header = json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(ValueError, match="unknown variant `Q7`"):
        models.load_safetensors(path)
    # A dtype the format knows but NumPy cannot hold.
    header = json.dumps({"w": {"dtype": "F8_E8M0", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(ValueError, match="tensor 'w' has dtype F8_E8M0, which NumPy cannot hold"):
        models.load_safetensors(path)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        models.from_torchvision("resnet18", tmp_path / "nowhere.safetensors")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown state dict format"):
        models.from_torchvision("resnet18", other)


def _adaptive_pool_reference(x, out_h, out_w):
    n, h, w, c = x.shape
    out = np.zeros((n, out_h, out_w, c))
    for i in range(out_h):
        h0, h1 = int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))
        for j in range(out_w):
            w0, w1 = int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize(("size", "out"), [((5, 13), (3, 7)), ((2, 1), (6, 6)), ((7, 7), (7, 7)),
                                           ((9, 4), (1, 1)), ((10, 10), (7, 7))])
def test_adaptive_avg_pool_matches_torch_bins(size, out):
    x = np.random.default_rng(0).standard_normal((2, *size, 3))
    got = adaptive_avg_pool(jnp.asarray(x, jnp.float32), out)
    np.testing.assert_allclose(np.asarray(got), _adaptive_pool_reference(x, *out), atol=1e-6)


def test_resized_shape_follows_torchvision():
    assert resized_shape(300, 400, 256) == (256, 341)  # int(256 * 400 / 300) = 341
    assert resized_shape(400, 300, 256) == (341, 256)
    assert resized_shape(256, 999, 256) == (256, 999)
    assert resized_shape(100, 100, 232) == (232, 232)


def test_eval_transform_crop_and_normalise_without_resize():
    t = models.eval_transform("resnet18")
    img = np.random.default_rng(0).integers(0, 256, (256, 301, 3), dtype=np.uint8)
    out = np.asarray(t(img))
    # No resize (shorter side already 256); crop offsets round(16.0) = 16, round(38.5) = 38.
    ref = (img[16:240, 38:262] / 255.0 - np.array(t.mean)) / np.array(t.std)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-6)
    batch = np.asarray(t(np.stack([img, img[::-1]])))
    assert batch.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(batch[0], out, atol=1e-7)
    np.testing.assert_allclose(np.asarray(t(img.astype(np.float32) / 255)), out, atol=2e-6)


def test_eval_transform_bad_inputs():
    t = models.eval_transform("alexnet")
    with pytest.raises(ValueError, match=r"channels last.*\(2, 3, 64, 64\)"):
        t(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(TypeError, match="uint8.*int32"):
        t(np.zeros((64, 64, 3), np.int32))
    with pytest.raises(ValueError, match="interpolation"):
        models.EvalTransform(resize_size=256, crop_size=224, interpolation="lanczos")
    with pytest.raises(ValueError, match="crop_size <= resize_size"):
        models.EvalTransform(resize_size=200, crop_size=224)


def test_activation_names_follow_torchvision_sequential_indices():
    layers, _, _ = _abstract("alexnet")
    assert [layer.name for layer in layers] == [
        "features.1:0", "features.4:0", "features.7:0", "features.9:0", "features.11:0",
        "classifier.2:0", "classifier.5:0"]
    layers, _, _ = _abstract("vgg11_bn")
    assert [layer.name for layer in layers] == [
        "features.2:0", "features.6:0", "features.10:0", "features.13:0", "features.17:0",
        "features.20:0", "features.24:0", "features.27:0", "classifier.1:0", "classifier.4:0"]


def test_densenet_names_follow_torchvision_and_score_the_final_relu():
    layers, _, variables = _abstract("densenet121")
    names = [layer.name for layer in layers]
    assert names[:4] == ["features.relu0:0", "features.denseblock1.denselayer1/relu1:0",
                         "features.denseblock1.denselayer1/relu2:0",
                         "features.denseblock1.denselayer2/relu1:0"]
    assert names[13] == "features.transition1/relu:0"
    assert names[-2:] == ["features.denseblock4.denselayer16/relu2:0", "relu:0"]
    # The concatenation grows the input of each layer by growth_rate: 64 + 5 * 32 channels
    # into the 6th layer's norm1, 1024 into norm5.
    bs = variables["batch_stats"]
    assert bs["features.denseblock1.denselayer6"]["norm1"]["mean"].shape == (224,)
    assert bs["features.norm5"]["mean"].shape == (1024,)
    assert variables["params"]["classifier"]["kernel"].shape == (1024, 7)


def test_mobilenet_v3_squeeze_excitation_names_and_shapes():
    layers, _, variables = _abstract("mobilenet_v3_small")
    names = [(layer.name, layer.kind) for layer in layers]
    # features.1: depthwise (ReLU) then SE (ReLU, Hardsigmoid); no expansion (16 -> 16).
    assert names[:4] == [("features.0/2:0", "hard_silu"), ("features.1/block.0/2:0", "relu"),
                         ("features.1/block.1/activation:0", "relu"),
                         ("features.1/block.1/scale_activation:0", "hard_sigmoid")]
    assert names[-2:] == [("features.12/2:0", "hard_silu"), ("classifier.1:0", "hard_silu")]
    p = variables["params"]
    # SE squeeze width: make_divisible(16 // 4, 8) = 8; fc1 is a biased 1x1 conv.
    assert p["features.1"]["block.1"]["fc1"]["kernel"].shape == (1, 1, 16, 8)
    assert p["features.1"]["block.1"]["fc2"]["bias"].shape == (16,)
    assert p["classifier.0"]["kernel"].shape == (576, 1024)
    # MobileNetV3's BatchNorm2d(eps=0.001): all 34 (stem, 2 in features.1, 3 in each of the
    # other 10 blocks, last conv).
    module = models.get_spec("mobilenet_v3_small").build(num_classes=7)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

    def eps_1e3(v, x):
        return module.apply(v, x, mutable=["intermediates"], capture_intermediates=lambda m, _: (
            isinstance(m, nn.BatchNorm) and m.epsilon == 1e-3))[1]

    assert len(jax.tree_util.tree_leaves(jax.eval_shape(eps_1e3, variables, x))) == 34


def _max_pool_ceil_reference(x, k, s):
    n, h, w, c = x.shape
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):  # windows clipped at the bottom/right edge
            out[:, i, j] = x[:, i * s:i * s + k, j * s:j * s + k].max(axis=(1, 2))
    return out


@pytest.mark.parametrize("size", [(29, 29), (14, 13), (3, 4), (7, 8)])
def test_squeezenet_ceil_mode_max_pool(size):
    from affjax.models.squeezenet import max_pool_ceil

    x = np.random.default_rng(1).standard_normal((2, *size, 3))
    got = np.asarray(max_pool_ceil(jnp.asarray(x, jnp.float32), 3, 2))
    np.testing.assert_allclose(got, _max_pool_ceil_reference(x, 3, 2), rtol=1e-6)


def test_squeezenet_head_is_a_conv_and_num_classes_is_read_from_it():
    module, variables = models.create("squeezenet1_1", num_classes=5)
    sd = models.to_torchvision("squeezenet1_1", variables)
    assert sd["classifier.1.weight"].shape == (5, 512, 1, 1)
    module, _ = models.from_torchvision("squeezenet1_1", sd)
    assert module.num_classes == 5
    layers, _, _ = _abstract("squeezenet1_0")
    assert [layer.name for layer in layers][:4] == [
        "features.1:0", "features.3/squeeze_activation:0", "features.3/expand1x1_activation:0",
        "features.3/expand3x3_activation:0"]
    assert layers[-1].name == "classifier.2:0"


def test_shufflenet_channel_shuffle_is_torchs_index_order():
    from affjax.models.shufflenet import channel_shuffle

    c = 10
    x = np.broadcast_to(np.arange(c, dtype=np.float32), (1, 2, 3, c))
    got = np.asarray(channel_shuffle(jnp.asarray(x), 2))[0, 1, 2]
    # torch: view(b, 2, c / 2, h, w).transpose(1, 2): new channel j * 2 + i = old i * c / 2 + j.
    expected = [i * (c // 2) + j for j in range(c // 2) for i in range(2)]
    np.testing.assert_array_equal(got, expected)
    layers, _, _ = _abstract("shufflenet_v2_x0_5")
    assert [layer.name for layer in layers][:5] == [
        "conv1.2:0", "stage2.0/branch1.4:0", "stage2.0/branch2.2:0", "stage2.0/branch2.7:0",
        "stage2.1/branch2.2:0"]


@pytest.mark.parametrize(("name", "widths"), [("mnasnet0_5", (16, 8, 16, 24, 40, 48, 96, 160)),
                                              ("mnasnet1_3", (40, 24, 32, 56, 104, 128, 248,
                                                              416))])
def test_mnasnet_widths_follow_round_to_multiple_of(name, widths):
    """torchvision's _get_depths: 8-multiples of alpha * (32, 16, 24, 40, 80, 96, 192, 320)."""
    layers, _, variables = _abstract(name)
    p = variables["params"]
    got = (p["layers.0"]["kernel"].shape[-1], p["layers.6"]["kernel"].shape[-1],
           *(p[f"layers.{8 + i}.0"]["layers.6"]["kernel"].shape[-1] for i in range(6)))
    assert got == widths
    assert variables["batch_stats"]["layers.13.0"]["layers.7"]["mean"].shape == (widths[-1],)
    assert [layer.name for layer in layers][:4] == ["layers.2:0", "layers.5:0",
                                                    "layers.8.0/layers.2:0",
                                                    "layers.8.0/layers.5:0"]


def test_vit_image_size_sets_the_position_embedding_and_checks_the_input():
    module, variables = models.create("vit_b_32", image_size=64, num_classes=5)
    assert variables["params"]["encoder"]["pos_embedding"].shape == (1, 5, 768)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    logits = jax.jit(module.apply)(variables, x)
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match=r"image_size=64.*\(2, 32, 32, 3\)"):
        module.apply(variables, x[:, :32, :32])
    with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
        models.create("vit_b_32", image_size=48)
    torch_sd = models.to_torchvision("vit_b_32", variables, num_classes=5, image_size=64)
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert torch_sd[f"{attn}.in_proj_weight"].shape == (3 * 768, 768)
    np.testing.assert_array_equal(
        torch_sd[f"{attn}.in_proj_weight"][768:1536],  # torch's k rows = Flax k columns
        np.asarray(variables["params"]["encoder"]["layers.encoder_layer_0"]["self_attention"]
                   ["in_proj"]["kernel"][:, 768:1536]).T)
    layers, _, _ = _abstract("vit_b_16")
    assert [layer.name for layer in layers] == [
        f"encoder/layers.encoder_layer_{i}/mlp.1:0" for i in range(12)]


def test_convnext_names_layer_scale_rule_and_channels_last_mlp():
    layers, out, variables = _abstract("convnext_tiny")
    names = [layer.name for layer in layers]
    assert names[:4] == ["features.1.0/block.4:0", "features.1.1/block.4:0",
                         "features.1.2/block.4:0", "features.3.0/block.4:0"]
    assert names[-1] == "features.7.2/block.4:0"
    # The GELU sees the channels-last (N, H, W, 4 C) map: reduced to 4 C features.
    assert [layer.x.shape for layer in layers[:1]] == [(2, 4 * 96)]
    assert [layer.x.shape for layer in layers[-1:]] == [(2, 4 * 768)]
    module, variables = models.create("convnext_tiny", num_classes=3)
    scale = variables["params"]["features.1.0"]["layer_scale"]
    np.testing.assert_allclose(scale, np.full(96, 1e-6, np.float32))
    sd = models.to_torchvision("convnext_tiny", variables, num_classes=3)
    assert sd["features.1.0.layer_scale"].shape == (96, 1, 1)
    assert sd["features.2.1.weight"].shape == (192, 96, 2, 2)  # downsampling conv, OIHW
    assert sd["classifier.2.weight"].shape == (3, 768)
    with pytest.raises(ValueError, match="one entry per stage"):
        from affjax.models.convnext import ConvNeXt
        ConvNeXt((8, 16), (1, 1, 1)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_swin_window_index_mask_and_names():
    from affjax.models.swin import _QKV
    from affjax.models.swin import relative_position_index
    from affjax.models.swin import shift_mask

    # Window 2: tokens (0,0), (0,1), (1,0), (1,1); index = (dh + 1) * 3 + (dw + 1).
    coords = [(0, 0), (0, 1), (1, 0), (1, 1)]
    expected = [(a[0] - b[0] + 1) * 3 + (a[1] - b[1] + 1) for a in coords for b in coords]
    assert relative_position_index(2).tolist() == expected
    # 4x4 map, window 2, shift 1: the last window mixes 4 regions, the first is one region.
    mask = shift_mask(4, 4, 2, (1, 1))
    assert mask.shape == (4, 4, 4)
    assert not mask[0].any()
    np.testing.assert_array_equal(mask[3] == 0, np.eye(4, dtype=bool))
    # V2 applies the qkv bias without its k third.
    qkv = _QKV(6, zero_k_bias=True)
    params = {"params": {"kernel": jnp.zeros((2, 6)), "bias": jnp.arange(1.0, 7.0)}}
    np.testing.assert_array_equal(qkv.apply(params, jnp.ones((1, 2))), [[1, 2, 0, 0, 5, 6]])
    for name in ("swin_t", "swin_v2_t"):
        layers, _, variables = _abstract(name)
        names = [layer.name for layer in layers]
        assert names[:3] == ["features.1.0/mlp.1:0", "features.1.1/mlp.1:0",
                             "features.3.0/mlp.1:0"]
        assert names[-1] == "features.7.1/mlp.1:0"
        attn = variables["params"]["features.1.0"]["attn"]
        assert ("cpb_mlp.0" in attn) == (name == "swin_v2_t")
        assert ("relative_position_bias_table" in attn) == (name == "swin_t")


def test_maxvit_call_order_and_input_size():
    layers, _, variables = _abstract("maxvit_t")
    names = [layer.name for layer in layers]
    first = "blocks.0.layers.0.layers"
    assert names[:7] == ["stem.0.2:0", f"{first}.MBconv/layers.conv_a.2:0",
                         f"{first}.MBconv/layers.conv_b.2:0",
                         f"{first}.MBconv/layers.squeeze_excitation/activation:0",
                         f"{first}.MBconv/layers.squeeze_excitation/scale_activation:0",
                         f"{first}.window_attention/mlp_layer.2:0",
                         f"{first}.grid_attention/mlp_layer.2:0"]
    assert [layer.kind for layer in layers[:5]] == ["gelu", "gelu", "gelu", "silu", "sigmoid"]
    assert names[-1] == "classifier.4:0" and layers[-1].kind == "tanh"
    # SE acts on the pooled (N, 1, 1, 16) map; the MLP GELU on (N, groups, tokens, 256).
    assert layers[3].x.shape == (2, 16) and layers[5].x.shape == (2, 256)
    assert "proj.1" in variables["params"][f"{first}.MBconv"]  # AvgPool + 1x1 conv
    module = models.get_spec("maxvit_t").build(num_classes=3)
    with pytest.raises(ValueError, match="partition size 7"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))


def test_efficientnet_names_follow_torchvision_including_squeeze_excitation():
    layers, _, _ = _abstract("efficientnet_b0")
    names = [layer.name for layer in layers]
    # Stage 1 has expansion ratio 1 (no expansion conv): depthwise SiLU, then the SE pair.
    assert names[:8] == [
        "features.0.2:0", "features.1.0/block.0.2:0", "features.1.0/block.1/activation:0",
        "features.1.0/block.1/scale_activation:0", "features.2.0/block.0.2:0",
        "features.2.0/block.1.2:0", "features.2.0/block.2/activation:0",
        "features.2.0/block.2/scale_activation:0"]
    assert names[-1] == "features.8.2:0"
    assert [layer.kind for layer in layers[:4]] == ["silu", "silu", "silu", "sigmoid"]
    layers, _, _ = _abstract("efficientnet_v2_s")
    names = [layer.name for layer in layers]
    # Fused stages: one SiLU per block (block.0.2), the MBConv stages as in V1.
    assert names[:3] == ["features.0.2:0", "features.1.0/block.0.2:0", "features.1.1/block.0.2:0"]
    assert names[11:15] == ["features.4.0/block.0.2:0", "features.4.0/block.1.2:0",
                            "features.4.0/block.2/activation:0",
                            "features.4.0/block.2/scale_activation:0"]
    assert names[-1] == "features.7.2:0"


def test_regnet_names_follow_torchvision():
    layers, _, _ = _abstract("regnet_y_400mf")
    assert [layer.name for layer in layers[:7]] == [
        "stem.2:0", "trunk_output.block1.block1-0/f.a.2:0", "trunk_output.block1.block1-0/f.b.2:0",
        "trunk_output.block1.block1-0/f.se/activation:0",
        "trunk_output.block1.block1-0/f.se/scale_activation:0",
        "trunk_output.block1.block1-0/activation:0", "trunk_output.block2.block2-0/f.a.2:0"]
    assert layers[-1].name == "trunk_output.block4.block4-5/activation:0"
    layers, _, variables = _abstract("regnet_x_400mf")
    assert [layer.name for layer in layers[1:4]] == [
        "trunk_output.block1.block1-0/f.a.2:0", "trunk_output.block1.block1-0/f.b.2:0",
        "trunk_output.block1.block1-0/activation:0"]
    # regnet_x_400mf stages: widths (32, 64, 160, 400), group width 16 -> 2 groups in stage 1.
    block = variables["params"]["trunk_output.block1.block1-0"]
    assert block["f.b.0"]["kernel"].shape == (3, 3, 16, 32)
    assert variables["params"]["fc"]["kernel"].shape == (400, 7)


def test_googlenet_names_and_the_ignored_aux_heads():
    layers, _, variables = _abstract("googlenet")
    names = [layer.name for layer in layers]
    assert names[:9] == ["conv1/relu:0", "conv2/relu:0", "conv3/relu:0",
                         "inception3a/branch1/relu:0", "inception3a/branch2.0/relu:0",
                         "inception3a/branch2.1/relu:0", "inception3a/branch3.0/relu:0",
                         "inception3a/branch3.1/relu:0", "inception3a/branch4.1/relu:0"]
    assert names[-1] == "inception5b/branch4.1/relu:0"
    assert not any(k.startswith("aux") for k in variables["params"])
    spec = models.get_spec("googlenet")
    assert spec.ignored_prefixes == ("aux1.", "aux2.")
    assert spec.torchvision_kwargs["transform_input"] is True


def test_max_pool_ceil_mode_shapes_follow_torch():
    from affjax.models.googlenet import max_pool_ceil

    # torch: ceil((H + 2p - k) / s) + 1, minus one if the last window starts in the padding.
    for size, k, s, p, expected in ((112, 3, 2, 0, 56), (7, 2, 2, 0, 4), (8, 3, 2, 0, 4),
                                    (5, 3, 1, 1, 5), (6, 3, 2, 1, 4)):
        x = jnp.arange(size * size, dtype=jnp.float32).reshape(1, size, size, 1)
        out = max_pool_ceil(x, k, stride=s, padding=p)
        assert out.shape == (1, expected, expected, 1), (size, k, s, p)
    # The partial last window of a 7x7 map pooled 2x2/2 is the last row/column alone.
    x = jnp.arange(49, dtype=jnp.float32).reshape(1, 7, 7, 1)
    out = max_pool_ceil(x, 2, stride=2)
    np.testing.assert_array_equal(out[0, :, :, 0], [[8, 10, 12, 13], [22, 24, 26, 27],
                                                    [36, 38, 40, 41], [43, 45, 47, 48]])


def test_inception_v3_names_and_minimum_size():
    layers, _, variables = _abstract("inception_v3")
    names = [layer.name for layer in layers]
    assert names[:6] == ["Conv2d_1a_3x3/relu:0", "Conv2d_2a_3x3/relu:0", "Conv2d_2b_3x3/relu:0",
                         "Conv2d_3b_1x1/relu:0", "Conv2d_4a_3x3/relu:0",
                         "Mixed_5b/branch1x1/relu:0"]
    assert names[-3:] == ["Mixed_7c/branch3x3dbl_3a/relu:0", "Mixed_7c/branch3x3dbl_3b/relu:0",
                          "Mixed_7c/branch_pool/relu:0"]
    assert variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (
        1, 7, 128, 128)
    assert not any(k.startswith("AuxLogits") for k in variables["params"])
    module = models.get_spec("inception_v3").build(num_classes=7)
    with pytest.raises(ValueError, match=r"at least 75x75, got \(74, 80\)"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 74, 80, 3)))


# --- stochastic depth (training mode of ConvNeXt, Swin, EfficientNet, MaxViT) ---------------

def test_stochastic_depth_drops_whole_rows_at_the_rate_and_rescales_the_rest():
    from affjax.models.layers import StochasticDepth

    x = jax.random.normal(jax.random.key(1), (4000, 3, 2), jnp.float32)
    assert (StochasticDepth(0.3).apply({}, x, deterministic=True) == x).all()
    assert (StochasticDepth(0.0).apply({}, x, deterministic=False) == x).all()  # no rng needed
    y = np.asarray(StochasticDepth(0.3).apply({}, x, deterministic=False,
                                              rngs={"dropout": jax.random.key(2)}))
    dropped = np.all(y == 0, axis=(1, 2))
    kept = ~dropped
    # Row mode: a sample is dropped or kept as a whole, kept ones scaled by 1 / (1 - rate).
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / np.float32(0.7), rtol=1e-6)
    assert abs(dropped.mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 4000)
    # Another key, another mask; the same key, the same mask.
    y2 = StochasticDepth(0.3).apply({}, x, deterministic=False,
                                    rngs={"dropout": jax.random.key(3)})
    assert not np.array_equal(np.all(np.asarray(y2) == 0, axis=(1, 2)), dropped)
    y3 = StochasticDepth(0.3).apply({}, x, deterministic=False,
                                    rngs={"dropout": jax.random.key(2)})
    assert np.array_equal(np.asarray(y3), y)
    assert (StochasticDepth(1.0).apply({}, x, deterministic=False,
                                       rngs={"dropout": jax.random.key(2)}) == 0).all()


def test_stochastic_depth_bad_rate_and_missing_rng_are_named():
    from affjax.models.layers import StochasticDepth

    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\], got 1.5"):
        StochasticDepth(1.5).apply({}, x, deterministic=True)
    with pytest.raises(Exception, match="dropout"):
        StochasticDepth(0.5).apply({}, x, deterministic=False)


def test_one_stochastic_depth_called_twice_draws_two_masks():
    # torch's Swin and MaxViT apply one StochasticDepth instance to both residual branches;
    # each call draws its own mask.
    from affjax.models.layers import StochasticDepth

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            drop = StochasticDepth(0.5, name="stochastic_depth")
            return drop(x, deterministic=False), drop(x, deterministic=False)

    a, b = Twice().apply({}, jnp.ones((256, 1)), rngs={"dropout": jax.random.key(0)})
    assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", ["convnext", "swin", "maxvit", "efficientnet"])
def test_train_mode_applies_stochastic_depth_and_inference_ignores_it(family):
    from affjax.models.convnext import ConvNeXt
    from affjax.models.efficientnet import EfficientNet
    from affjax.models.efficientnet import _v1_stages
    from affjax.models.maxvit import MaxVit
    from affjax.models.swin import SwinTransformer

    def build(prob):
        return {
            "convnext": lambda: ConvNeXt((8, 16), (2, 2), num_classes=5,
                                         stochastic_depth_prob=prob),
            "swin": lambda: SwinTransformer(8, (2, 2), (1, 2), window=4, num_classes=5,
                                            stochastic_depth_prob=prob),
            "maxvit": lambda: MaxVit(8, (16, 32), (2, 1), head_dim=8, partition_size=2,
                                     num_classes=5, stochastic_depth_prob=prob),
            # dropout 0: the only randomness left is stochastic depth.
            "efficientnet": lambda: EfficientNet(_v1_stages(0.25, 0.5), num_classes=5,
                                                 dropout=0.0, stochastic_depth_prob=prob),
        }[family]()

    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3), jnp.float32)
    variables = build(0.0).init(jax.random.key(1), x)
    # ConvNeXt's layer scale starts at 1e-6, which would hide its branches: use 1.
    flat = traverse_util.flatten_dict(variables)
    variables = traverse_util.unflatten_dict(
        {k: jnp.ones_like(v) if k[-1] == "layer_scale" else v for k, v in flat.items()})

    def run(prob, train, key=None):
        rngs = None if key is None else {"dropout": jax.random.key(key)}
        out = build(prob).apply(variables, x, train=train, rngs=rngs,
                                mutable=["batch_stats"] if "batch_stats" in variables else False)
        return np.asarray(out[0] if isinstance(out, tuple) else out)

    base_train = run(0.0, True)  # prob 0: no rng needed, even in training
    # Inference never drops; the model's variables do not depend on the rate.
    np.testing.assert_array_equal(run(0.9, False), run(0.0, False))
    a, b, a_again = run(0.9, True, 0), run(0.9, True, 1), run(0.9, True, 0)
    np.testing.assert_array_equal(a, a_again)
    # Rounding between the programs is ~1e-7; dropped branches move the logits far more.
    assert np.abs(a - base_train).max() > 1e-4, np.abs(a - base_train).max()
    assert np.abs(a - b).max() > 1e-4, np.abs(a - b).max()
    with pytest.raises(Exception, match="dropout"):
        run(0.9, True)
