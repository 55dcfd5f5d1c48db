"""Hostile files (#25, findings 7 and 10): an edge.npz whose meta or tables lie is refused in
one line by every runtime that reads it (the NumPy edge, the C export, the ONNX export) before
anything is allocated or generated; a valid file's exported C runs clean under AddressSanitizer.
The files are built here with NumPy alone: no training needed."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.export.export_c import C_FILE, H_FILE, export_c
from pipeline.export.export_onnx import export_onnx
from pipeline.edge.numpy_head import load_numpy_head
from pipeline.errors import ArtifactError
from pipeline.floor.edge_artifact import EDGE_NPZ, write_edge_npz

CC = shutil.which("gcc") or shutil.which("cc")
RNG = np.random.default_rng(25)


def mlp(input_pad: int = 0, n_in: int = 784) -> tuple[dict, dict]:
    """A valid MLP head: 784 pixels (padded to input_pad) -> 16 (ELL, 8 inputs each) -> exit 10
    (dense)."""
    width = input_pad or n_in
    meta = {"model_id": "0123456789abcdef", "threshold": 0.5, "score": "max_softmax",
            "temperature": 1.0, "classes": [str(c) for c in range(10)], "split": 1,
            "input_size": 784, "input_pad": input_pad, "exit_layer": 1, "uplink_bits": 0,
            "input_shape": [1, 28, 28], "resize": "stretch", "exit_pool": 0, "convs": []}
    arrays = {"pixel_mean": np.float32(0.3), "pixel_std": np.float32(0.25),
              "layer0.values": RNG.normal(0, 0.1, (16, 8)).astype(np.float32),
              "layer0.indices": RNG.integers(0, width, (16, 8)).astype(np.uint16),
              "layer0.bias": RNG.normal(0, 0.1, 16).astype(np.float32),
              "exit.values": RNG.normal(0, 0.1, (10, 16)).astype(np.float32),
              "exit.bias": np.zeros(10, np.float32)}
    return meta, arrays


def conv() -> tuple[dict, dict]:
    """A valid conv head: 1 x 8 x 8 -> sparse conv to 4 channels (each reads 1), pool 2 ->
    exit 3."""
    meta = dict(mlp()[0], input_size=64, input_shape=[1, 8, 8], classes=["a", "b", "c"],
                convs=[{"stride": 1, "pool": 2}])
    arrays = {"pixel_mean": np.full(1, 0.3, np.float32), "pixel_std": np.full(1, 0.25, np.float32),
              "layer0.values": RNG.normal(0, 0.1, (4, 1, 3, 3)).astype(np.float32),
              "layer0.indices": np.zeros((4, 1), np.uint16),
              "layer0.bias": np.zeros(4, np.float32),
              "exit.values": RNG.normal(0, 0.1, (3, 64)).astype(np.float32),
              "exit.bias": np.zeros(3, np.float32)}
    return meta, arrays


def claiming(shape: tuple[int, ...]) -> bytes:
    """An npy member whose header claims `shape` of float32 but holds no data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_2_0(buffer, {"descr": "<f4", "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


def with_member(path: Path, name: str, data: bytes) -> None:
    """Replace (or add) one raw member of an npz."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n != f"{name}.npy"}
    members[f"{name}.npy"] = data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in members.items():
            zf.writestr(n, d)


def written(folder: Path, meta: dict, arrays: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_edge_npz(folder / EDGE_NPZ, meta, arrays)
    return folder


def _change(base, meta=None, arrays=None):
    def make(folder: Path) -> Path:
        m, a = base()
        m.update(meta or {})
        a.update(arrays or {})
        return written(folder, m, a)
    return make


def _member(base, name, data):
    def make(folder: Path) -> Path:
        path = written(folder, *base()) / EDGE_NPZ
        with_member(path, name, data)
        return folder
    return make


HOSTILE = {
    # finding 7: the C export declared float x[16] and wrote 784 values
    "input_pad below input_size": (_change(lambda: mlp(16, 16)),
                                   "meta: input_pad = 16 is smaller than input_size = 784"),
    "index past the inputs": (_change(mlp, arrays={"layer0.indices": np.full((16, 8), 784,
                                                                             np.uint16)}),
                              r"layer0.indices: values in \[784, 784\], outside the layer's "
                              r"784 inputs"),
    "index table of another shape": (_change(mlp, arrays={"layer0.indices": np.zeros(
        (16, 7), np.uint16)}), r"layer0.indices: shape \(16, 7\)"),
    "a member claiming 10^13 elements": (_member(mlp, "layer0.values", claiming((10**13,))),
                                         r"layer0.values: claims shape \(10000000000000,\)"),
    "an input shape of 10^10 pixels": (_change(mlp, meta={"input_shape": [1, 100000, 100000],
                                                          "input_size": 10**10}),
                                       r"meta: input_shape = \[1, 100000, 100000\]"),
    "a conv channel index out of range": (_change(conv, arrays={"layer0.indices": np.full(
        (4, 1), 5, np.uint16)}), r"layer0.indices: values in \[5, 5\], outside the layer's 1"),
    "a dense exit of the wrong width": (_change(mlp, arrays={"exit.values": np.zeros(
        (10, 17), np.float32)}), r"exit.values: shape \(10, 17\)"),
    "more exit outputs than classes": (_change(mlp, meta={"classes": ["a", "b"]}),
                                       "exit.values: 10 outputs for 2 classes"),
    "a NaN weight": (_change(mlp, arrays={"layer0.bias": np.full(16, np.nan, np.float32)}),
                     "layer0.bias: .*finite floats"),
}


def runtimes(folder: Path, out: Path) -> dict:
    return {"numpy": lambda: load_numpy_head(folder),
            "c": lambda: export_c(folder, out / "c"),
            "onnx": lambda: export_onnx(folder, out / "onnx")}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_every_runtime_refuses_a_hostile_edge_npz_in_one_line(case, tmp_path):
    make, match = HOSTILE[case]
    folder = make(tmp_path / "art")
    messages = set()
    for name, run in runtimes(folder, tmp_path).items():
        with pytest.raises(ArtifactError, match=match) as e:
            run()
        assert "\n" not in str(e.value) and str(folder / EDGE_NPZ) in str(e.value), name
        messages.add(str(e.value))
    assert len(messages) == 1                   # one validation, the same words everywhere
    assert not (tmp_path / "c").exists() and not (tmp_path / "onnx").exists()


def test_unknown_members_are_never_read(tmp_path):
    """A member the format does not name is skipped, however much it claims to hold (it
    was loaded: a 1.6 MB file became 1.6 GB, a 10^13-element claim a MemoryError)."""
    folder = written(tmp_path / "art", *mlp())
    with_member(folder / EDGE_NPZ, "junk", claiming((10**13,)))
    head = load_numpy_head(folder)
    assert head.exit.bias.shape == (10,)


def test_a_padded_file_s_tables_may_read_the_padding(tmp_path):
    """The rule is input_pad >= input_size, not == : a valid padded head still loads."""
    head = load_numpy_head(written(tmp_path / "art", *mlp(800)))
    assert head.input_pad == 800 and head.input_size == 784


def asan_works(tmp_path: Path) -> bool:
    if CC is None:
        return False
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    built = subprocess.run([CC, "-fsanitize=address", "-o", str(tmp_path / "probe"),
                            str(probe)], capture_output=True)
    return built.returncode == 0 and subprocess.run(
        [str(tmp_path / "probe")], env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"),
        capture_output=True).returncode == 0


MAIN = """#include <stdio.h>
#include "splitexit_head.h"
int main(void) {
    float pixels[SPLITEXIT_INPUT], features[SPLITEXIT_FEATURES], logits[SPLITEXIT_CLASSES];
    for (int i = 0; i < SPLITEXIT_INPUT; ++i)
        pixels[i] = (float)(i % 7) / 7.0f;
    splitexit_head(pixels, features, logits);
    for (int i = 0; i < SPLITEXIT_FEATURES; ++i) printf("%.9g\\n", features[i]);
    for (int i = 0; i < SPLITEXIT_CLASSES; ++i) printf("%.9g\\n", logits[i]);
    return 0;
}
"""


@pytest.mark.parametrize("base", [mlp, conv], ids=["mlp", "conv"])
def test_a_valid_export_runs_clean_under_address_sanitizer(base, tmp_path):
    if not asan_works(tmp_path):
        pytest.skip("no C compiler with -fsanitize=address here")
    folder = written(tmp_path / "art", *base())
    export_c(folder, tmp_path / "c")
    (tmp_path / "c" / "main.c").write_text(MAIN)
    subprocess.run([CC, "-std=c99", "-O1", "-g", "-fsanitize=address",
                    "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror", "-o",
                    str(tmp_path / "head"), str(tmp_path / "c" / "main.c"),
                    str(tmp_path / "c" / C_FILE)], check=True, capture_output=True)
    run = subprocess.run([str(tmp_path / "head")], capture_output=True, text=True,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0"),
                         timeout=60)
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, run.stderr
    head = load_numpy_head(folder)
    pixels = (np.arange(head.input_size) % 7 / np.float32(7)).astype(np.float32)[None]
    logits, features = head(pixels)
    printed = np.array(run.stdout.split(), np.float64)
    np.testing.assert_allclose(printed, np.concatenate([features[0], logits[0]]),
                               rtol=1e-4, atol=1e-5)


def test_the_export_guards_its_input_buffer_at_compile_time(tmp_path):
    """Defence in depth: a header edited to a larger SPLITEXIT_INPUT than the buffer the
    loops were generated for does not compile."""
    if CC is None:
        pytest.skip("no C compiler here")
    folder = written(tmp_path / "art", *mlp())
    export_c(folder, tmp_path / "c")
    header = tmp_path / "c" / H_FILE
    header.write_text(header.read_text().replace("#define SPLITEXIT_INPUT 784",
                                                 "#define SPLITEXIT_INPUT 800"))
    built = subprocess.run([CC, "-std=c99", "-c", "-o", str(tmp_path / "head.o"),
                            str(tmp_path / "c" / C_FILE)], capture_output=True, text=True)
    assert built.returncode != 0 and "splitexit_input_fits" in built.stderr


def test_the_export_command_refuses_the_finding_7_file_in_one_line(tmp_path):
    from tests.test_cli import one_line_failure, splitexit
    folder = HOSTILE["input_pad below input_size"][0](tmp_path / "art")
    for target in ("c", "onnx"):
        r = splitexit("export", str(folder), "--target", target, "--out", str(tmp_path / target))
        one_line_failure(r)
        assert "input_pad = 16 is smaller than input_size = 784" in r.stderr


def test_an_idx_file_is_read_no_further_than_its_header_says(tmp_path):
    """A .gz inflating to gigabytes is not decompressed: the header's claim is checked
    first, and a padded file is told from one byte past the claim."""
    import gzip

    from pipeline.errors import DataError
    from pipeline.floor.data import read_idx

    claim = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in (10**6, 10**4, 10**4))
    with gzip.open(tmp_path / "bomb.gz", "wb") as f:
        f.write(claim)
    with pytest.raises(DataError, match=r"\(1000000, 10000, 10000\) .* over the 4294967296"):
        read_idx(tmp_path / "bomb.gz")
    small = bytes([0, 0, 0x08, 2, 0, 0, 0, 4, 0, 0, 0, 3])
    with gzip.open(tmp_path / "padded.gz", "wb") as f:       # 12 pixels, then 64 MB more
        f.write(small + bytes(12))
        for _ in range(64):
            f.write(bytes(1 << 20))
    with pytest.raises(DataError, match=r"truncated or padded IDX file \(25\+ bytes, header "
                                        r"says 24\)"):
        read_idx(tmp_path / "padded.gz")


@pytest.mark.parametrize("data,match", [
    (b"not an npy array at all", "layer0.bias: not an npy array"),
    (b"", "layer0.bias: not an npy array"),
])
def test_a_member_that_is_not_an_array_is_named(data, match, tmp_path):
    folder = _member(mlp, "layer0.bias", data)(tmp_path / "art")
    with pytest.raises(ArtifactError, match=match) as e:
        load_numpy_head(folder)
    assert "\n" not in str(e.value)


def test_a_truncated_member_is_named(tmp_path):
    whole = io.BytesIO()
    np.save(whole, np.zeros(16, np.float32))
    folder = _member(mlp, "layer0.bias", whole.getvalue()[:-8])(tmp_path / "art")
    with pytest.raises(ArtifactError, match=r"layer0.bias: truncated: 56 of 64 bytes"):
        load_numpy_head(folder)
