"""Datasets of stored images: image folders and TFDS datasets (``affjax.data.load_dataset``
opens them by name or path; both need the ``data`` extra, ``pip install 'affjax[data]'``).

A folder is read as torchvision's ``ImageFolder`` reads it. A TFDS dataset is read with
``shuffle_files=False`` from ``data_dir``; nothing downloads unless ``download=True``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from affjax.data import DEFAULT_SPLITS
from affjax.data import DataError
from affjax.data import Dataset
from affjax.data import Transform
from affjax.data import unknown_dataset_message

# torchvision's ImageFolder list, so a folder gives the published pipeline's images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

PREPARE_HINT = (
    "Prepare it once with `tfds build {name} --data_dir {data_dir}` (or rerun this command with "
    "--download), then point --data-dir at that folder. imagenet2012 cannot be downloaded "
    "automatically: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a manual folder "
    "and run `tfds build imagenet2012 --data_dir {data_dir} --manual_dir MANUAL_DIR` (or pass "
    "--download --manual-dir MANUAL_DIR)."
)


class ImageFolder(Dataset):
    """Images under ``root/CLASS/...``, chosen and ordered as torchvision's ``ImageFolder``.

    Classes are the sorted subfolders of ``root``; each class folder is walked
    recursively (links followed), folders and files in sorted order, keeping the
    files whose names end in one of ``IMAGE_EXTENSIONS`` (any case), torchvision's
    list. Images are read with Pillow.

    Images are converted to RGB uint8; images of different sizes are transformed
    one at a time (the transform must bring them to one shape).

    Args:
      root: the folder, one subfolder per class.
      transform: the evaluation transform.

    Raises:
      DataError: no images under ``root``, or an image Pillow cannot read.

    Example:
      >>> import tempfile
      >>> from PIL import Image
      >>> root = Path(tempfile.mkdtemp())
      >>> for cls in ("cat", "dog"):
      ...     (root / cls).mkdir()
      ...     Image.new("RGB", (4, 4), (200, 0, 0)).save(root / cls / "a.png")
      >>> ds = ImageFolder(root, lambda im: im.astype(np.float32) / 255)
      >>> ds.num_examples(), [f.parent.name for f in ds.files]
      (2, ['cat', 'dog'])
      >>> images = ds.batch(0, 2)
      >>> images.shape, images.dtype, round(float(images[0, 0, 0, 0]), 4)
      ((2, 4, 4, 3), dtype('float32'), 0.7843)
    """

    def __init__(self, root: str | os.PathLike, transform: Transform):
        super().__init__(transform)
        self.root = Path(root).expanduser()
        self.name = str(root)
        classes = sorted(p for p in self.root.iterdir() if p.is_dir())
        self.files = [Path(top, f) for c in classes
                      for top, _, files in sorted(os.walk(c, followlinks=True))
                      for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.files:
            raise DataError(
                f"image folder {self.root} holds no images: expected one subfolder per class "
                f"with files ending in {', '.join(IMAGE_EXTENSIONS)}.")

    def num_examples(self) -> int:
        return len(self.files)

    def _examples(self, start: int, count: int) -> list[np.ndarray]:
        from PIL import Image

        out = []
        for f in self.files[start:start + count]:
            try:
                with Image.open(f) as im:
                    out.append(np.asarray(im.convert("RGB")))
            except Image.DecompressionBombError as e:
                raise DataError(f"cannot read image {f}: {e} (if the file is trusted, raise "
                                "PIL.Image.MAX_IMAGE_PIXELS)") from None
            except OSError as e:
                raise DataError(f"cannot read image {f}: {e}") from None
        return out


def _image_key(features: Any, name: str) -> str:
    import tensorflow_datasets as tfds

    keys = [k for k, v in features.items() if isinstance(v, tfds.features.Image)]
    if not keys:
        raise DataError(f"TFDS dataset {name!r} has no image feature (features: "
                        f"{sorted(features.keys())}); only image datasets can be used.")
    return "image" if "image" in keys else keys[0]


class TFDSImages(Dataset):
    """A TFDS image dataset, read in file order (``shuffle_files=False``).

    Args:
      name: TFDS name (``"cifar10"``, ``"imagenet2012"``, ``"oxford_flowers102"``, ...).
      split: TFDS split, slicing allowed (``"test"``, ``"validation[:10%]"``); default
        ``"test"`` (``"validation"`` for imagenet2012).
      data_dir: the TFDS data folder (default: TFDS's own, ``~/tensorflow_datasets``).
      download: download and prepare the dataset if needed (off by default).
      manual_dir: folder with manually downloaded archives (imagenet2012).

    Raises:
      DataError: unknown name, dataset not prepared (the message gives the
        ``tfds build`` command), unknown split, no image feature.

    Example:
      >>> ds = TFDSImages("cifar10", transform, data_dir="~/tensorflow_datasets")  # doctest: +SKIP
      >>> next(ds.batches(128))[1].shape   # doctest: +SKIP
      (128, 224, 224, 3)
    """

    def __init__(self, name: str, transform: Transform, *, split: str | None = None,
                 data_dir: str | None = None, download: bool = False,
                 manual_dir: str | None = None):
        super().__init__(transform)
        import tensorflow_datasets as tfds

        self.name = name
        self.split = split or DEFAULT_SPLITS.get(name, "test")
        # TFDS does not expand "~" itself; the shell does not either in --data-dir=~/...
        data_dir = None if data_dir is None else os.path.expanduser(data_dir)
        manual_dir = None if manual_dir is None else os.path.expanduser(manual_dir)
        self.data_dir = data_dir
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError and friends
            raise DataError(unknown_dataset_message(name, str(e).splitlines()[0])) from None
        if download:
            config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            self.builder.download_and_prepare(download_config=config)
        self.image_key = _image_key(self.builder.info.features, name)
        self._cursor: tuple[int, Iterator] | None = None
        self._open(0)  # fails now, with a clear message, if the data is not there

    def _not_prepared(self, detail: str) -> DataError:
        # Where TFDS looked: the folder given, else its default (TFDS_DATA_DIR when it was
        # set as TFDS was imported, else ~/tensorflow_datasets).
        from tensorflow_datasets.core import constants

        data_dir = self.data_dir or constants.DATA_DIR
        return DataError(
            f"TFDS dataset {self.name!r} (split {self.split!r}) is not prepared in {data_dir} "
            f"({detail}). " + PREPARE_HINT.format(name=self.name, data_dir=data_dir))

    def _open(self, start: int) -> None:
        import tensorflow_datasets as tfds

        # Images stay encoded until after the skip: a resumed run does not decode the
        # examples of the batches it already has.
        try:
            ds = self.builder.as_dataset(
                split=self.split, shuffle_files=False,
                decoders={self.image_key: tfds.decode.SkipDecoding()},
            )
        except AssertionError as e:  # TFDS's "could not find data in ..."
            raise self._not_prepared(str(e).split(".")[0]) from None
        except (KeyError, ValueError) as e:
            raise DataError(
                f"TFDS dataset {self.name!r} has no split {self.split!r}: {e}. Splits: "
                f"{sorted(self.builder.info.splits.keys()) or 'unknown (not prepared)'}."
            ) from None
        if start:
            ds = ds.skip(start)
        image = self.builder.info.features[self.image_key]
        ds = ds.map(lambda example: image.decode_example(example[self.image_key]))
        self._cursor = (start, iter(tfds.as_numpy(ds)))

    def num_examples(self) -> int | None:
        try:
            return int(self.builder.info.splits[self.split].num_examples)
        except (KeyError, ValueError, TypeError):
            return None  # sliced or unknown split: found out while reading

    def _examples(self, start: int, count: int) -> list[np.ndarray]:
        if self._cursor is None or self._cursor[0] != start:
            self._open(start)
        position, it = self._cursor
        out = []
        for example in it:
            out.append(np.asarray(example))
            if len(out) == count:
                break
        self._cursor = (position + len(out), it)
        return out


def list_tfds_image_datasets() -> list[str]:
    """All TFDS dataset names (TFDS does not tag image datasets before loading their info).

    Needs ``tensorflow-datasets``; importing it takes seconds and TFDS may look
    for community datasets on the network (skipped in the doctest for that).

    Returns:
      Sorted list of builder names.

    Example:
      >>> "cifar10" in list_tfds_image_datasets()   # doctest: +SKIP
      True
    """
    import tensorflow_datasets as tfds

    return sorted(tfds.list_builders())
