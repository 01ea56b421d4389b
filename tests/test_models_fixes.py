"""Regression tests of the model zoo's edges, against torchvision / torch themselves.

uint8 bicubic clamping of the evaluation transform, the checks and the torch metadata of
``to_torchvision``, 0-d tensors in ``.safetensors`` files, torch-file suffixes, whole-module
files and checkpoint wrappers, and the transform's input messages. Small models and images
only (the whole file takes about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
import torch
import torchvision

from affjax import models
from affjax.models import io


def _edge(h, w):
    """Black left half, white right half (uint8, RGB)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, w // 2:] = 255
    return img


def _checker(h, w, cell=8):
    """A black/white checkerboard of ``cell``-pixel squares (uint8, RGB)."""
    yy, xx = np.indices((h, w))
    return np.repeat((((yy // cell + xx // cell) % 2) * 255).astype(np.uint8)[..., None], 3, -1)


def _torchvision_transform(name, img):
    ref = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return ref(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)).numpy().transpose(
        1, 2, 0)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])  # bicubic, bilinear
@pytest.mark.parametrize(("image", "shape"), [(_edge, (300, 400)), (_checker, (120, 160)),
                                              (_checker, (300, 400))])
def test_uint8_resize_is_clamped_like_torchvision(name, image, shape):
    """torchvision clamps a uint8 image resized by bicubic to 0..255 (the overshoot at a
    black/white edge is about 30 grey levels) and rounds it to uint8; the port clamps and
    keeps the fraction: within the documented half grey level (0.0088 for std 0.225)."""
    t = models.eval_transform(name)
    assert t.interpolation == {"efficientnet_b0": "bicubic", "resnet18": "bilinear"}[name]
    img = image(*shape)
    grey = 1 / 255 / min(t.std)
    ours = np.asarray(t(img))
    ref = _torchvision_transform(name, img)
    assert ours.shape == ref.shape == (224, 224, 3)
    assert np.abs(ours - ref).max() <= 0.55 * grey
    # The outputs stay in the normalised image of [0, 1].
    lo = (0 - np.asarray(t.mean)) / np.asarray(t.std)
    hi = (1 - np.asarray(t.mean)) / np.asarray(t.std)
    assert np.all(ours >= lo - 1e-5) and np.all(ours <= hi + 1e-5)


def test_float_input_is_not_clamped():
    """torchvision does not clamp float images; neither does the port (bicubic overshoot)."""
    name = "efficientnet_b0"
    img = _checker(120, 160).astype(np.float32) / 255
    ref_t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    ref = ref_t(torch.from_numpy(img).permute(2, 0, 1)).numpy().transpose(1, 2, 0)
    ours = np.asarray(models.eval_transform(name)(img))
    assert np.abs(ours - ref).max() <= 2e-4
    assert ours.max() > (1 - ref_t.mean[0]) / ref_t.std[0] + 0.1  # overshoot kept


def test_transform_messages_show_the_given_shape_and_reject_empty_images():
    t = models.eval_transform("resnet18")
    with pytest.raises(ValueError, match=r"got shape \(100, 120, 1\)"):
        t(np.zeros((100, 120, 1), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(3, 100, 120\)"):
        t(np.zeros((3, 100, 120), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(100, 120\)$"):
        t(np.zeros((100, 120), np.uint8))
    for shape in [(0, 10, 3), (10, 0, 3), (2, 0, 0, 3)]:
        with pytest.raises(ValueError, match=r"empty image.*" + r"\(" + ", ".join(map(str, shape))):
            t(np.zeros(shape, np.uint8))
    assert t(np.zeros((0, 5, 7, 3), np.uint8)).shape == (0, 224, 224, 3)  # an empty batch


@pytest.fixture(scope="module")
def resnet18_10():
    _, variables = models.create("resnet18", num_classes=10)
    return variables


def _abstract(name, **kw):
    """A model's variables as shapes only (no initialisation compute)."""
    return jax.eval_shape(lambda: models.create(name, **kw)[1])


def test_to_torchvision_rejects_variables_of_another_model(resnet18_10):
    with pytest.raises(ValueError, match=r"variables do not fit resnet18: \d+ unexpected: "
                                         r"params/layer1\.2/"):
        models.to_torchvision("resnet18", _abstract("resnet34", num_classes=10))
    with pytest.raises(ValueError, match=r"variables do not fit resnet34: \d+ missing: "
                                         r"params/layer1\.2/"):
        models.to_torchvision("resnet34", resnet18_10)
    # Same leaves, other widths: wide_resnet50_2's bottlenecks are twice as wide.
    with pytest.raises(ValueError, match=r"wide_resnet50_2: \d+ wrongly shaped: "
                                         r"params/layer1\.0/bn1/bias \(64,\) "
                                         r"\(expected \(128,\)\)"):
        models.to_torchvision("wide_resnet50_2", _abstract("resnet50"))
    # num_classes is read from the head; an explicit other width is a misfit.
    sd = models.to_torchvision("resnet18", resnet18_10)
    assert sd["fc.weight"].shape == (10, 512)
    with pytest.raises(ValueError, match=r"params/fc/kernel \(512, 10\) "
                                         r"\(expected \(512, 5\)\)"):
        models.to_torchvision("resnet18", resnet18_10, num_classes=5)
    with pytest.raises(ValueError, match=r"missing: batch_stats/bn1/mean"):
        models.to_torchvision("resnet18", {"params": resnet18_10["params"]})


def test_mnasnet_state_dict_loads_into_torchvision():
    """torchvision's MNASNet refuses a state dict without ``_metadata`` version 2."""
    torch.manual_seed(0)
    tmodel = torchvision.models.mnasnet0_5(weights=None, num_classes=7).eval()
    with torch.no_grad():
        for m in tmodel.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    _, variables = models.from_torchvision("mnasnet0_5", tmodel.state_dict())
    sd = models.to_torchvision("mnasnet0_5", variables)
    assert isinstance(sd, collections.OrderedDict)
    assert sd._metadata[""] == {"version": 2}
    tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())
    tensors._metadata = sd._metadata
    fresh = torchvision.models.mnasnet0_5(weights=None, num_classes=7).eval()
    result = fresh.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), tmodel(x).numpy())


def test_safetensors_keeps_0d_tensors(tmp_path):
    path = tmp_path / "scalars.safetensors"
    models.save_safetensors(path, {"bn.num_batches_tracked": torch.tensor(7),
                                   "n": np.array(3, np.int64), "s": np.float32(2.5),
                                   "w": np.arange(6.0, dtype=np.float32).reshape(2, 3).T})
    back = models.load_safetensors(path)
    assert back["bn.num_batches_tracked"].shape == () and back["bn.num_batches_tracked"] == 7
    assert back["n"].shape == () and back["n"] == 3
    assert back["s"].shape == () and back["s"] == np.float32(2.5)
    np.testing.assert_array_equal(back["w"], np.arange(6.0).reshape(2, 3).T)
    # torchvision's BatchNorm then loads the file strictly (it checks the counter's shape).
    bn = torch.nn.BatchNorm2d(2)
    models.save_safetensors(path, bn.state_dict())
    bn.load_state_dict({k: torch.from_numpy(np.array(v))
                        for k, v in models.load_safetensors(path).items()})


@pytest.mark.parametrize("suffix", [".pth.tar", ".ckpt", ".PTH", ".Pt", ".bin"])
def test_torch_file_suffixes_and_checkpoints(tmp_path, suffix):
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(2)}
    path = tmp_path / f"checkpoint{suffix}"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    got = io.load_state_dict(path)
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got["a.weight"], sd["a.weight"].numpy())


def test_unknown_suffix_lists_every_accepted_one(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown state dict format") as e:
        io.load_state_dict(path)
    for suffix in (".safetensors", ".pth", ".pt", ".pth.tar", ".ckpt", ".bin"):
        assert suffix in str(e.value)


def test_a_pickled_module_is_named_and_not_unpickled(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3)), path)
    with pytest.raises(ValueError, match=r"pickled module.*model\.state_dict\(\)"):
        models.from_torchvision("resnet18", path)


def test_a_checkpoint_mapping_is_unwrapped_like_a_file(tmp_path, resnet18_10):
    sd = models.to_torchvision("resnet18", resnet18_10)
    for wrapper in ({"state_dict": sd, "epoch": 3}, {"model": sd, "epoch": 3}):
        module, variables = models.from_torchvision("resnet18", wrapper)
        assert module.num_classes == 10
        np.testing.assert_array_equal(variables["params"]["fc"]["kernel"],
                                      resnet18_10["params"]["fc"]["kernel"])
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                "epoch": 3}, path)
    _, variables = models.from_torchvision("resnet18", path)
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                  resnet18_10["params"]["conv1"]["kernel"])
