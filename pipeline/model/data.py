"""The data-set readers' old home, kept because scripts outside the package (benchmarks/)
import it: the readers live in pipeline.floor.data, torch-free, where the edge reads its
replayed frames too. New code imports pipeline.floor.data."""

from pipeline.floor.data import (FASHION_CLASSES, FASHION_MNIST_DIR, FILES, INSTALL_HINT,
                                 VAL_FRACTION, VAL_MIN, Dataset, Split, _find, load_dataset,
                                 load_test_split, read_idx, validation_size, write_idx)

__all__ = ["Split", "Dataset", "read_idx", "write_idx", "load_dataset", "load_test_split",
           "validation_size", "VAL_FRACTION", "VAL_MIN", "FASHION_CLASSES", "FASHION_MNIST_DIR",
           "FILES", "INSTALL_HINT", "_find"]
