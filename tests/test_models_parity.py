"""The ports against torchvision itself (torch 2.x + torchvision, random weights, no download).

Logits within 1e-4 of the logit scale; signatures within 2e-3 per layer of one computed with
torch forward hooks (tools/parity.py); the transform against torchvision's.
The full sweep over every model: ``python tools/parity.py --all`` (docs/models.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision
from flax import traverse_util

from affjax import models

# tools/parity.py is a repository tool, outside the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import parity  # noqa: E402

# The smallest model of each family (and the BatchNorm and grouped-convolution variants), at
# ModelSpec.parity_size, where every spatial map before the head is larger than 1x1 (AlexNet:
# 3x3 at 128, VGG: 2x2 at 64), so the NCHW -> NHWC flatten permutation is exercised.
CASES = ["alexnet", "vgg11", "vgg11_bn", "resnet18", "resnext50_32x4d",
         "densenet121", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5",
         "mnasnet0_5",
         "vit_b_16",  # ViT at image_size 32: 2 x 2 patches
         "convnext_tiny",
         "swin_t", "swin_v2_t",  # Swin V2: other attention, position bias and block order
         "maxvit_t",  # at 224, the only side its partition size 7 allows
         "efficientnet_b0", "regnet_y_400mf", "googlenet", "inception_v3"]


@pytest.mark.parametrize("name", CASES)
def test_logits_and_signature_match_torchvision(name):
    # MaxViT only runs at 224: batch 4 keeps its case near 50 s of CI time.
    r = parity.compare(name, batch={"maxvit_t": 4}.get(name, 8), seed=0)
    assert r.size == {"alexnet": 128, "vit_b_16": 32, "maxvit_t": 224,
                      "inception_v3": 107}.get(name, 64)
    assert r.logit_error <= 1e-4, r.logit_error
    assert r.calls == len(r.flax_scores)
    assert r.names_match
    np.testing.assert_allclose(r.flax_scores, r.torch_scores, rtol=0, atol=2e-3)
    # The reference is not degenerate: some layer is clearly non-linear, none is NaN.
    # ConvNeXt's and Swin's init (std 0.02) keeps their GELU inputs small, where GELU is
    # nearly linear: their scores lie in 0.98-0.999, but differ between layers by far more
    # than the parity error (1e-7), so the comparison still tells layers apart.
    assert np.all(np.isfinite(r.torch_scores))
    assert r.torch_scores.min() < {"convnext_tiny": 0.995, "swin_t": 0.995,
                                   "swin_v2_t": 0.995}.get(name, 0.95)
    assert np.ptp(r.torch_scores) > 4e-3


def test_hooks_see_the_input_before_the_inplace_relu():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(inplace=True))
    x = torch.randn(32, 4)
    names, pairs, out = parity.torch_activation_calls(model, x)
    assert names == ["1"]
    pre = model[0](x).detach().double().numpy()
    np.testing.assert_allclose(pairs[0][0], pre, rtol=1e-6)
    assert (pre < 0).any() and np.array_equal(pairs[0][1], np.maximum(pre, 0))


def test_hooks_see_functional_activations_once():
    """F.relu outside an activation module is recorded as <caller>.relu; nn.ReLU only once."""

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Linear(4, 5)

        def forward(self, x):
            return torch.nn.functional.relu(self.conv(x), inplace=True)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Inner()
            self.act = torch.nn.ReLU(inplace=True)
            self.fc = torch.nn.Linear(5, 3)

        def forward(self, x):
            return torch.nn.functional.relu(self.fc(self.act(self.block(x)) - 0.5))

    model = Outer()
    x = torch.randn(16, 4)
    names, pairs, out = parity.torch_activation_calls(model, x)
    assert names == ["block.relu", "act", "relu"]
    pre = model.block.conv(x).detach().double().numpy()
    assert (pre < 0).any()
    np.testing.assert_allclose(pairs[0][0], pre, rtol=1e-6)  # seen before the in-place call
    np.testing.assert_allclose(pairs[0][1], np.maximum(pre, 0), rtol=1e-6)
    assert torch.nn.functional.relu.__module__ == "torch.nn.functional"  # restored


def test_hooks_see_functional_relus_of_basic_conv2d():
    """GoogLeNet/Inception apply F.relu(inplace=True) inside BasicConv2d: the reference hooks
    the bn output (cloned before the in-place ReLU) and the module output."""
    from torchvision.models.googlenet import BasicConv2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(BasicConv2d(3, 5, kernel_size=3)).eval()
    x = torch.randn(16, 3, 6, 6)
    names, pairs, out = parity.torch_activation_calls(model, x)
    assert names == ["0.relu"]
    with torch.no_grad():
        pre = model[0].bn(model[0].conv(x)).double().numpy()
    assert (pre < 0).any()
    np.testing.assert_allclose(pairs[0][0], pre.mean(axis=(2, 3)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pairs[0][1], np.maximum(pre, 0).mean(axis=(2, 3)), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize(("name", "aux"), [("googlenet", ("aux1.", "aux2.")),
                                          ("inception_v3", ("AuxLogits.",))])
def test_aux_heads_are_ignored_and_transform_input_matters(name, aux):
    tmodel = parity.torchvision_model(name, seed=3)
    sd = tmodel.state_dict()
    assert any(k.startswith(aux) for k in sd)  # the weights files hold the aux heads
    module, variables = models.from_torchvision(name, sd)
    back = models.to_torchvision(name, variables)
    assert set(back) == {k for k in sd if not k.startswith(aux)
                         and not k.endswith("num_batches_tracked")}
    x = np.random.default_rng(3).standard_normal((2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x)).numpy()
        tmodel.transform_input = False
        ref_plain = tmodel(torch.from_numpy(x)).numpy()
    x_nhwc = x.transpose(0, 2, 3, 1)
    out = np.asarray(module.apply(variables, x_nhwc))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(ref_plain - ref).max() > 1e-2 * np.abs(ref).max()
    plain = module.clone(transform_input=False).apply(variables, x_nhwc)
    assert np.abs(np.asarray(plain) - ref_plain).max() <= 1e-4 * np.abs(ref).max()


def test_a_wrong_permutation_is_caught():
    """Sanity of the parity check: VGG's first Linear without the flatten permutation fails."""
    tmodel = parity.torchvision_model("vgg11", seed=1)
    sd = tmodel.state_dict()
    w = sd["classifier.0.weight"].numpy()
    # Permute the columns the other way (HWC -> CHW) to mimic a port that flattens NCHW wrongly.
    sd = dict(sd, **{"classifier.0.weight": torch.from_numpy(
        np.ascontiguousarray(w.reshape(4096, 7, 7, 512).transpose(0, 3, 1, 2).reshape(4096, -1)))})
    module, variables = models.from_torchvision("vgg11", sd)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x)).numpy()
    out = np.asarray(module.apply(variables, x.transpose(0, 2, 3, 1)))
    assert np.abs(out - ref).max() / np.abs(ref).max() > 1e-2


