"""A data set as training and evaluation hold it: Split and Dataset, and how many training
frames the validation split holds out. The IDX reader (data.py) and the image-folder reader
(image_folder.py) both build these, so they live below both."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import DataError

__all__ = ["Split", "Dataset", "validation_size", "VAL_FRACTION", "VAL_MIN", "FASHION_CLASSES"]

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
VAL_FRACTION = 1 / 12   # 5 000 of Fashion-MNIST's 60 000 training images
VAL_MIN = 200           # enough to place a threshold and stop early on a small data set


@dataclass
class Split:
    images: np.ndarray  # (N, C*H*W) uint8, channel-major (pipeline.floor.frames)
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    image_shape: tuple[int, int, int]   # (C, H, W) the images were fitted to
    classes: list[str] = field(default_factory=lambda: list(FASHION_CLASSES))


def validation_size(train_frames: int, fraction: float = VAL_FRACTION,
                    minimum: int = VAL_MIN) -> int:
    """Frames held out: `fraction` of the training set, at least `minimum` (fraction 0:
    exactly `minimum`); the rest trains."""
    size = max(minimum, round(fraction * train_frames))
    if size >= train_frames:
        raise DataError(f"the training set has {train_frames} images: holding out "
                        f"{size} for validation (train.val_fraction = {fraction}, at least "
                        f"train.val_min = {minimum}) leaves none to train on; lower "
                        f"train.val_min or train.val_fraction")
    return size
