"""Image datasets for signatures: TFDS datasets, ``random`` images and local image folders.

Every dataset yields batches of preprocessed images, ``(N, H, W, 3)`` float32 (channels last),
in a fixed order, batch by batch (nothing is materialised beyond one batch):

* **TFDS** (``cifar10``, ``cifar100``, ``fashion_mnist``, ``mnist``, ``imagenet2012`` and any
  TFDS image dataset by name): read with ``shuffle_files=False`` from ``data_dir``; nothing
  downloads unless ``download=True``. ``imagenet2012`` cannot be downloaded by TFDS: its
  archives go into a manual folder (see ``affjax.data_readers.PREPARE_HINT``).
* **random**: standard-normal images of shape 256x256x3 (NHWC; the published pipeline drew
  3x256x256 NCHW), 10 000 of them, seed 987 (see :class:`RandomImages` for the preprocessing).
* **a folder** with one subfolder per class (sorted class names, sorted file names).

Preprocessing is the model's evaluation transform (``affjax.models.eval_transform(name)``, or
any callable mapping ``(N, H, W, 3)`` uint8 images to float32); grayscale images are repeated to
3 channels first. Batches are cut like a PyTorch ``DataLoader(drop_last=True)``: an incomplete
last batch is dropped, and a batch size larger than the split is an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

NAMED_DATASETS: tuple[str, ...] = (
    "random", "cifar10", "cifar100", "fashion_mnist", "mnist", "imagenet2012",
)
DEFAULT_SPLITS = {"imagenet2012": "validation"}
RANDOM_SHAPE = (256, 256, 3)
RANDOM_SIZE = 10_000
RANDOM_SEED = 987
# A TFDS name with an optional config and version: "cifar10_corrupted/brightness_1:1.0.0".
_TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[\w.-]+)?(:[\w.*]+)?")

Transform = Callable[[Any], Any]


class DataError(ValueError):
    """A dataset cannot be read as asked (unknown name, not prepared, too small, ...).

    A ``ValueError``; the message names the dataset or path and says what to do.
    """


def _to_rgb(images: np.ndarray) -> np.ndarray:
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] == 4:  # RGBA: drop alpha
        return images[..., :3]
    return images


def _pil_resized(transform: Transform, image: np.ndarray) -> np.ndarray:
    # The published pipeline read every dataset as PIL images, so their resize is Pillow's.
    from affjax.models.transforms import EvalTransform

    if isinstance(transform, EvalTransform) and image.dtype == np.uint8:
        return transform.resize_with_pillow(image)
    return image


def _apply(transform: Transform, images: Sequence[np.ndarray]) -> np.ndarray:
    """Transform a list of HWC images: as one stacked batch when they share a shape."""
    images = [_pil_resized(transform, _to_rgb(np.asarray(im))) for im in images]
    if all(im.shape == images[0].shape for im in images):
        out = transform(np.stack(images))
    else:  # varying sizes (ImageNet, folders): one image at a time, then stack
        out = np.stack([np.asarray(transform(im[None]))[0] for im in images])
    return np.asarray(out, np.float32)


@dataclasses.dataclass(frozen=True)
class BatchSelection:
    """Which batches to use: all, the first ``count``, or the indices ``start`` to ``stop``.

    Parsed from the command line by :func:`parse_batches`: ``"all"``, ``"K"`` (the first K
    batches), ``"@I"`` (batch I only, counting from 0) or ``"I:J"`` (batches I..J-1).

    Attributes:
      start: first batch index, from 0.
      stop: one past the last batch index, or ``None`` for "to the end".

    Example:
      >>> selection = BatchSelection(2, 5)
      >>> str(selection), list(selection.indices(4)), selection.indices(None)
      ('2:5', [2, 3], range(2, 5))
      >>> BatchSelection(3).indices(None) is None   # to the end, end unknown
      True
    """

    start: int = 0
    stop: int | None = None  # None: to the end of the data

    def indices(self, available: int | None) -> range | None:
        """The batch indices, or ``None`` when "to the end" with an unknown end."""
        stop = self.stop
        if available is not None:
            stop = available if stop is None else min(stop, available)
        return None if stop is None else range(self.start, stop)

    def __str__(self) -> str:
        if self.stop is None:
            return "all" if self.start == 0 else f"{self.start}:"
        if self.start == 0:
            return str(self.stop)
        if self.stop == self.start + 1:
            return f"@{self.start}"
        return f"{self.start}:{self.stop}"


def parse_batches(spec: str) -> BatchSelection:
    """Parse ``"all"``, ``"K"``, ``"@I"`` or ``"I:J"`` (see :class:`BatchSelection`).

    Args:
      spec: the ``--batches`` text.

    Returns:
      A :class:`BatchSelection`; ``str()`` of it gives the text back.

    Raises:
      DataError: anything else (K <= 0, J <= I, negative I, not a number).

    Example:
      >>> parse_batches("3"), parse_batches("@4")
      (BatchSelection(start=0, stop=3), BatchSelection(start=4, stop=5))
      >>> parse_batches("2:"), str(parse_batches("2:"))
      (BatchSelection(start=2, stop=None), '2:')
      >>> parse_batches("0")
      Traceback (most recent call last):
      ...
      affjax.data.DataError: --batches '0' is not understood: ...
    """
    text = str(spec).strip()
    try:
        if text == "all":
            return BatchSelection()
        if text.startswith("@"):
            i = int(text[1:])
            if i >= 0:
                return BatchSelection(i, i + 1)
        elif ":" in text:
            a, b = text.split(":", 1)
            start = int(a) if a else 0
            stop = int(b) if b else None
            if start >= 0 and (stop is None or stop > start):
                return BatchSelection(start, stop)
        else:
            k = int(text)
            if k > 0:
                return BatchSelection(0, k)
    except ValueError:
        pass
    raise DataError(
        f"--batches {spec!r} is not understood: use 'all', a count K > 0 (the first K batches), "
        "'@I' (only batch I, counting from 0) or 'I:J' (batches I to J-1)."
    )


class Dataset:
    """A sequence of images read in a fixed order and cut into batches.

    Subclasses implement :meth:`num_examples` and :meth:`_examples`. Only full
    batches are used (a partial last batch is dropped), so every batch has the
    same shape and the scores compile once.

    Args:
      transform: the model's evaluation transform, applied per batch to
        ``(N, H, W, 3)`` images; returns float32 NHWC.

    Example:
      >>> class Ramp(Dataset):
      ...     name = "ramp"
      ...     def num_examples(self):
      ...         return 5
      ...     def _examples(self, start, count):
      ...         stop = min(5, start + count)
      ...         return [np.full((2, 2, 3), i, np.uint8) for i in range(start, stop)]
      >>> ds = Ramp(lambda im: im.astype(np.float32))
      >>> ds.num_batches(2), ds.batch(1, 2)[:, 0, 0, 0].tolist(), ds.batch(2, 2)
      (2, [2.0, 3.0], None)
    """

    name: str
    split: str | None = None

    def __init__(self, transform: Transform):
        self.transform = transform

    def num_examples(self) -> int | None:
        """Number of examples, or ``None`` if unknown before reading."""
        raise NotImplementedError

    def _examples(self, start: int, count: int) -> list[np.ndarray]:
        """Up to ``count`` raw HWC images from position ``start`` (fewer at the end)."""
        raise NotImplementedError

    def num_batches(self, batch_size: int) -> int | None:
        n = self.num_examples()
        return None if n is None else n // batch_size

    def check_batch_size(self, batch_size: int) -> None:
        """Raise :class:`DataError` if the split has fewer examples than one batch."""
        if batch_size < 2:
            raise DataError(f"--batch-size must be at least 2 (a covariance needs two samples), "
                            f"got {batch_size}.")
        n = self.num_examples()
        if n is not None and batch_size > n:
            raise DataError(self._too_small(batch_size, n))

    def _too_small(self, batch_size: int, n: int) -> str:
        where = f"{self.name}" + (f" split {self.split!r}" if self.split else "")
        return (f"batch size {batch_size} is larger than {where}, which has {n} examples: "
                f"choose --batch-size {n} or less.")

    def raw_batch(self, index: int, batch_size: int) -> list[np.ndarray] | None:
        """The images of batch ``index`` as read, before :meth:`prepare`; ``None`` past the
        last full batch."""
        raw = self._examples(index * batch_size, batch_size)
        if len(raw) < batch_size:
            if index == 0:
                raise DataError(self._too_small(batch_size, len(raw)))
            return None
        return raw

    def prepare(self, raw: Sequence[np.ndarray]) -> np.ndarray:
        """Images as read (a :meth:`raw_batch`) through the transform: ``(N, H, W, 3)`` float32.

        Grayscale images are repeated to 3 channels, alpha is dropped, uint8 images are
        resized by Pillow when the transform is the zoo's (see the module docstring).
        """
        return _apply(self.transform, raw)

    def batch(self, index: int, batch_size: int) -> np.ndarray | None:
        """Batch ``index`` (from 0), preprocessed; ``None`` past the last full batch."""
        raw = self.raw_batch(index, batch_size)
        return None if raw is None else self.prepare(raw)

    def batches(
        self, batch_size: int, selection: BatchSelection = BatchSelection(), *,
        skip: Sequence[int] = (), prepare: bool = True,
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, images)`` for the selected batches, skipping the indices in ``skip``.

        ``images`` is ``(batch_size, H, W, 3)`` float32; with ``prepare=False`` it is the
        list of images as read, for the caller to pass to :meth:`prepare` (to time reading
        and preprocessing apart, say).
        """
        self.check_selection(batch_size, selection)
        done = set(skip)
        available = self.num_batches(batch_size)
        index = selection.start
        while selection.stop is None or index < selection.stop:
            if available is not None and index >= available:
                return
            if index not in done:
                images = self.raw_batch(index, batch_size)
                if images is not None and prepare:
                    images = self.prepare(images)
                if images is None:
                    if selection.stop is not None or index == selection.start:
                        raise DataError(self._past_end(selection, batch_size, index))
                    return
                yield index, images
            index += 1

    def check_selection(self, batch_size: int, selection: BatchSelection) -> None:
        """Raise :class:`DataError` if the batch size or the selected batches do not fit.

        Where the number of examples is unknown before reading, batches past the end are
        found (and reported) when the iteration reaches them.
        """
        self.check_batch_size(batch_size)
        available = self.num_batches(batch_size)
        if available is not None and (selection.start >= available or (
                selection.stop is not None and selection.stop > available)):
            raise DataError(self._past_end(selection, batch_size, available))

    def _past_end(self, selection: BatchSelection, batch_size: int, available: int) -> str:
        return (f"--batches {selection} asks for batches that {self.name} does not have: it has "
                f"{available} full batches of {batch_size} examples (the last incomplete batch "
                "is dropped).")


