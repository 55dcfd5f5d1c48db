"""The torch-free edge artifact, DIR/edge.npz: the contract between training (which writes
it beside edge.pt, same model id) and an edge device (which runs it with NumPy, or from the
C/ONNX export). Plain arrays, read with allow_pickle=False: no code crosses to a device.

    meta                 JSON as uint8 bytes: kind, format, model id, threshold, score,
                         temperature (the score is on softmax(exit logits / it); absent: 1),
                         classes, split (junctions on the edge), input_size, input_pad,
                         exit_layer (the layer the exit reads; absent: the split layer),
                         uplink_bits (0, or the unsigned bits the uplink was trained for),
                         input_shape [C, H, W] and resize (how frames are fitted: see
                         pipeline/protocol/frames.py; absent: [1, 28, 28], stretch),
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
                         code (pipeline/protocol/static_code.py); only when trained for one
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import ArtifactError

__all__ = ["EDGE_NPZ", "FORMAT", "UPLINK_CODE", "write_edge_npz", "read_edge_npz"]

EDGE_NPZ = "edge.npz"
UPLINK_CODE = "uplink.code"   # the key in edge.npz, edge.pt and server.pt alike
FORMAT = 1


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
    """(meta, arrays, file) from DIR or DIR/edge.npz; every problem is one ArtifactError."""
    path = Path(path)
    if path.is_dir():
        path = path / EDGE_NPZ
    if not path.is_file():
        hint = (" (trained by an older splitexit: `splitexit calibrate` on the folder writes "
                "it)" if (path.parent / "edge.pt").is_file() else "")
        raise ArtifactError(f"{path}: no such edge artifact{hint}; create it with "
                            f"`splitexit train`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path}: not a readable splitexit edge artifact ({e}); "
                            f"re-create it with `splitexit train`") from None
    if not isinstance(meta, dict) or meta.get("kind") != "edge" or \
            meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an edge artifact of format {FORMAT}; re-create it "
                            f"with `splitexit train`")
    return meta, arrays, path
