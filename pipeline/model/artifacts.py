"""Edge and server artifacts: what goes to the camera board and what goes to the server pool.

    DIR/edge.pt     head + exit + preprocessing statistics + threshold + model id
    DIR/edge.npz    the same head for a torch-free edge (pipeline.edge.numpy_head reads it)
    DIR/server.pt   tail + the same model id

Each half also carries the temperature its confidence is computed at (softmax(logits / T),
fitted on validation; absent in older artifacts: 1), so a 0.9-confident answer is right about
90 % of the time and the exit threshold means what it says.

A model trained for its uplink also carries, in all three, the code lengths of its static
entropy code (pipeline.floor.static_code), so the edge and the worker code alike.

Each half carries its unfamiliarity score (pipeline.floor.unfamiliar; absent in older
artifacts: none): the edge's on the features its exit reads, the tail's on its final
classifier's input.

Both are plain dicts of tensors, strings and numbers, so `torch.load(weights_only=True)` reads
them (no pickled code crosses from the training box to a device). Sparse junctions are
stored as ELL tables: |W| values plus |W| int16 indices, never a dense matrix. The model id
hashes the layout and every weight of head and tail, so a server can refuse features from a
head it was not trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.model.config import Config, from_dict
from pipeline.errors import ArtifactError, UserError
from pipeline.floor.edge_artifact import EDGE_NPZ, UNFAMILIAR, UPLINK_CODE, write_edge_npz
from pipeline.floor.static_code import StaticCode
from pipeline.floor.unfamiliar import Unfamiliarity
from pipeline.model.split_model import ConvLayer, Head, SplitModel, Tail

__all__ = ["EDGE_FILE", "SERVER_FILE", "compute_model_id", "save_artifacts", "save_edge_npz",
           "ensure_edge_npz", "EdgeArtifact",
           "ServerArtifact", "load_edge", "load_server", "load_model", "set_threshold"]

EDGE_FILE, SERVER_FILE = "edge.pt", "server.pt"
FORMAT = 1
MODEL_ID_BYTES = 8  # 16 hex characters; collisions among a fleet's models are not a concern


def compute_model_id(model: SplitModel, layout: dict) -> str:
    """`layout`: the [model] section as the artifact stores it -- not as this version would
    fill it in, so that a folder trained before a layout key existed keeps its id."""
    h = hashlib.sha256(json.dumps(layout, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[: 2 * MODEL_ID_BYTES]


def _atomic_save(obj: dict, path: Path) -> int:
    """Write via a temporary file so a reader never sees half an artifact."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def _junction_arrays(name: str, layer: torch.nn.Module) -> dict[str, np.ndarray]:
    """A junction's or a conv's values (ELL rows / real kernels), bias, and its index table
    where sparse."""
    if isinstance(layer, ConvLayer):
        layer = layer.conv
        n_in = layer.in_channels
    else:
        n_in = layer.in_features
    values = layer.weight.detach().numpy().astype(np.float32)
    out = {f"{name}.values": values, f"{name}.bias": layer.bias.detach().numpy()}
    indices = getattr(layer, "indices", None)
    if indices is not None:  # no wider than the input needs
        dtype = np.uint16 if n_in <= 1 << 16 else np.int32
        out[f"{name}.indices"] = indices.numpy().astype(dtype)
    return out


def save_edge_npz(head: Head, edge: dict, path: Path) -> int:
    """The edge artifact for a torch-free edge: the head's arrays and what it needs to
    decide (threshold, score), beside the edge.pt dict `edge` they come with."""
    layout = edge["config"]["model"]
    meta = {"model_id": edge["model_id"], "threshold": edge["threshold"],
            "score": edge["score"], "temperature": edge.get("temperature", 1.0),
            "classes": edge["classes"], "split": layout["split"],
            "input_size": layout["input_size"], "input_pad": layout["input_pad"],
            "exit_layer": head.exit_layer,
            "uplink_bits": layout.get("uplink_bits", 0),  # absent: trained before it existed
            "input_shape": list(head.input_shape), "resize": layout.get("resize", "stretch"),
            "exit_pool": head.exit_pool,
            "convs": [{"stride": layer.spec.stride, "pool": layer.spec.pool}
                      for layer in head.layers if isinstance(layer, ConvLayer)]}
    arrays = {"pixel_mean": head.pixel_mean.numpy(), "pixel_std": head.pixel_std.numpy()}
    if edge.get(UPLINK_CODE) is not None:
        arrays[UPLINK_CODE] = edge[UPLINK_CODE].numpy().astype(np.uint16)
    unfamiliar = unfamiliarity_of(edge)
    if unfamiliar is not None:
        arrays |= unfamiliar.arrays(UNFAMILIAR)
        meta |= {"unfamiliar_threshold": unfamiliar.threshold,
                 "unfamiliar_flag_rate": unfamiliar.flag_rate}
    for i, layer in enumerate(head.layers):
        arrays |= _junction_arrays(f"layer{i}", layer)
    return write_edge_npz(path, meta, arrays | _junction_arrays("exit", head.exit))


