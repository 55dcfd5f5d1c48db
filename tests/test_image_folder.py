"""Image folders as data sets, and the frame conversion training and the edge share."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.floor import frames, image_folder
from pipeline.floor.data import write_idx
from pipeline.floor.frames import fit_frame, to_pixels
from pipeline.floor.image_folder import (is_image_folder, load_image_folder,
                                         load_image_folder_test)
from tests.image_sets import huge_png, write_colour_set

SMALL_VAL = {"val_fraction": 0.1, "val_min": 10}  # 200 images do not hold VAL_MIN out


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    write_colour_set(tmp_path / "flat", classes=3, per_class=60)
    return tmp_path / "flat"


@pytest.fixture
def split(tmp_path: Path) -> Path:
    write_colour_set(tmp_path / "split", classes=3, per_class=60, layout="split")
    return tmp_path / "split"


def solid(height: int, width: int, bgr: tuple[int, int, int]) -> np.ndarray:
    return np.full((height, width, 3), bgr, np.uint8)


# --- loading -----------------------------------------------------------------------------

def test_flat_layout_holds_out_a_fifth_of_each_class_for_test(flat: Path):
    data = load_image_folder(flat, shape=(1, 28, 28), **SMALL_VAL)
    assert data.classes == ["circle", "square", "triangle"]     # sorted folder names
    assert data.image_shape == (1, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (130, 14, 36)
    assert np.bincount(data.test.labels).tolist() == [12, 12, 12]
    assert data.train.images.shape == (130, 784) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int64


def test_split_layout_uses_its_test_folder_and_holds_val_out_of_train(split: Path):
    data = load_image_folder(split, shape=(3, 32, 32), **SMALL_VAL)
    assert data.classes == ["circle", "square", "triangle"]
    assert (len(data.train), len(data.val), len(data.test)) == (162, 18, 45)
    assert data.test.images.shape == (45, 3 * 32 * 32)


def test_a_val_folder_is_used_as_is(split: Path):
    for name in ("circle", "square", "triangle"):
        (split / "val" / name).mkdir(parents=True)
        for path in sorted((split / "test" / name).iterdir())[:5]:
            shutil.copy(path, split / "val" / name / path.name)
    a = load_image_folder(split, seed=0, **SMALL_VAL)
    b = load_image_folder(split, seed=1, **SMALL_VAL)
    assert (len(a.train), len(a.val), len(a.test)) == (180, 15, 45)
    assert np.array_equal(a.val.images, b.val.images)


def test_test_split_ignores_the_training_seed_and_validation_follows_it(flat: Path):
    a = load_image_folder(flat, seed=0, **SMALL_VAL)
    b = load_image_folder(flat, seed=1, **SMALL_VAL)
    assert np.array_equal(a.test.images, b.test.images)
    assert np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.val.images, b.val.images)
    # the same images in all, only held out differently
    together = [np.concatenate([d.train.images, d.val.images]) for d in (a, b)]
    assert sorted(map(bytes, together[0])) == sorted(map(bytes, together[1]))


def test_images_are_what_the_edge_would_see_for_the_same_file(split: Path):
    shape = (3, 24, 40)
    test, classes = load_image_folder_test(split, shape, "crop")
    first = sorted((split / "test" / classes[0]).iterdir())[0]
    assert np.array_equal(test.images[0],
                          fit_frame(cv2.imread(str(first), cv2.IMREAD_UNCHANGED), shape, "crop"))


def test_any_file_of_a_flat_folder_is_one_row_of_some_split(flat: Path):
    data = load_image_folder(flat, **SMALL_VAL)
    rows = np.concatenate([data.train.images, data.val.images, data.test.images])
    sample = sorted((flat / "square").iterdir())[7]
    expected = fit_frame(cv2.imread(str(sample), cv2.IMREAD_UNCHANGED))
    assert (rows == expected).all(axis=1).any()


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_test_only_load_gives_the_same_test_split(tmp_path: Path, layout: str):
    write_colour_set(tmp_path, per_class=40, layout=layout)
    data = load_image_folder(tmp_path, (3, 16, 16), "crop", seed=5, **SMALL_VAL)
    test, classes = load_image_folder_test(tmp_path, (3, 16, 16), "crop")
    assert classes == data.classes
    assert np.array_equal(test.images, data.test.images)
    assert np.array_equal(test.labels, data.test.labels)


def test_is_image_folder_tells_class_folders_from_idx_files(tmp_path: Path, flat: Path,
                                                            split: Path):
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    write_idx(idx / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    assert not is_image_folder(idx)
    assert not is_image_folder(tmp_path / "missing")
    assert is_image_folder(flat) and is_image_folder(split)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_loads_show_a_progress_bar_on_a_terminal_not_in_a_log(flat: Path, monkeypatch):
    monkeypatch.setattr(image_folder, "PROGRESS_MIN_FILES", 10)
    for stderr, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stderr)
        load_image_folder_test(flat, (1, 28, 28), "stretch")
        assert ("decoding images" in stderr.getvalue()) == shown


# --- errors: one line each, saying what to do ----------------------------------------------

def make_bad_folder(root: Path, case: str) -> Path:
    if case == "missing":
        return root / "nowhere"
    root.mkdir()
    if case == "no class folders":
        cv2.imwrite(str(root / "loose.png"), solid(8, 8, (0, 0, 0)))
    elif case == "one class":
        write_colour_set(root, classes=2, per_class=3)
        shutil.rmtree(root / "square")
    elif case == "empty class":
        write_colour_set(root, classes=2, per_class=3)
        (root / "bag").mkdir()
        (root / "bag" / "notes.txt").write_text("not an image")
    elif case == "classes differ":
        write_colour_set(root, classes=3, per_class=4, layout="split")
        (root / "test" / "square").rename(root / "test" / "box")
    elif case == "no test folder":
        write_colour_set(root, classes=2, per_class=4, layout="split")
        shutil.rmtree(root / "test")
    elif case == "undecodable":
        write_colour_set(root, classes=2, per_class=3)
        (root / "circle" / "broken.png").write_bytes(b"not a png")
    elif case == "16-bit":
        write_colour_set(root, classes=2, per_class=3)
        cv2.imwrite(str(root / "circle" / "deep.png"), np.full((8, 8), 4000, np.uint16))
    elif case == "huge":   # 48 KB that decodes to 400 MB: refused from its header
        write_colour_set(root, classes=2, per_class=3)
        (root / "circle" / "huge.png").write_bytes(huge_png(20000, 20000))
    return root


@pytest.mark.parametrize("case, words", [
    ("missing", ["does not exist", "DIR/<class>/"]),
    ("no class folders", ["holds images but has no class folders", "DIR/<class>/"]),
    ("one class", ["one class folder (circle)", "at least 2"]),
    ("empty class", ["bag has no images", "add some or remove the folder"]),
    ("classes differ", ["only in train: square", "only in test: box"]),
    ("no test folder", ["has train/ but no test/"]),
    ("undecodable", ["broken.png", "cannot decode", "delete or replace it"]),
    ("16-bit", ["deep.png", "16-bit", "8 bits"]),
    ("huge", ["huge.png", "20000 x 20000 pixels", "scale it down"]),
])
def test_a_bad_folder_is_one_data_error_saying_what_to_fix(tmp_path: Path, case, words):
    folder = make_bad_folder(tmp_path / "data", case)
    with pytest.raises(DataError) as error:
        load_image_folder(folder, val_min=1)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# --- fit_frame -----------------------------------------------------------------------------

def test_colour_becomes_gray_or_rgb_channel_major():
    red = solid(40, 60, (0, 0, 255))                    # OpenCV's BGR
    rgb = fit_frame(red, (3, 32, 32)).reshape(3, 32, 32)
    assert (rgb[0] == 255).all() and (rgb[1:] == 0).all()
    gray = fit_frame(red, (1, 28, 28))
    assert gray.shape == (784,) and (gray == 76).all()  # 0.299 * 255
    bgra = np.dstack([red, np.zeros((40, 60), np.uint8)])
    assert np.array_equal(fit_frame(bgra, (3, 32, 32)), rgb.reshape(-1))
    replicated = fit_frame(np.full((10, 10), 9, np.uint8), (3, 5, 5)).reshape(3, 5, 5)
    assert (replicated == 9).all()


def test_crop_keeps_the_centre_where_stretch_keeps_everything():
    # a wide image: red, green and blue thirds
    image = np.hstack([solid(20, 20, (0, 0, 255)), solid(20, 20, (0, 255, 0)),
                       solid(20, 20, (255, 0, 0))])
    cropped = fit_frame(image, (3, 10, 10), "crop").reshape(3, 10, 10)
    assert (cropped[1] == 255).all() and (cropped[[0, 2]] == 0).all()   # only green
    stretched = fit_frame(image, (3, 10, 10), "stretch").reshape(3, 10, 10)
    assert (stretched[0, :, 0] == 255).all() and (stretched[2, :, -1] == 255).all()
    tall = np.vstack([solid(20, 20, (0, 0, 255)), solid(20, 20, (0, 255, 0)),
                      solid(20, 20, (255, 0, 0))])
    assert (fit_frame(tall, (3, 10, 10), "crop").reshape(3, 10, 10)[1] == 255).all()


def test_enlarging_and_odd_shapes_work():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert fit_frame(image, (1, 9, 13), "crop").shape == (9 * 13,)
    assert fit_frame(image[:, :, None], (3, 2, 7), "stretch").shape == (3 * 2 * 7,)


def test_a_frame_already_in_the_models_form_needs_no_opencv(monkeypatch):
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    via_opencv = fit_frame(np.dstack([image] * 3))     # BGR -> gray of equal channels
    assert np.array_equal(via_opencv, image.reshape(-1))

    def no_opencv():
        raise AssertionError("OpenCV imported for a frame that needs no conversion")

    monkeypatch.setattr(frames, "opencv", no_opencv)
    assert np.array_equal(fit_frame(image), via_opencv)
    assert np.array_equal(fit_frame(image[:, :, None]), via_opencv)
    pixels = to_pixels(image)
    assert pixels.dtype == np.float32 and pixels.max() <= 1.0
    assert np.array_equal(pixels, image.reshape(-1).astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("image, shape, resize, words", [
    (np.zeros((8, 8), np.float32), (1, 28, 28), "stretch", "dtype float32"),
    (np.zeros((8, 8), np.uint16), (1, 28, 28), "stretch", "dtype uint16"),
    (np.zeros((2, 8, 8, 3), np.uint8), (1, 28, 28), "stretch", "shape (2, 8, 8, 3)"),
    (np.zeros((8, 8, 2), np.uint8), (1, 28, 28), "stretch", "shape (8, 8, 2)"),
    (np.zeros((0, 8), np.uint8), (1, 28, 28), "stretch", "empty"),
    (np.zeros((8, 8), np.uint8), (2, 28, 28), "stretch", "C must be 1 (gray) or 3"),
    (np.zeros((8, 8), np.uint8), (1, 28), "stretch", "give (C, H, W)"),
    (np.zeros((8, 8), np.uint8), (1, 28, 28), "zoom", "stretch, crop"),
])
def test_fit_frame_rejects_what_it_cannot_convert(image, shape, resize, words):
    with pytest.raises(ValueError) as error:
        fit_frame(image, shape, resize)
    assert words in str(error.value) and "\n" not in str(error.value)