def test_state_dict_names_match_torchvision_exactly():
    for name in ("alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d"):
        sd = torchvision.models.get_model(name, weights=None).state_dict()
        module, variables = models.from_torchvision(name, sd)
        back = models.to_torchvision(name, variables)
        expected = {k for k in sd if not k.endswith("num_batches_tracked")}
        assert set(back) == expected
        for k in expected:
            np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)


@pytest.mark.parametrize("name", ["densenet121", "mobilenet_v2", "mobilenet_v3_small",
                                  "squeezenet1_0", "shufflenet_v2_x0_5", "mnasnet0_5"])
def test_state_dict_names_match_torchvision_exactly_tier2_3(name):
    sd = torchvision.models.get_model(name, weights=None).state_dict()
    _, variables = models.from_torchvision(name, sd)
    back = models.to_torchvision(name, variables)
    expected = {k for k in sd if not k.endswith("num_batches_tracked")}
    assert set(back) == expected
    for k in expected:
        np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)


def test_pth_round_trip_and_bfloat16_tensors(tmp_path):
    tmodel = parity.torchvision_model("resnet18", seed=2)
    path = tmp_path / "resnet18.pth"
    torch.save(tmodel.state_dict(), path)
    _, from_file = models.from_torchvision("resnet18", path)
    _, from_dict = models.from_torchvision("resnet18", tmodel.state_dict())
    a, b = traverse_util.flatten_dict(from_file), traverse_util.flatten_dict(from_dict)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": tmodel.state_dict(), "epoch": 3}, wrapped)
    _, from_wrapped = models.from_torchvision("resnet18", wrapped)
    np.testing.assert_array_equal(from_wrapped["params"]["fc"]["kernel"],
                                  from_dict["params"]["fc"]["kernel"])
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in tmodel.state_dict().items()}
    _, from_half = models.from_torchvision("resnet18", half)
    np.testing.assert_allclose(from_half["params"]["fc"]["kernel"],
                               from_dict["params"]["fc"]["kernel"], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", sorted(models.list_models()))
def test_eval_transform_numbers_match_torchvision(name):
    ref = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    t = models.eval_transform(name)
    assert [t.resize_size] == list(ref.resize_size)
    assert [t.crop_size] == list(ref.crop_size)
    assert t.interpolation == ref.interpolation.value
    assert t.antialias == ref.antialias
    np.testing.assert_allclose(t.mean, ref.mean)
    np.testing.assert_allclose(t.std, ref.std)


def _test_image(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1)
    img = np.clip(0.5 + 0.4 * smooth + 0.1 * rng.standard_normal((h, w, 3)), 0, 1)
    return (img * 255).round().astype(np.uint8)


@pytest.mark.parametrize("shape", [(300, 400), (480, 353), (120, 160), (500, 240)])
def test_eval_transform_output_matches_torchvision(shape):
    """Measured differences (resnet50's transform, 232 -> 224):

    * float image in [0, 1] vs torchvision on a float tensor: max 1e-4 (same antialiased
      triangle filter; float32 rounding);
    * uint8 vs torchvision on a uint8 tensor: max 0.0088 = 0.5 / 255 / 0.225, torchvision
      rounds the resized image to uint8, we keep float;
    * uint8 vs torchvision on a PIL image: max 0.0175 = 1 / 255 / 0.224, PIL's fixed-point
      resampling is off by up to one grey level besides the rounding.
    The tolerances are these bounds (grey levels / smallest std) with a 10% margin.
    """
    name = "resnet50"
    ref_t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    t = models.eval_transform(name)
    img = _test_image(*shape, seed=sum(shape))
    grey = 1 / 255 / min(t.std)
    ours_u8 = np.asarray(t(img))
    ours_f = np.asarray(t(img.astype(np.float32) / 255))
    chw = torch.from_numpy(img).permute(2, 0, 1)
    ref_float = ref_t(chw.float() / 255).numpy().transpose(1, 2, 0)
    ref_uint8 = ref_t(chw).numpy().transpose(1, 2, 0)
    ref_pil = ref_t(PIL.Image.fromarray(img)).numpy().transpose(1, 2, 0)
    assert ours_u8.shape == ref_pil.shape == (224, 224, 3)
    assert np.abs(ours_f - ref_float).max() <= 2e-4
    assert np.abs(ours_u8 - ref_uint8).max() <= 0.55 * grey
    assert np.abs(ours_u8 - ref_pil).max() <= 1.1 * grey
    assert np.abs(ours_u8 - ref_pil).mean() <= 0.4 * grey


@pytest.mark.parametrize("shape, size, crop", [((8, 12), 4, 4), ((37, 53), 24, 20),
                                              ((50, 50), 64, 60), ((97, 61), 33, 33)])
def test_nearest_modes_pick_torchvisions_pixels(shape, size, crop):
    # "nearest" sampled pixel centres (torchvision's NEAREST_EXACT), not NEAREST's
    # floor(i * in / out): 95% of pixels differed on noise.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tf

    img = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    for mode, tv_mode in (("nearest", InterpolationMode.NEAREST),
                          ("nearest-exact", InterpolationMode.NEAREST_EXACT)):
        t = models.EvalTransform(size, crop, interpolation=mode, mean=(0, 0, 0), std=(1, 1, 1))
        ref = tf.center_crop(tf.resize(chw, size, tv_mode), crop).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(np.asarray(t(img)), ref / 255.0, atol=1e-6, err_msg=mode)
    assert models.EvalTransform(size, crop, interpolation="nearest-exact").resize_with_pillow(
        img).dtype == np.uint8


def test_vit_state_dict_names_and_fused_attention_projection():
    """ViT at image_size 32: exact torchvision names, q/k/v order of the fused in_proj."""
    tmodel = parity.torchvision_model("vit_b_16", seed=3, image_size=32)
    sd = tmodel.state_dict()
    module, variables = models.from_torchvision("vit_b_16", sd, image_size=32)
    back = models.to_torchvision("vit_b_16", variables, image_size=32)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)
    assert variables["params"]["encoder"]["pos_embedding"].shape == (1, 5, 768)
    # The first block's attention alone, against torch's MultiheadAttention.
    attn = tmodel.encoder.layers.encoder_layer_0.self_attention
    x = torch.randn(2, 5, 768)
    with torch.no_grad():
        ref = attn(x, x, x, need_weights=False)[0].numpy()
    block = variables["params"]["encoder"]["layers.encoder_layer_0"]["self_attention"]
    from affjax.models.vit import MultiheadAttention
    out = MultiheadAttention(12).apply({"params": block}, x.numpy())
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="wrongly shaped.*pos_embedding"):
        models.from_torchvision("vit_b_16", sd)  # built for 224, the weights are for 32


