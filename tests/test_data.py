import gzip

import numpy as np
import pytest

from pipeline.floor.data import load_dataset, read_idx, write_idx
from pipeline.errors import DataError
from tests.conftest import make_idx_dataset


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / name, images)
    assert np.array_equal(read_idx(tmp_path / name), images)


def test_truncated_file_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 3), np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "x")


def test_not_idx_and_not_gzip(tmp_path):
    (tmp_path / "x").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "x")
    (tmp_path / "y.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "y.gz")


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load_dataset(tmp_path)


def test_validation_is_held_out_from_train_and_test_untouched(tmp_path):
    folder = make_idx_dataset(tmp_path / "d", n_train=300, n_test=50, gz=False)
    data = load_dataset(folder, val_fraction=0.2, seed=1, val_min=1)
    assert (len(data.train), len(data.val), len(data.test)) == (240, 60, 50)
    assert data.image_shape == (1, 28, 28) and data.train.images.shape[1] == 784
    everything = np.concatenate([data.train.images, data.val.images])
    original = read_idx(folder / "train-images-idx3-ubyte").reshape(300, -1)
    assert sorted(map(bytes, everything)) == sorted(map(bytes, original))
    assert np.array_equal(data.test.images, read_idx(folder / "t10k-images-idx3-ubyte")
                          .reshape(50, -1))
    again = load_dataset(folder, val_fraction=0.2, seed=1, val_min=1)
    assert np.array_equal(again.val.images, data.val.images)  # seeded


def test_validation_is_a_fraction_with_a_floor_and_too_little_data_names_the_keys(tmp_path):
    folder = make_idx_dataset(tmp_path / "d", n_train=300, n_test=10, gz=False)
    assert len(load_dataset(folder, val_fraction=0.1, val_min=50).val) == 50   # the floor
    assert len(load_dataset(folder, val_fraction=0.3, val_min=50).val) == 90   # the fraction
    with pytest.raises(DataError, match="train.val_min or train.val_fraction"):
        load_dataset(folder, val_min=300)


def test_gz_and_plain_files_both_found(tmp_path):
    folder = make_idx_dataset(tmp_path / "d", n_train=50, n_test=10, gz=True)
    assert len(load_dataset(folder, val_fraction=0, val_min=10).test) == 10
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
        assert len(f.read()) == 8 + 10
