"""A data set from image folders, one folder per class: the user's own pictures beside
Fashion-MNIST's IDX files.

Two layouts:
- split: DIR/train/<class>/*, DIR/test/<class>/* and optionally DIR/val/<class>/*; without
  val/, validation is held out from train with the training seed, as for IDX data.
- flat: DIR/<class>/*; a fixed `test_fraction` of each class is the test set, drawn with a
  fixed seed so it stays the same whatever train.seed is (results stay comparable across
  seeds); validation is then held out from the rest with the training seed.

Every image goes through `pipeline.floor.frames.fit_frame`, the conversion the edge uses,
so training sees exactly the pixels the edge sees for the same picture. Classes are the sorted
class folder names; files are taken in sorted order; names starting with "." are ignored
(editor and macOS debris), as are files without an image extension.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import DataError
from pipeline.floor.splits import VAL_FRACTION, VAL_MIN, Dataset, Split, validation_size
from pipeline.floor.frames import (DEFAULT_SHAPE, IMAGE_EXTENSIONS, RESIZE_MODES,
                                      check_shape, fit_frame, opencv, read_image)

__all__ = ["is_image_folder", "load_image_folder", "load_image_folder_test", "TEST_FRACTION"]

TEST_FRACTION = 0.2
TEST_SEED = 20240       # fixed, not train.seed: the test set must not move with the seed
PROGRESS_MIN_FILES = 2000  # fewer decode in a few seconds: no bar
SPLIT_PARTS = ("train", "test")
LAYOUT_HINT = ("put each class's images in DIR/<class>/, or in DIR/train/<class>/ and "
               "DIR/test/<class>/")

Files = list[tuple[Path, int]]  # (image file, label), in the order the split holds them


def _is_image(path: Path) -> bool:
    return (path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
            and path.is_file())


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_images(folder: Path) -> bool:
    return any(_is_image(p) for p in folder.iterdir())


def is_image_folder(folder: str | Path) -> bool:
    """Whether `folder` holds class folders of images (either layout), not IDX files."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for sub in _subfolders(folder):
        if _has_images(sub):
            return True
        if sub.name in (*SPLIT_PARTS, "val") and any(_has_images(c) for c in _subfolders(sub)):
            return True
    return False


def _class_files(root: Path) -> dict[str, list[Path]]:
    """Class name -> its sorted image files, for the class folders of `root`."""
    classes = {}
    for sub in _subfolders(root):
        files = sorted(p for p in sub.iterdir() if _is_image(p))
        if not files:
            raise DataError(f"class folder {sub} has no images (extensions "
                            f"{' '.join(IMAGE_EXTENSIONS)}): add some or remove the folder")
        classes[sub.name] = files
    if not classes:
        stray = "holds images but " if _has_images(root) else ""
        raise DataError(f"{root} {stray}has no class folders: {LAYOUT_HINT}")
    if len(classes) < 2:
        raise DataError(f"{root} has one class folder ({next(iter(classes))}): a classifier "
                        f"needs at least 2; add another")
    return classes


def _same_classes(folder: Path, part: str, train: list[str], other: list[str]) -> None:
    if train != other:
        only_train = ", ".join(sorted(set(train) - set(other))) or "none"
        only_other = ", ".join(sorted(set(other) - set(train))) or "none"
        raise DataError(f"{folder}: train and {part} class folders differ (only in train: "
                        f"{only_train}; only in {part}: {only_other}); give both the same "
                        f"class folders")


def _labelled(by_class: dict[str, list[Path]]) -> Files:
    return [(path, label) for label, files in enumerate(by_class.values()) for path in files]


def _flat_test(by_class: dict[str, list[Path]], fraction: float) -> tuple[Files, Files]:
    """(rest, test): `fraction` of each class, at least one, drawn with TEST_SEED."""
    rest, test = [], []
    for label, (name, files) in enumerate(by_class.items()):
        if len(files) < 2:
            raise DataError(f"class {name} has {len(files)} image: holding out a test image "
                            f"leaves none to train on; add images")
        size = min(len(files) - 1, max(1, round(fraction * len(files))))
        # seeded per class by its name: adding a class does not reshuffle the others' tests
        rng = np.random.default_rng([TEST_SEED, zlib.crc32(name.encode())])
        chosen = np.zeros(len(files), bool)
        chosen[rng.permutation(len(files))[:size]] = True
        test += [(path, label) for path, pick in zip(files, chosen) if pick]
        rest += [(path, label) for path, pick in zip(files, chosen) if not pick]
    return rest, test


def _plan(folder: Path, test_fraction: float) -> tuple[list[str], dict[str, Files]]:
    """The classes and the files of each part ("train", "test", and "val" if the folder has
    one), from listing alone: nothing is decoded yet."""
    try:
        return _list_parts(folder, test_fraction)
    except OSError as e:
        raise DataError(f"cannot read {e.filename or folder}: {e.strerror}") from None


