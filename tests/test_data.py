"""Datasets: batch selection, the random dataset, TFDS (mock data, nothing downloads), folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from affjax import data
from affjax.models import EvalTransform
from affjax.models import eval_transform


def _identity(images):
    return np.asarray(images, np.float32)


def test_parse_batches():
    cases = {"all": (0, None), "3": (0, 3), "@2": (2, 3), "2:5": (2, 5), "4:": (4, None)}
    for text, (start, stop) in cases.items():
        sel = data.parse_batches(text)
        assert (sel.start, sel.stop) == (start, stop)
        assert str(sel) == text
    assert list(data.parse_batches("3").indices(10)) == [0, 1, 2]
    assert data.parse_batches("all").indices(None) is None
    for bad in ("0", "-1", "@x", "5:2", "first"):
        with pytest.raises(data.DataError, match="not understood"):
            data.parse_batches(bad)


def test_random_images_are_seeded_standard_normal_and_independent_of_batch_size():
    ds = data.load_dataset("random", _identity, random_size=8)
    (i0, b0), (i1, b1) = list(ds.batches(4))
    assert (i0, i1) == (0, 1)
    assert b0.shape == (4, 256, 256, 3) and b0.dtype == np.float32
    expected = np.random.default_rng([987, 5]).standard_normal((256, 256, 3), np.float32)
    np.testing.assert_array_equal(b1[1], expected)  # image 5 = batch 1, position 1
    _, alone = next(ds.batches(2, data.parse_batches("@2")))  # images 4, 5 drawn alone
    np.testing.assert_array_equal(alone, b1[:2])
    assert abs(b0.mean()) < 0.01 and abs(b0.std() - 1) < 0.01
    other = data.load_dataset("random", _identity, seed=1, random_size=8)
    assert not np.array_equal(next(other.batches(4))[1], b0)


def test_random_images_through_the_resnet_transform_are_cropped_and_normalised():
    transform = eval_transform("resnet18")
    ds = data.load_dataset("random", transform, random_size=4)
    _, got = next(ds.batches(2))
    raw = np.stack([np.random.default_rng([987, i]).standard_normal((256, 256, 3), np.float32)
                    for i in range(2)]).astype(np.float64)
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    expected = (raw[:, 16:240, 16:240] - mean) / std  # resize 256 -> 256 is a no-op; crop 224
    assert got.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_batch_size_and_selection_errors():
    ds = data.load_dataset("random", _identity, random_size=10)
    with pytest.raises(data.DataError, match="larger than random, which has 10 examples"):
        list(ds.batches(11))
    with pytest.raises(data.DataError, match="at least 2"):
        list(ds.batches(1))
    with pytest.raises(data.DataError, match="has 2 full batches of 4"):
        list(ds.batches(4, data.parse_batches("@2")))
    assert [i for i, _ in ds.batches(4)] == [0, 1]  # the incomplete last batch is dropped
    assert [i for i, _ in ds.batches(3, skip=[0, 2])] == [1]


def _small_transform():
    return EvalTransform(resize_size=16, crop_size=12)


def test_tfds_mock_grayscale_to_rgb_fixed_order_and_resume_skip():
    with tfds.testing.mock_data(num_examples=20):
        ds = data.load_dataset("mnist", _identity, data_dir="/nonexistent/tfds")
        assert ds.split == "test"
        batches = list(ds.batches(6, data.parse_batches("all")))
        assert [i for i, _ in batches] == [0, 1, 2]  # 20 // 6, last 2 examples dropped
        assert batches[0][1].shape == (6, 28, 28, 3)
        first = batches[0][1]
        np.testing.assert_array_equal(first[..., 0], first[..., 2])  # gray repeated
        again = data.load_dataset("mnist", _identity, data_dir="/nonexistent/tfds")
        _, b2 = next(again.batches(6, data.parse_batches("@2")))  # skips 12 examples
        np.testing.assert_array_equal(b2, batches[2][1])
        raw = [ex["image"] for ex in tfds.as_numpy(
            tfds.builder("mnist").as_dataset(split="test", shuffle_files=False))]
        np.testing.assert_array_equal(first[3, ..., 1], raw[3][..., 0].astype(np.float32))


def test_tfds_mock_applies_the_transform_and_rejects_a_too_large_batch():
    with tfds.testing.mock_data(num_examples=20):
        ds = data.load_dataset("cifar10", _small_transform())
        _, b = next(ds.batches(5))
        assert b.shape == (5, 12, 12, 3) and b.dtype == np.float32
        with pytest.raises(data.DataError, match="batch size 32 is larger than cifar10"):
            list(ds.batches(32))


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load_dataset("fashion_mnist", _identity, data_dir=str(tmp_path))
    msg = str(err.value)
    assert "not prepared" in msg and str(tmp_path) in msg
    assert "tfds build fashion_mnist" in msg and "--download" in msg


def test_unknown_dataset_name_lists_the_valid_ones():
    with pytest.raises(data.DataError) as err:
        data.load_dataset("no_such_dataset_xyz", _identity)
    msg = str(err.value)
    assert "unknown dataset 'no_such_dataset_xyz'" in msg
    for name in data.NAMED_DATASETS:
        assert name in msg


def _write_folder(root):
    rng = np.random.default_rng(0)
    sizes = {"b_cls": [(20, 30), (18, 18)], "a_cls": [(24, 16), (16, 40), (25, 25)]}
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for k, (h, w) in enumerate(shapes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img{k}.png")
    Image.fromarray(rng.integers(0, 256, size=(20, 20), dtype=np.uint8)).save(
        root / "b_cls" / "gray.png")
    (root / "b_cls" / "notes.txt").write_text("not an image")


def test_image_folder_sorted_order_varying_sizes_and_gray(tmp_path):
    _write_folder(tmp_path)
    transform = _small_transform()
    ds = data.load_dataset(str(tmp_path), transform)
    names = [f"{f.parent.name}/{f.name}" for f in ds.files]
    assert names == ["a_cls/img0.png", "a_cls/img1.png", "a_cls/img2.png", "b_cls/gray.png",
                     "b_cls/img0.png", "b_cls/img1.png"]
    _, batch = next(ds.batches(6))
    assert batch.shape == (6, 12, 12, 3)
    # torchvision's own evaluation transform on the PIL images, as the published pipeline did
    # (its resize is Pillow's): the same numbers to float rounding.
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(16), T.CenterCrop(12), T.ToTensor(),
                           T.Normalize(transform.mean, transform.std)])
    img = Image.open(tmp_path / "a_cls" / "img1.png")
    np.testing.assert_allclose(batch[1], reference(img).numpy().transpose(1, 2, 0), atol=1e-5)
    gray = Image.open(tmp_path / "b_cls" / "gray.png").convert("RGB")
    np.testing.assert_allclose(batch[3], reference(gray).numpy().transpose(1, 2, 0), atol=1e-5)
    with pytest.raises(data.DataError, match="larger than"):
        list(ds.batches(7))


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(data.DataError, match="holds no images"):
        data.load_dataset(str(tmp_path), _identity)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_dataset(str(tmp_path / "missing") + "/", _identity)
    image = tmp_path / "cls" / "one.png"  # an image itself was said not to exist
    image.write_bytes(b"png")
    for name in (str(image), "./" + os.path.relpath(image)):
        with pytest.raises(data.DataError, match="is a file, not a folder"):
            data.load_dataset(name, _identity)


def test_image_folder_bicubic_resize_is_pillows_as_published(tmp_path):
    # Sharp edges: a one-pass bicubic resize differs from Pillow's (which clips between its
    # passes) by many grey levels; the published pipeline resized PIL images with Pillow.
    from PIL import Image
    from torchvision import transforms as T

    (tmp_path / "cls").mkdir()
    edge = np.zeros((30, 40, 3), np.uint8)
    edge[:, 20:] = 255
    checker = (((np.arange(30)[:, None] // 4 + np.arange(44)[None] // 4) % 2) * 255).astype(
        np.uint8)
    Image.fromarray(edge).save(tmp_path / "cls" / "a.png")
    Image.fromarray(np.repeat(checker[..., None], 3, -1)).save(tmp_path / "cls" / "b.png")
    transform = EvalTransform(resize_size=16, crop_size=12, interpolation="bicubic")
    _, batch = next(data.load_dataset(str(tmp_path), transform).batches(2))
    reference = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(12), T.ToTensor(),
                           T.Normalize(transform.mean, transform.std)])
    for i, name in enumerate(("a.png", "b.png")):
        want = reference(Image.open(tmp_path / "cls" / name)).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(batch[i], want, atol=1e-5)


def test_image_folder_picks_the_files_torchvision_imagefolder_picks(tmp_path):
    # The published pipeline read folders with torchvision's ImageFolder: its extension list
    # (.pgm yes, .gif no, any case) and a recursive, sorted walk of each class folder.
    from torchvision import datasets

    img = Image.new("RGB", (9, 7), (10, 200, 30))
    for rel in ("cat/a.png", "cat/2019/b.png", "cat/2019/deep/c.JPG", "cat/z.gif",
                "dog/d.pgm", "dog/e.jpeg", "dog/notes.txt", "dog/B.webp"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("not an image")
        elif rel.endswith(".pgm"):
            img.convert("L").save(path)
        else:
            img.save(path, format={"JPG": "JPEG", "JPEG": "JPEG"}.get(
                path.suffix[1:].upper(), path.suffix[1:].upper()))
    ds = data.load_dataset(str(tmp_path), _identity)
    expected = [p for p, _ in datasets.ImageFolder(str(tmp_path)).samples]
    assert [str(f) for f in ds.files] == expected
    assert len(expected) == 6  # the .gif and the .txt are left out by both


def test_tfds_name_with_a_config_is_a_dataset_not_a_folder():
    for name in ("cifar10_corrupted/brightness_1", "imagenet_v2/matched-frequency",
                 "cifar10_corrupted/brightness_1:1.0.0"):
        assert not data.names_a_folder(name), name
    for name in ("imgs/val/", "some dir/x", "./cifar10_corrupted/brightness_1", "~/imgs"):
        assert data.names_a_folder(name), name
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_dataset("cifar10_corrupted/brightness_1", _small_transform())
        _, b = next(ds.batches(3))
        assert b.shape == (3, 12, 12, 3)
    with pytest.raises(data.DataError, match="No folder 'no_such_xyz/cfg' exists either"):
        data.load_dataset("no_such_xyz/cfg", _identity)


def test_tilde_is_expanded_in_folders_and_data_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "imgs" / "cls").mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(tmp_path / "imgs" / "cls" / "a.png")
    Image.new("RGB", (5, 5)).save(tmp_path / "imgs" / "cls" / "b.png")
    ds = data.load_dataset("~/imgs", _identity)
    assert ds.num_examples() == 2
    (tmp_path / "tfds").mkdir()
    with pytest.raises(data.DataError) as err:
        data.load_dataset("fashion_mnist", _identity, data_dir="~/tfds")
    assert f"not prepared in {tmp_path / 'tfds'}" in str(err.value)


def test_not_prepared_names_tfds_default_folder(monkeypatch, tmp_path):
    # With no data_dir TFDS looks in its default folder (TFDS_DATA_DIR at import, if set);
    # the advice must name that folder, not a hard-coded ~/tensorflow_datasets.
    from tensorflow_datasets.core import constants

    monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(tfds.core.utils.file_utils.constants, "DATA_DIR", str(tmp_path))
    with pytest.raises(data.DataError) as err:
        data.load_dataset("fashion_mnist", _identity)
    assert f"--data_dir {tmp_path}" in str(err.value)


def test_an_image_over_pillows_pixel_limit_is_a_data_error(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    (tmp_path / "cls").mkdir()
    for name in ("a.png", "b.png"):
        PILImage.new("RGB", (64, 64)).save(tmp_path / "cls" / name)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2 * 100: a "bomb"
    ds = data.load_dataset(str(tmp_path), _identity)
    with pytest.raises(data.DataError, match="cannot read image .*MAX_IMAGE_PIXELS"):
        list(ds.batches(2))
