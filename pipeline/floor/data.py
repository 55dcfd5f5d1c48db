"""Data sets from disk, for training and for an edge replaying a test split: Fashion-MNIST
(or any MNIST-format set) from standard IDX files, gzipped or not, or the user's own pictures
in one folder per class (image_folder.py). Torch-free: the edge reads its frames with it.

Debian's `dataset-fashion-mnist` puts the four files in /usr/share/datasets/fashion-mnist.
The validation split is held out from train with a seed; test is only read for evaluation.
Images come fitted to the model's input shape by the conversion the edge applies to its
frames (pipeline.floor.frames), so both see the same pixels.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.floor.splits import (FASHION_CLASSES, VAL_FRACTION, VAL_MIN, Dataset, Split,
                                   validation_size)
from pipeline.floor.frames import DEFAULT_SHAPE, fit_frame

__all__ = ["Split", "Dataset", "read_idx", "write_idx", "load_dataset", "load_test_split",
           "validation_size", "VAL_FRACTION", "VAL_MIN", "FASHION_CLASSES", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
              0x0E: ">f8"}
MAX_IDX_BYTES = 1 << 32  # 4 GiB: 70x Fashion-MNIST's training images
INSTALL_HINT = "install them with `apt-get install dataset-fashion-mnist` or pass --data DIR"


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (magic 0 0 dtype ndim, big-endian dims, then the data). The header
    is read first and the data no further than it says (at most MAX_IDX_BYTES): a small
    .gz that inflates to gigabytes is refused, not decompressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
                raise DataError(f"{path}: not an IDX file (bad magic number)")
            ndim = magic[3]
            dims_raw = f.read(4 * ndim)
            dims = tuple(int.from_bytes(dims_raw[4 * i: 4 * i + 4], "big")
                         for i in range(len(dims_raw) // 4))
            dtype = np.dtype(IDX_DTYPES[magic[2]])
            size = math.prod(dims) * dtype.itemsize
            if len(dims) != ndim or size > MAX_IDX_BYTES:
                raise DataError(f"{path}: an IDX header of shape {dims} ({size} bytes): "
                                f"truncated, or over the {MAX_IDX_BYTES} bytes read")
            data = f.read(size + 1)   # one byte more tells a padded file
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    header = 4 + 4 * ndim
    if len(data) != size:
        raise DataError(f"{path}: truncated or padded IDX file ({header + len(data)}"
                        f"{'+' if len(data) > size else ''} bytes, header says "
                        f"{header + size})")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzipped if the name ends in .gz); used for test data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"no {stem}[.gz] in {folder}: {INSTALL_HINT}")


def _fitted(images: np.ndarray, shape, resize: str) -> np.ndarray:
    """(N, H, W) uint8 images as (N, C*H*W) pixels of the model's input shape."""
    if tuple(shape) == (1, *images.shape[1:]):
        return images.reshape(len(images), -1).copy()   # writable, not the file's buffer
    return np.stack([fit_frame(image, tuple(shape), resize) for image in images])


def load_test_split(folder: str | Path, shape=DEFAULT_SHAPE, resize: str = "stretch") -> Split:
    """Only the test split (an edge replaying it needs neither the training set's memory nor
    its time), fitted to `shape` (channels, height, width)."""
    from pipeline.floor.image_folder import is_image_folder, load_image_folder_test

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist: {INSTALL_HINT}")
    if is_image_folder(folder):
        return load_image_folder_test(folder, tuple(shape), resize)[0]
    images = read_idx(_find(folder, FILES["test_images"]))
    labels = read_idx(_find(folder, FILES["test_labels"]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{folder}: test images {images.shape} and labels {labels.shape} do "
                        f"not match (want (N, H, W) and (N,))")
    return Split(_fitted(images, shape, resize), labels.astype(np.int64))


def load_dataset(folder: str | Path, val_fraction: float = VAL_FRACTION, seed: int = 0,
                 val_min: int = VAL_MIN, shape=DEFAULT_SHAPE, resize: str = "stretch"
                 ) -> Dataset:
    """Load the four IDX files, or an image folder; hold out a random `val_fraction` of the
    training frames (at least `val_min`) for validation. Images are fitted to `shape`
    (channels, height, width) as `resize` says."""
    from pipeline.floor.image_folder import is_image_folder, load_image_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist: {INSTALL_HINT}")
    if is_image_folder(folder):
        return load_image_folder(folder, tuple(shape), resize, val_fraction, seed, val_min)
    arrays = {key: read_idx(_find(folder, stem)) for key, stem in FILES.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {part} images {images.shape} and labels "
                            f"{labels.shape} do not match (want (N, H, W) and (N,))")
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    val_size = validation_size(len(train_labels), val_fraction, val_min)
    order = np.random.default_rng(seed).permutation(len(train_labels))
    val_idx, train_idx = order[:val_size], order[val_size:]

    def split(images, labels, idx=None):
        if idx is not None:
            images, labels = images[idx], labels[idx]
        return Split(_fitted(images, shape, resize), labels.astype(np.int64))

    return Dataset(train=split(train_images, train_labels, train_idx),
                   val=split(train_images, train_labels, val_idx),
                   test=split(arrays["test_images"], arrays["test_labels"]),
                   image_shape=tuple(shape))