def _unfamiliar_blob(u: Unfamiliarity | None) -> dict | None:
    return None if u is None else {
        "whiten": torch.from_numpy(u.whiten), "means": torch.from_numpy(u.means),
        "threshold": u.threshold, "flag_rate": u.flag_rate}


def unfamiliarity_of(blob: dict, shape: tuple[int, int] | None = None) -> Unfamiliarity | None:
    """A half's unfamiliarity score as stored, or None (trained before it existed); with
    `shape` (classes, features it reads), checked to fit it."""
    u = blob.get(UNFAMILIAR)
    if u is None:
        return None
    try:
        threshold = None if u["threshold"] is None else float(u["threshold"])
        score = Unfamiliarity(u["whiten"].numpy().astype(np.float32),
                              u["means"].numpy().astype(np.float32), threshold,
                              float(u["flag_rate"]))
        d = score.means.shape[-1]
        if shape is not None and (score.means.shape != shape or
                                  score.whiten.shape not in ((d,), (d, d))):
            raise ValueError(f"tables {score.means.shape} and {score.whiten.shape} do not fit "
                             f"{shape[0]} classes of {shape[1]} features")
        if not (np.isfinite(score.means).all() and np.isfinite(score.whiten).all()
                and (threshold is None or np.isfinite(threshold))):
            raise ValueError("not finite")
        return score
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ArtifactError(f"{blob.get('path', 'artifact')}: its unfamiliarity score is "
                            f"damaged ({e}); re-run `splitexit calibrate` on its folder") from None


