"""`splitexit export --target c`: the head as C99, compiled with the system compiler and
called through ctypes. float32 equals the torch head; the dense twin exports the same way."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pipeline.edge.export_c import C_FILE, H_FILE, export_c
from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.model.artifacts import load_edge
from pipeline.model.data import load_dataset
from tests.test_cli import one_line_failure, splitexit

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc) on this machine")
P = ctypes.POINTER(ctypes.c_float)


def compiled(art, out, variant):
    """Export, compile strictly (C99, every warning an error) into a shared library."""
    export_c(art, out, variant)
    source = (out / C_FILE).read_text()
    assert [line for line in source.splitlines() if line.startswith("#include")] == \
        ["#include <stdint.h>", f'#include "{H_FILE}"']  # no libc beyond <stdint.h>
    assert "malloc" not in source
    subprocess.run([CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror",
                    "-shared", "-fPIC", "-o", str(out / "head.so"), str(out / C_FILE)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(out / "head.so"))


def run_c(lib, head, pixels):
    features = np.zeros((len(pixels), head.width), np.float32)
    logits = np.zeros((len(pixels), head.exit.bias.shape[0]), np.float32)
    for i in range(len(pixels)):
        frame = np.ascontiguousarray(pixels[i])
        lib.splitexit_head(frame.ctypes.data_as(P), features[i].ctypes.data_as(P),
                           logits[i].ctypes.data_as(P))
    return logits, features


@needs_cc
@pytest.mark.parametrize("which", ["sparse", "dense twin"])
def test_the_float32_c_head_equals_the_torch_head(which, artifacts, dense_twin, idx_dir,
                                                  tmp_path):
    art = artifacts if which == "sparse" else dense_twin
    head = load_numpy_head(art)
    lib = compiled(art, tmp_path, "float32")
    pixels = load_dataset(idx_dir, val_size=200).test.images.astype(np.float32) / 255
    logits, features = run_c(lib, head, pixels)
    torch_head = load_edge(art).head  # built outside inference mode: a trainable module
    with torch.inference_mode():
        t_logits, t_features = torch_head(torch.from_numpy(pixels))
    np.testing.assert_allclose(features, t_features.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=1e-5)
    source = (tmp_path / C_FILE).read_text()
    assert ("_index" in source) == (which == "sparse")  # ELL tables only where sparse


@needs_cc
def test_the_int8_c_head_has_quarter_size_tables_and_mostly_the_same_decisions(
        artifacts, idx_dir, tmp_path):
    head = load_numpy_head(artifacts)
    lib = compiled(artifacts, tmp_path, "int8")
    assert "static const int8_t layer0_values" in (tmp_path / C_FILE).read_text()
    pixels = load_dataset(idx_dir, val_size=200).test.images.astype(np.float32) / 255
    logits, _ = run_c(lib, head, pixels)
    reference, _ = head(pixels)
    same = (exit_scores(logits, head.score) >= head.threshold) == \
        (exit_scores(reference, head.score) >= head.threshold)
    assert same.mean() >= 0.95


def test_export_documents_its_targets_and_refuses_bad_input_in_one_line(artifacts, tmp_path):
    r = splitexit("export", "--help")
    assert r.returncode == 0 and "--target" in r.stdout and "C99" in r.stdout
    one_line_failure(splitexit("export", str(artifacts), "--target", "vhdl"))
    one_line_failure(splitexit("export", str(tmp_path / "nowhere")))
    r = splitexit("export", str(artifacts), "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / C_FILE).is_file() and (tmp_path / "c" / H_FILE).is_file()