class RandomImages(Dataset):
    """Standard-normal images, the published pipeline's ``random`` dataset.

    Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, shape 256x256x3 float32,
    so any batch can be drawn alone (resuming does not replay earlier batches) and an image does
    not depend on the batch size. The published pipeline drew ``torch.randn(3, 256, 256)``
    images (a different stream; the distribution is the same).

    Preprocessing: the images are passed as floats through the model's evaluation transform,
    which resizes the shorter side to its resize size (a no-op for the 256-pixel resize of most
    torchvision weights), centre-crops, and normalises ``(v - mean) / std``, with no scaling to
    [0, 1] and no clipping. This is what torchvision's evaluation transform does to a float
    tensor, so it matches the published pipeline.

    Args:
      transform: the evaluation transform.
      seed: the stream's seed.
      size: number of images.
      shape: ``(H, W, 3)`` of each image.

    Example:
      >>> ds = RandomImages(lambda im: im, size=6, shape=(8, 8, 3))
      >>> [(i, b.shape, b.dtype) for i, b in ds.batches(3)]
      [(0, (3, 8, 8, 3), dtype('float32')), (1, (3, 8, 8, 3), dtype('float32'))]
      >>> bool(np.array_equal(ds.batch(1, 3)[0], ds.batch(3, 1)[0]))   # image 3 either way
      True
    """

    def __init__(self, transform: Transform, *, seed: int = RANDOM_SEED, size: int = RANDOM_SIZE,
                 shape: tuple[int, int, int] = RANDOM_SHAPE):
        super().__init__(transform)
        self.name, self.seed, self.size, self.shape = "random", int(seed), int(size), shape

    def num_examples(self) -> int:
        return self.size

    def _examples(self, start: int, count: int) -> list[np.ndarray]:
        stop = min(self.size, start + count)
        return [np.random.default_rng([self.seed, i]).standard_normal(self.shape, np.float32)
                for i in range(start, stop)]


