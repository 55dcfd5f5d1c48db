"""The torch-free edge artifact, DIR/edge.npz: the contract between training (which writes
it beside edge.pt, same model id) and an edge device (which runs it with NumPy, or from the
C/ONNX export). Plain arrays, read with allow_pickle=False: no code crosses to a device.

    meta                 JSON as uint8 bytes: kind, format, model id, threshold, score,
                         temperature (the score is on softmax(exit logits / it); absent: 1),
                         classes, split (junctions on the edge), input_size, input_pad,
                         exit_layer (the layer the exit reads; absent: the split layer),
                         uplink_bits (0, or the unsigned bits the uplink was trained for),
                         input_shape [C, H, W] and resize (how frames are fitted: see
                         pipeline/floor/frames.py; absent: [1, 28, 28], stretch),
                         convs (per conv layer, first on the edge: stride and pool; absent
                         or empty: an MLP), exit_pool (a conv exit's average pool side)
    pixel_mean, pixel_std   () over all pixels, or (C,) per channel for a conv model
    layer{i}.values      (N_out, d_in) float32 ELL values, or (N_out, N_in) when dense;
                         a conv: (C_out, d_in, k, k) real kernels ("same" padding k // 2)
    layer{i}.indices     (N_out, d_in) input (a conv: input channel) of each value, uint16
                         when N_in <= 65536; absent when dense
    layer{i}.bias        (N_out,)
    exit.values / exit.indices / exit.bias
    uplink.code          (W_split, 2^uplink_bits) symbol frequencies of the static entropy
                         code (pipeline/floor/static_code.py); only when trained for one
    unfamiliar.whiten    (d,) or (d, d) and unfamiliar.means (classes, d): the
                         unfamiliarity score on the d features the exit reads
                         (pipeline/floor/unfamiliar.py), with meta unfamiliar_threshold
                         (null: never flag) and unfamiliar_flag_rate; absent: no score

The file may come from anyone, and the NumPy edge, the C export and the ONNX export all read
it here: only the members above are read, each one's npy header checked against a byte cap
before anything is allocated, and every shape and index table against the layout the meta
claims (an index past its layer's inputs would be an out-of-bounds read in the exported C).
A file that breaks a rule is one ArtifactError naming the file, the member and the rule.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import ArtifactError
from pipeline.floor.frames import RESIZE_MODES

__all__ = ["EDGE_NPZ", "FORMAT", "UPLINK_CODE", "UNFAMILIAR", "write_edge_npz",
           "read_edge_npz", "MAX_SIDE", "MAX_WIDTH", "MAX_ARRAY_BYTES", "MAX_LAYERS", "MAX_KERNEL"]

EDGE_NPZ = "edge.npz"
UPLINK_CODE = "uplink.code"   # the key in edge.npz, edge.pt and server.pt alike
UNFAMILIAR = "unfamiliar"     # the prefix of the unfamiliarity score's two members
FORMAT = 1
# Upper bounds on what an edge artifact (and a model config) may describe, so that a hostile
# or mistyped file is refused before it allocates: generous for a camera head (Fashion-MNIST
# is 1 x 28 x 28 and its largest layer 12 544 values).
MAX_SIDE = 2048               # frame height and width in pixels
MAX_WIDTH = 1 << 24           # values in any layer's input or output, flattened (64 MiB f32)
MAX_ARRAY_BYTES = 1 << 28     # one array as decoded; also a conv's im2col for one frame
MAX_TOTAL_BYTES = 1 << 29     # all arrays of one file together
MAX_META_BYTES = 1 << 16
MAX_LAYERS = 64
MAX_KERNEL = 31               # a conv kernel's side
UPLINK_BITS = (0, 2, 4, 8)
_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}


class _Invalid(Exception):
    """What is wrong with one member (or the meta): read_edge_npz adds the file."""

    def __init__(self, member: str, what: str):
        super().__init__(f"{member}: {what}")


def write_edge_npz(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> int:
    """Write atomically (a reader never sees half a file); returns its size in bytes."""
    meta = {"kind": "edge", "format": FORMAT, **meta}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path.stat().st_size


def read_edge_npz(path: str | Path) -> tuple[dict, dict[str, np.ndarray], Path]:
    """(meta, arrays, file) from DIR or DIR/edge.npz, checked as the module docstring says;
    every problem is one ArtifactError."""
    path = Path(path)
    if path.is_dir():
        path = path / EDGE_NPZ
    if not path.is_file():
        hint = (" (trained by an older splitexit: `splitexit calibrate` on the folder writes "
                "it)" if (path.parent / "edge.pt").is_file() else "")
        raise ArtifactError(f"{path}: no such edge artifact{hint}; create it with "
                            f"`splitexit train`")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = _meta(_member(zf, "meta", MAX_META_BYTES))
            arrays, budget = {}, MAX_TOTAL_BYTES
            for name in _members(meta, zf):
                arrays[name] = _member(zf, name, min(MAX_ARRAY_BYTES, budget))
                budget -= arrays[name].nbytes
        _check_arrays(meta, arrays)
    except _Invalid as e:
        raise ArtifactError(f"{path}: {e}; re-create it with `splitexit train`") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, NotImplementedError) as e:
        raise ArtifactError(f"{path}: not a readable splitexit edge artifact ({e}); "
                            f"re-create it with `splitexit train`") from None
    return meta, arrays, path


def _member(zf: zipfile.ZipFile, name: str, limit: int) -> np.ndarray:
    """One array, its header checked against `limit` bytes before its data is read."""
    try:
        info = zf.getinfo(f"{name}.npy")
    except KeyError:
        raise _Invalid(name, "missing") from None
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in _HEADERS:
                raise _Invalid(name, f"npy format {version} is not one numpy.savez writes")
            shape, fortran, dtype = _HEADERS[version](f)
        except ValueError as e:
            raise _Invalid(name, f"not an npy array ({e})") from None
        if dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None \
                or len(shape) > 4 or min(shape, default=0) < 0:
            raise _Invalid(name, f"an array of dtype {dtype} and {len(shape)} dimensions: "
                                 f"expected numbers, at most 4 dimensions")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > limit:
            raise _Invalid(name, f"claims shape {shape} ({nbytes} bytes), over the "
                                 f"{limit} bytes an edge artifact may hold")
        array = np.empty(shape[::-1] if fortran else shape, dtype)
        view = array.reshape(-1).view(np.uint8)
        got = 0
        while got < nbytes and (n := f.readinto(view[got:])):
            got += n
        if got < nbytes:
            raise _Invalid(name, f"truncated: {got} of {nbytes} bytes")
    return array.T if fortran else array


def _int(meta: dict, key: str, low: int, high: int, default: int | None = None) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Invalid("meta", f"{key} = {value!r} must be an integer in [{low}, {high}]")
    return value


def _meta(raw: np.ndarray) -> dict:
    """The meta, its every number within range (convs' strides and pools included)."""
    try:
        meta = json.loads(raw.tobytes())
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError, JSONDecodeError too
        raise _Invalid("meta", f"not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != "edge" or \
            meta.get("format") != FORMAT:
        raise _Invalid("meta", f"not an edge artifact of format {FORMAT}")
    split = _int(meta, "split", 1, MAX_LAYERS)
    shape = meta.setdefault("input_shape", [1, 28, 28])
    if not isinstance(shape, list) or len(shape) != 3 or shape[0] not in (1, 3) or \
            not all(isinstance(v, int) and 1 <= v <= MAX_SIDE for v in shape[1:]):
        raise _Invalid("meta", f"input_shape = {shape!r} must be [1 or 3, height, width], "
                               f"sides in [1, {MAX_SIDE}]")
    size = _int(meta, "input_size", 1, MAX_WIDTH)
    if size != math.prod(shape):
        raise _Invalid("meta", f"input_size = {size} must be the pixels of input_shape "
                               f"{shape}: {math.prod(shape)}")
    convs = meta.setdefault("convs", [])
    if not isinstance(convs, list) or len(convs) > split or not all(
            isinstance(c, dict) for c in convs):
        raise _Invalid("meta", f"convs must list at most split = {split} layers")
    for conv in convs:
        _int(conv, "stride", 1, MAX_SIDE)
        _int(conv, "pool", 1, MAX_SIDE)
    pad = _int(meta, "input_pad", 0, 0 if convs else MAX_WIDTH)
    if pad and pad < size:
        raise _Invalid("meta", f"input_pad = {pad} is smaller than input_size = {size} (0: "
                               f"no padding)")
    exit_layer = _int(meta, "exit_layer", 1, split, split)
    _int(meta, "exit_pool", 0, MAX_SIDE if exit_layer <= len(convs) else 0, 0)
    _int(meta, "uplink_bits", 0, 8, 0)
    if meta["uplink_bits"] not in UPLINK_BITS:
        raise _Invalid("meta", f"uplink_bits = {meta['uplink_bits']} must be one of "
                               f"{', '.join(map(str, UPLINK_BITS))}")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_WIDTH or not all(
            isinstance(c, str) for c in classes):
        raise _Invalid("meta", "classes must be a list of class names")
    flag_rate = meta.get("unfamiliar_flag_rate", 0.0)
    if isinstance(flag_rate, bool) or not isinstance(flag_rate, (int, float)) or \
            not 0 <= flag_rate < 1:
        raise _Invalid("meta", f"unfamiliar_flag_rate = {flag_rate!r} must be in [0, 1)")
    for key in ("threshold", "temperature", "unfamiliar_threshold"):
        value = meta.get(key, 1.0)
        if key == "unfamiliar_threshold" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise _Invalid("meta", f"{key} = {value!r} must be a finite number")
    if not isinstance(meta.get("model_id"), str) or not isinstance(meta.get("score"), str) \
            or meta.get("resize", "stretch") not in RESIZE_MODES:
        raise _Invalid("meta", f"model_id and score must be strings and resize one of "
                               f"{', '.join(RESIZE_MODES)}")
    return meta


def _members(meta: dict, zf: zipfile.ZipFile) -> list[str]:
    """The members this layout reads; optional ones only where present. Others are never
    read (an unknown member costs nothing however large it claims to be)."""
    present = set(zf.namelist())
    names = ["pixel_mean", "pixel_std"]
    for layer in [f"layer{i}" for i in range(meta["split"])] + ["exit"]:
        names += [f"{layer}.values", f"{layer}.bias"]
        if f"{layer}.indices.npy" in present:
            names.append(f"{layer}.indices")
    if f"{UPLINK_CODE}.npy" in present:
        names.append(UPLINK_CODE)
    if f"{UNFAMILIAR}.means.npy" in present:
        names += [f"{UNFAMILIAR}.whiten", f"{UNFAMILIAR}.means"]
    return names


def _finite(arrays: dict, name: str, ndim: int) -> np.ndarray:
    array = arrays[name]
    if array.ndim != ndim or array.dtype.kind != "f" or not np.isfinite(array).all():
        raise _Invalid(name, f"shape {array.shape} {array.dtype}: expected {ndim} dimensions "
                             f"of finite floats")
    return array


def _index_table(arrays: dict, name: str, shape: tuple[int, ...], n_in: int) -> None:
    """Every index in [0, n_in): what keeps each runtime's gather inside its input."""
    indices = arrays.get(f"{name}.indices")
    if indices is None:
        return
    if indices.shape != shape or indices.dtype.kind not in "iu":
        raise _Invalid(f"{name}.indices", f"shape {indices.shape} {indices.dtype}: expected "
                                          f"integers of shape {shape}")
    if indices.size and not 0 <= indices.min() <= indices.max() < n_in:
        raise _Invalid(f"{name}.indices", f"values in [{indices.min()}, {indices.max()}], "
                                          f"outside the layer's {n_in} inputs")


def _junction(arrays: dict, name: str, n_in: int) -> int:
    """Check one junction reading n_in values; returns its N_out."""
    values = _finite(arrays, f"{name}.values", 2)
    bias = _finite(arrays, f"{name}.bias", 1)
    n_out, d_in = values.shape
    dense = f"{name}.indices" not in arrays
    if bias.shape != (n_out,) or not 1 <= n_out <= MAX_WIDTH or not (
            d_in == n_in if dense else 1 <= d_in <= n_in):
        raise _Invalid(f"{name}.values", f"shape {values.shape} with bias {bias.shape} does "
                                         f"not fit {n_in} inputs "
                                         f"({'dense' if dense else 'ELL: d_in <= inputs'})")
    _index_table(arrays, name, values.shape, n_in)
    return n_out


def _conv(arrays: dict, name: str, shape: tuple[int, ...], layout: dict) -> tuple[int, ...]:
    """Check one conv (and its pool) on a C x H x W input; returns its output shape."""
    c_in, h, w = shape
    weight = _finite(arrays, f"{name}.values", 4)
    bias = _finite(arrays, f"{name}.bias", 1)
    c_out, d_in, k, k2 = weight.shape
    dense = f"{name}.indices" not in arrays
    if bias.shape != (c_out,) or k != k2 or not 1 <= k <= MAX_KERNEL or not (
            d_in == c_in if dense else 1 <= d_in <= c_in):
        raise _Invalid(f"{name}.values", f"kernels {weight.shape} with bias {bias.shape} do "
                                         f"not fit {c_in} input channels (square kernels of "
                                         f"side <= {MAX_KERNEL})")
    _index_table(arrays, name, weight.shape[:2], c_in)
    stride, pool = layout["stride"], layout["pool"]
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    out = (c_out, ho // pool, wo // pool)
    if min(out) < 1 or math.prod(out) > MAX_WIDTH or \
            c_in * k * k * ho * wo * 4 > MAX_ARRAY_BYTES:
        raise _Invalid(f"{name}.values", f"a {c_in} x {h} x {w} input gives {out} outputs "
                                         f"(stride {stride}, pool {pool}): none, or over the "
                                         f"limits ({MAX_WIDTH} values)")
    return out


def _unfamiliar(arrays: dict, classes: int, d: int) -> None:
    """The score's tables fit the d features the exit reads, for every class."""
    if f"{UNFAMILIAR}.means" not in arrays:
        return
    means = _finite(arrays, f"{UNFAMILIAR}.means", 2)
    whiten = arrays[f"{UNFAMILIAR}.whiten"]
    if means.shape != (classes, d):
        raise _Invalid(f"{UNFAMILIAR}.means", f"shape {means.shape}: expected ({classes} "
                                              f"classes, {d} features the exit reads)")
    if whiten.shape not in ((d,), (d, d)):
        raise _Invalid(f"{UNFAMILIAR}.whiten", f"shape {whiten.shape}: expected ({d},) or "
                                               f"({d}, {d})")
    _finite(arrays, f"{UNFAMILIAR}.whiten", whiten.ndim)


def _check_arrays(meta: dict, arrays: dict) -> None:
    """Each layer against the one before it, from the input shape to the exit and uplink."""
    convs = meta["convs"]
    stats = () if not convs else (meta["input_shape"][0],)
    for name in ("pixel_mean", "pixel_std"):
        array = _finite(arrays, name, len(stats))
        if array.shape != stats or name == "pixel_std" and not (array > 0).all():
            raise _Invalid(name, f"shape {array.shape}: expected {stats}"
                                 f"{', all > 0' if name == 'pixel_std' else ''}")
    shape = tuple(meta["input_shape"]) if convs else (meta["input_pad"] or meta["input_size"],)
    outputs = []
    for i in range(meta["split"]):
        if i < len(convs):
            shape = _conv(arrays, f"layer{i}", shape, convs[i])
        else:
            shape = (_junction(arrays, f"layer{i}", math.prod(shape)),)
        outputs.append(shape)
    seen = outputs[meta["exit_layer"] - 1]
    if meta["exit_pool"]:
        seen = (seen[0], meta["exit_pool"], meta["exit_pool"])
    if _junction(arrays, "exit", math.prod(seen)) != len(meta["classes"]):
        raise _Invalid("exit.values", f"{arrays['exit.bias'].shape[0]} outputs for "
                                      f"{len(meta['classes'])} classes")
    read = outputs[meta["exit_layer"] - 1]   # a conv map's channel means, or all of it
    _unfamiliar(arrays, len(meta["classes"]),
                read[0] if meta["exit_layer"] <= len(convs) else math.prod(read))
    code = arrays.get(UPLINK_CODE)
    if code is not None and (code.dtype.kind not in "iu" or not meta["uplink_bits"] or
                             code.shape != (math.prod(outputs[-1]), 1 << meta["uplink_bits"])):
        raise _Invalid(UPLINK_CODE, f"shape {code.shape} {code.dtype}: expected integers of "
                                    f"({math.prod(outputs[-1])} features, 2^uplink_bits "
                                    f"symbols)")