def test_channels_last_linear_outputs_are_reduced_over_space():
    """A 4-D Linear output (N, H, W, C) is averaged over H, W; a conv output over H, W of NCHW."""
    lin = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.GELU())
    x = torch.randn(8, 4, 5, 3)
    names, pairs, out = parity.torch_activation_calls(lin, x)
    pre = lin[0](x).detach().double().numpy()
    assert names == ["1"] and pairs[0][0].shape == (8, 6)
    np.testing.assert_allclose(pairs[0][0], pre.mean(axis=(1, 2)), rtol=1e-6)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.GELU())
    names, pairs, out = parity.torch_activation_calls(conv, x.permute(0, 3, 1, 2))
    assert pairs[0][0].shape == (8, 6)


def test_swin_recomputed_buffers_equal_torchvision():
    """The buffers from_torchvision ignores are the ones the port recomputes."""
    from affjax.models.swin import relative_coords_table
    from affjax.models.swin import relative_position_index

    for name, window in (("swin_t", 7), ("swin_v2_t", 8)):
        sd = torchvision.models.get_model(name, weights=None).state_dict()
        attn = "features.5.3.attn"
        np.testing.assert_array_equal(relative_position_index(window),
                                      sd[f"{attn}.relative_position_index"].numpy())
        if name == "swin_v2_t":
            np.testing.assert_array_equal(relative_coords_table(window),
                                          sd[f"{attn}.relative_coords_table"].numpy())
        module, variables = models.from_torchvision(name, sd)
        back = models.to_torchvision(name, variables)
        buffers = {k for k in sd if k.endswith(("relative_position_index",
                                                "relative_coords_table"))}
        assert set(back) == set(sd) - buffers


