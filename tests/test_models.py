"""The model zoo without torch: registry, structure, conversion rules, state-dict files,
evaluation transform. Parity with torchvision itself is in test_models_parity.py."""

from __future__ import annotations

import json
import struct

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
# torchvision's default-weights transforms (IMAGENET1K_V2 where it exists: resize 232).
EXPECTED_RESIZE = {name: 256 for name in EXPECTED_CALLS} | {
    name: 232 for name in ("resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                           "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
                           "resnext101_64x4d")} | {
    "efficientnet_b0": 256, "efficientnet_b1": 255, "efficientnet_b2": 288,
    "efficientnet_b3": 320, "efficientnet_b4": 384, "efficientnet_b5": 456,
    "efficientnet_b6": 528, "efficientnet_b7": 600, "efficientnet_v2_s": 384,
    "efficientnet_v2_m": 480, "efficientnet_v2_l": 480} | {
    name: 232 for name in EXPECTED_CALLS if name.startswith("regnet")} | {"regnet_y_128gf": 384,
                                                                        "inception_v3": 342}
# Crop size where it is not 224, activation kinds where they are not only ReLU.
EXPECTED_CROP = {
    "efficientnet_b1": 240, "efficientnet_b2": 288, "efficientnet_b3": 300,
    "efficientnet_b4": 380, "efficientnet_b5": 456, "efficientnet_b6": 528,
    "efficientnet_b7": 600, "efficientnet_v2_s": 384, "efficientnet_v2_m": 480,
    "efficientnet_v2_l": 480, "regnet_y_128gf": 384, "inception_v3": 299}
EXPECTED_KINDS = {name: {"silu", "sigmoid"} for name in EXPECTED_CALLS
                  if name.startswith("efficientnet")} | {
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
    assert {layer.kind for layer in layers} == EXPECTED_KINDS.get(name, {"relu"})
    has_bn = (name.startswith(("resnet", "wide", "resnext", "efficientnet", "regnet",
                                "googlenet", "inception"))
              or name.endswith("_bn"))
    assert ("batch_stats" in variables) == has_bn
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
        models.eval_transform("vit_b_16")
    with pytest.raises(TypeError, match="resnet18: bad option.*activation"):
        models.create("resnet18", widht=2)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet18", num_classes=0)


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
    assert list(loaded) == list(sd)
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


def test_safetensors_reader_rejects_malformed_files(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        models.load_safetensors(path)
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ValueError, match="header length 10000 exceeds"):
        models.load_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{x}!")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.load_safetensors(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match=r"'w' \(F32, shape \(4,\)\) has byte range \[0, 8\) "
                                         "but needs 16"):
        models.load_safetensors(path)
    header = json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(ValueError, match="'w' has a malformed header entry"):
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