def save_artifacts(out_dir: Path, model: SplitModel, cfg: Config, threshold: float,
                   classes: list[str], code: StaticCode | None = None,
                   temperatures: tuple[float, float] = (1.0, 1.0),
                   unfamiliar: tuple[Unfamiliarity, Unfamiliarity] | None = None) -> dict:
    """Write edge.pt, edge.npz and server.pt; return their sizes in bytes and the model id.
    `temperatures`: (exit, tail), what each side divides its logits by; `unfamiliar`:
    (edge, tail) scores."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_id = compute_model_id(model, cfg.to_dict()["model"])
    common = {"format": FORMAT, "model_id": model_id, "config": cfg.to_dict()}
    if code is not None:
        common[UPLINK_CODE] = torch.from_numpy(code.frequencies.astype(np.int16))
    edge = dict(common, kind="edge", state_dict=model.head.state_dict(),
                threshold=float(threshold), score=cfg.calibrate.score, classes=list(classes),
                temperature=float(temperatures[0]))
    server = dict(common, kind="server", state_dict=model.tail.state_dict(),
                  temperature=float(temperatures[1]))
    if unfamiliar is not None:
        edge[UNFAMILIAR], server[UNFAMILIAR] = map(_unfamiliar_blob, unfamiliar)
    return {"model_id": model_id,
            "edge_bytes": _atomic_save(edge, out_dir / EDGE_FILE),
            "edge_npz_bytes": save_edge_npz(model.head, edge, out_dir / EDGE_NPZ),
            "server_bytes": _atomic_save(server, out_dir / SERVER_FILE)}


def _read(path: Path, kind: str) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / (EDGE_FILE if kind == "edge" else SERVER_FILE)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact; create it with `splitexit train`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt zip or pickle
        raise ArtifactError(f"{path}: not a readable splitexit artifact "
                            f"({type(e).__name__}); re-create it with `splitexit train`") from None
    if not isinstance(blob, dict) or blob.get("kind") != kind:
        found = blob.get("kind") if isinstance(blob, dict) else type(blob).__name__
        raise ArtifactError(f"{path}: expected a {kind} artifact, found {found!r}")
    if blob.get("format") != FORMAT:
        raise ArtifactError(f"{path}: artifact format {blob.get('format')!r}, this splitexit "
                            f"reads format {FORMAT}; re-create it with `splitexit train`")
    blob["path"] = path
    return blob


def _build(blob: dict, module_cls):
    try:
        cfg = from_dict(blob["config"], origin=str(blob["path"]))
        module = module_cls(cfg.model)
        module.load_state_dict(blob["state_dict"])
    except (UserError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{blob['path']}: weights do not match the stored layout "
                            f"({first})") from None
    return cfg, module.eval()


@dataclass
class EdgeArtifact:
    head: Head
    config: Config
    model_id: str
    threshold: float
    score: str
    classes: list[str]
    path: Path
    temperature: float = 1.0    # the exit's score is computed on softmax(logits / this)
    layout: dict | None = None  # the [model] section as stored (what the model id hashed)


@dataclass
class ServerArtifact:
    tail: Tail
    config: Config
    model_id: str
    path: Path
    code: StaticCode | None = None  # the uplink's static entropy code, if trained for one
    temperature: float = 1.0        # the reply's confidence is softmax(logits / this)
    unfamiliarity: Unfamiliarity | None = None   # flags a frame the tail answers `unknown`


def load_edge(path: str | Path) -> EdgeArtifact:
    blob = _read(Path(path), "edge")
    cfg, head = _build(blob, Head)
    return EdgeArtifact(head, cfg, blob["model_id"], float(blob["threshold"]), blob["score"],
                        list(blob["classes"]), blob["path"],
                        _temperature(blob), blob["config"]["model"])


def load_server(path: str | Path) -> ServerArtifact:
    blob = _read(Path(path), "server")
    cfg, tail = _build(blob, Tail)
    code = None
    if blob.get(UPLINK_CODE) is not None:
        try:
            code = StaticCode(blob[UPLINK_CODE].numpy().astype(np.uint16))
        except (ValueError, AttributeError) as e:
            raise ArtifactError(f"{blob['path']}: its uplink code is damaged ({e}); re-create "
                                f"it with `splitexit train`") from None
    last = tail.layers[-1]   # the final classifier: the tail's score reads its input
    return ServerArtifact(tail, cfg, blob["model_id"], blob["path"], code, _temperature(blob),
                          unfamiliarity_of(blob, (last.out_features, last.in_features)))


def _temperature(blob: dict) -> float:
    t = blob.get("temperature", 1.0)
    if not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        raise ArtifactError(f"{blob['path']}: temperature {t!r} is not a positive number; "
                            f"re-run `splitexit calibrate` on its folder")
    return float(t)


def load_model(out_dir: str | Path) -> tuple[SplitModel, EdgeArtifact, ServerArtifact]:
    """Reassemble the whole model from a directory, checking that the halves belong together."""
    edge, server = load_edge(out_dir), load_server(out_dir)
    if edge.model_id != server.model_id:
        raise ArtifactError(f"{edge.path} (model {edge.model_id}) and {server.path} (model "
                            f"{server.model_id}) come from different trainings")
    model = SplitModel(edge.config.model)
    model.head, model.tail = edge.head, server.tail
    return model.eval(), edge, server


def ensure_edge_npz(out_dir: str | Path) -> None:
    """Write DIR/edge.npz from DIR/edge.pt if an older splitexit trained it without one."""
    if not (Path(out_dir) / EDGE_NPZ).is_file():
        blob = _read(Path(out_dir), "edge")
        _, head = _build(blob, Head)
        save_edge_npz(head, blob, blob["path"].with_name(EDGE_NPZ))


def set_threshold(out_dir: str | Path, threshold: float, score: str,
                  temperatures: tuple[float, float] | None = None,
                  unfamiliar: tuple[Unfamiliarity, Unfamiliarity] | None = None) -> None:
    """Rewrite the edge artifact's threshold, and with `temperatures` (exit, tail) both
    halves' temperatures, with `unfamiliar` both halves' scores (the model id does not
    change: weights don't)."""
    blob = _read(Path(out_dir), "edge")
    _, head = _build(blob, Head)
    path = blob.pop("path")
    blob["threshold"], blob["score"] = float(threshold), score
    blob["config"]["calibrate"]["score"] = score
    if temperatures is not None or unfamiliar is not None:
        server = _read(Path(out_dir), "server")
        server_path = server.pop("path")
        if temperatures is not None:
            blob["temperature"] = float(temperatures[0])
            server["temperature"] = float(temperatures[1])
        if unfamiliar is not None:
            blob[UNFAMILIAR], server[UNFAMILIAR] = map(_unfamiliar_blob, unfamiliar)
        _atomic_save(server, server_path)
    _atomic_save(blob, path)
    save_edge_npz(head, blob, path.with_name(EDGE_NPZ))