@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_small", "convnext_base",
                                  "swin_t", "swin_s", "swin_v2_b", "efficientnet_b0",
                                  "efficientnet_b4", "efficientnet_v2_s", "maxvit_t"])
def test_stochastic_depth_rates_match_torchvision(name):
    # Every StochasticDepth of the torchvision model (built on the meta device: no memory,
    # no weights) against the rates of the port's modules, recorded while tracing its init.
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from torchvision.ops import StochasticDepth as TorchStochasticDepth

    from affjax.models.layers import StochasticDepth

    with torch.device("meta"):
        torch_model = getattr(torchvision.models, name)()
    expected = {path: m.p for path, m in torch_model.named_modules()
                if isinstance(m, TorchStochasticDepth)}
    assert expected and max(expected.values()) > 0

    spec = models.get_spec(name)
    module = spec.build()
    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, StochasticDepth) and context.method_name == "__call__":
            rates[".".join(context.module.scope.path)] = context.module.rate
        return next_fun(*args, **kwargs)

    side = max(spec.min_size, 32)
    with nn.intercept_methods(record):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
    # torchvision's MaxViT uses an Identity where the rate is 0 (its first layer).
    assert {k for k, v in rates.items() if v > 0} <= expected.keys()
    for path, p in expected.items():
        if path not in rates:
            # EfficientNet builds a StochasticDepth in every block but calls it only on a
            # residual; the port calls one exactly there.
            block = torch_model.get_submodule(path.rsplit(".", 1)[0])
            assert not block.use_res_connect, path
            continue
        assert rates[path] == pytest.approx(p, abs=1e-12), path
    assert len(rates) >= len(expected) // 2