def unknown_dataset_message(name: str, detail: str = "") -> str:
    """The error text for a dataset name that is neither known, a TFDS name, nor a folder.

    Args:
      name: the name as the user gave it.
      detail: why it was rejected, added in parentheses when given.

    Returns:
      One line that names the dataset and lists what is accepted.

    Example:
      >>> print(unknown_dataset_message("cifar11", "not a TFDS name"))
      unknown dataset 'cifar11' (not a TFDS name). Use one of random, cifar10, ... the path of a
      folder with one subfolder of images per class.
    """
    return (
        f"unknown dataset {name!r}{f' ({detail})' if detail else ''}. Use one of "
        f"{', '.join(NAMED_DATASETS)}, any TFDS image dataset name (see `affjax datasets`), or "
        "the path of a folder with one subfolder of images per class."
    )


def names_a_folder(name: str) -> bool:
    """Whether :func:`load_dataset` reads ``name`` as an image folder.

    * An existing folder is a folder, except a bare name in ``NAMED_DATASETS``: with a
      folder ``mnist`` in the working directory, ``"mnist"`` is the TFDS dataset and
      ``"./mnist"`` the folder.
    * A path that does not exist is a folder (reading it then fails) when it is absolute or
      starts with ``.`` or ``~``, or when it has a separator but is not a TFDS name with a
      config (``"cifar10_corrupted/brightness_1"``, ``"imagenet_v2/matched-frequency"``).
    * Any other name is a TFDS name.

    Example:
      >>> names_a_folder("./mnist"), names_a_folder("mnist"), names_a_folder("random")
      (True, False, False)
      >>> names_a_folder("~/no-such-images"), names_a_folder("imagenet_v2/matched-frequency")
      (True, False)
    """
    if name == "random":
        return False
    path = Path(name).expanduser()
    if path.is_dir():
        return name not in NAMED_DATASETS
    if name.startswith((".", "~")) or path.is_absolute():
        return True
    separators = [s for s in (os.sep, os.altsep) if s]
    return any(s in name for s in separators) and not _TFDS_NAME.fullmatch(name)