def _list_parts(folder: Path, test_fraction: float) -> tuple[list[str], dict[str, Files]]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist: {LAYOUT_HINT}")
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction {test_fraction}: give a number between 0 and 1")
    present = [part for part in SPLIT_PARTS if (folder / part).is_dir()]
    if not present:
        by_class = _class_files(folder)
        rest, test = _flat_test(by_class, test_fraction)
        return list(by_class), {"train": rest, "test": test}
    if len(present) == 1:
        missing = next(p for p in SPLIT_PARTS if p not in present)
        raise DataError(f"{folder} has {present[0]}/ but no {missing}/: add "
                        f"{folder / missing}/<class>/ or use the flat layout DIR/<class>/")
    parts = {part: _class_files(folder / part) for part in SPLIT_PARTS}
    if (folder / "val").is_dir():
        parts["val"] = _class_files(folder / "val")
    classes = list(parts["train"])
    for part in parts:
        _same_classes(folder, part, classes, list(parts[part]))
    return classes, {part: _labelled(by_class) for part, by_class in parts.items()}


@contextmanager
def _progress(total: int) -> Iterator:
    """A tqdm bar for long loads on a terminal; nothing for short ones, in a log file or
    without tqdm."""
    bar = None
    if total > PROGRESS_MIN_FILES:
        with suppress(ImportError):
            from tqdm import tqdm
            bar = tqdm(total=total, desc="decoding images", unit="img", leave=False,
                       disable=None)   # None: off unless stderr is a terminal
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _decode(files: Files, shape: tuple[int, int, int], resize: str, bar) -> Split:
    images = np.empty((len(files), int(np.prod(shape))), np.uint8)
    for row, (path, _) in enumerate(files):
        try:
            image = read_image(path)
        except ValueError as e:   # undecodable, or too large to decode (from its header)
            raise DataError(f"{path}: {e}; delete or replace it") from None
        if image.dtype != np.uint8:
            depth = "16-bit" if image.dtype.itemsize == 2 else f"{image.dtype}"
            raise DataError(f"{path} is a {depth} image: convert it to 8 bits per channel "
                            f"or delete it")
        try:
            images[row] = fit_frame(image, shape, resize)
        except ValueError as e:
            raise DataError(f"{path}: {e}; convert or delete it") from None
        if bar is not None:
            bar.update()
    labels = np.array([label for _, label in files], np.int64)
    return Split(images, labels)


def _check_args(shape: tuple[int, int, int], resize: str) -> tuple[int, int, int]:
    # before any file is read, so a bad argument is not blamed on the first image
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize!r}: give one of {', '.join(RESIZE_MODES)}")
    return check_shape(shape)


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    # OpenCV warns on stderr about a file it cannot read; the DataError says it in one line
    cv2 = opencv()
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def load_image_folder(folder: str | Path, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                      resize: str = "stretch", val_fraction: float = VAL_FRACTION,
                      seed: int = 0, val_min: int = VAL_MIN,
                      test_fraction: float = TEST_FRACTION) -> Dataset:
    """Train, validation and test splits of an image folder, each image fitted to `shape`
    (C, H, W); validation is `val_fraction` of train (at least `val_min`) drawn with `seed`,
    unless the folder has its own val/."""
    shape = _check_args(shape, resize)
    classes, parts = _plan(Path(folder), test_fraction)
    if "val" not in parts:
        val_size = validation_size(len(parts["train"]), val_fraction, val_min)
        # the same draw as load_dataset's, so IDX and folder data hold out alike
        order = np.random.default_rng(seed).permutation(len(parts["train"]))
        train = parts["train"]
        parts["val"] = [train[i] for i in order[:val_size]]
        parts["train"] = [train[i] for i in order[val_size:]]
    with _quiet_opencv(), _progress(sum(len(files) for files in parts.values())) as bar:
        splits = {part: _decode(files, shape, resize, bar) for part, files in parts.items()}
    return Dataset(train=splits["train"], val=splits["val"], test=splits["test"],
                   image_shape=shape, classes=classes)


def load_image_folder_test(folder: str | Path, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                           resize: str = "stretch",
                           test_fraction: float = TEST_FRACTION) -> tuple[Split, list[str]]:
    """Only the test split and the classes: an edge replaying the test set needs neither the
    training images' memory nor their decoding time. The same split as load_image_folder."""
    shape = _check_args(shape, resize)
    classes, parts = _plan(Path(folder), test_fraction)
    with _quiet_opencv(), _progress(len(parts["test"])) as bar:
        return _decode(parts["test"], shape, resize, bar), classes