def load_dataset(
    name: str,
    transform: Transform,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    manual_dir: str | None = None,
    seed: int = RANDOM_SEED,
    random_size: int = RANDOM_SIZE,
) -> Dataset:
    """Open a dataset by name: ``"random"``, an existing folder path, or a TFDS name.

    Args:
      name: see the module docstring. A path (with a separator, or starting with ``.``)
        is a folder; a bare name is a folder if one exists, except for the names in
        ``NAMED_DATASETS``, which always mean the dataset (``"./mnist"`` for a folder).
      transform: the model's evaluation transform (``(N, H, W, 3)`` uint8 -> float32 NHWC).
      split, data_dir, download, manual_dir: TFDS options (see
        :class:`affjax.data_readers.TFDSImages`).
      seed, random_size: the ``random`` dataset's seed and number of images.

    Returns:
      A :class:`Dataset`; iterate with ``dataset.batches(batch_size, selection)``.

    Raises:
      DataError: unknown name, dataset not prepared (the message says how to prepare it),
        unknown split, empty folder.

    Example:
      >>> ds = load_dataset("random", lambda im: im[:, :224, :224])
      >>> index, images = next(ds.batches(4))
      >>> images.shape
      (4, 224, 224, 3)
    """
    if name == "random":
        return RandomImages(transform, seed=seed, size=random_size)
    if names_a_folder(name):
        path = Path(name).expanduser()
        if path.exists() and not path.is_dir():
            raise DataError(f"{name!r} is a file, not a folder: give the folder that holds "
                            "one folder of images per class (root/class/image.png, "
                            "torchvision's ImageFolder layout).")
        if not path.is_dir():
            raise DataError(f"image folder {name!r} does not exist.")
        from affjax.data_readers import ImageFolder

        return ImageFolder(name, transform)
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        raise DataError(
            f"dataset {name!r} needs tensorflow-datasets: pip install 'affjax[data]'.") from None
    from affjax.data_readers import TFDSImages

    try:
        return TFDSImages(name, transform, split=split, data_dir=data_dir, download=download,
                          manual_dir=manual_dir)
    except DataError as e:
        if Path(name).is_dir():
            raise DataError(f"{e} (To read the folder {name!r} here instead, pass "
                            f"--dataset ./{name}.)") from None
        if os.sep in name:
            raise DataError(f"{e} (No folder {name!r} exists either.)") from None
        raise


# Readers of stored images, in affjax.data_readers (which imports this module).
_MOVED = ("ImageFolder", "IMAGE_EXTENSIONS", "TFDSImages", "PREPARE_HINT",
          "list_tfds_image_datasets")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from affjax import data_readers

        return getattr(data_readers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
