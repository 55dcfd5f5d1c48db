"""The `splitexit` command. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from monitoring.exposition import METRICS_PORTS, MetricsError
from pipeline import __version__, options
from pipeline.log import ENV as LOG_ENV, LEVELS, setup as log_setup
from pipeline.errors import UserError

__all__ = ["main"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "default"
DEFAULT_OUT = "runs/default"
EXPORT_TARGETS = ("c", "onnx")


def _cmd_train(args: argparse.Namespace) -> None:
    import torch

    from pipeline.model.config import load_config
    from pipeline.model.report import format_report
    from pipeline.model.train import run

    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.data is not None:
        overrides.append(f"data.dir={args.data!r}")
    cfg = load_config(args.config, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{cfg.model.name}")
    metrics = run(cfg, out, progress=True if args.progress else False if args.quiet else None)
    print(format_report(metrics))
    log.info(f"wrote {out}/edge.pt, {out}/server.pt, {out}/metrics.json, "
             f"{out}/calibration.csv" + (", calibration.png" if metrics["calibration"]["sweep_png"]
                                         else " (no PNG: pip install matplotlib)"))


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from pipeline.model.artifacts import load_edge
    from pipeline.model.config import apply_overrides, from_dict
    from pipeline.model.report import format_report
    from pipeline.model.train import calibrate_dir

    out = Path(args.dir)
    raw = load_edge(out).config.to_dict()
    overrides = list(args.set)
    for key, value in (("policy", args.policy), ("target_offload", args.target_offload),
                       ("max_drop", args.max_drop), ("score", args.score)):
        if value is not None:
            overrides.append(f"calibrate.{key}={value!r}" if isinstance(value, str)
                             else f"calibrate.{key}={value}")
    cfg = from_dict(apply_overrides(raw, overrides), origin="calibrate options")
    metrics = calibrate_dir(out, cfg, args.data)
    if "structure" in metrics:
        print(format_report(metrics))
    log.info(f"new threshold {metrics['calibration']['threshold']:.4f} written to {out}/edge.pt")


def _start_metrics(args: argparse.Namespace, expected: dict[str, int] | None = None):
    """Serve /metrics and /ready if asked. A launcher (`expected` says which children it
    waits for) binds its port first, then claims its folder of per-process metric files
    before any child imports prometheus-client. Returns the registry readiness is read from
    and a function that says once, on stderr, when the launcher became ready."""
    from prometheus_client import REGISTRY

    from monitoring.exposition import MetricsServer, claim_metrics_dir, multiprocess_registry, \
        readiness

    server = MetricsServer(args.metrics_port, args.metrics_addr) if args.metrics_port else None
    registry = REGISTRY
    if expected is not None:
        folder = args.metrics_dir or (f"runs/metrics-{server.port}" if server else None)
        registry = multiprocess_registry(claim_metrics_dir(folder))
    ready = readiness(registry, expected or {args.command: 1})
    if server:
        server.start(registry, ready)
        log.info(f"metrics on http://{server.addr}:{server.port}/metrics, readiness on "
                 f"/ready")
    told = []

    def announce() -> None:
        if not told and ready():
            told.append(True)
            log.info(f"ready: {', '.join(f'{role} x{n}' for role, n in expected.items())}")
    return registry, announce


def _security(args: argparse.Namespace, broker: bool):
    from pipeline.protocol.security import Security

    if broker:
        if args.allow:
            raise UserError(f"--allow ({options.env_name('--allow')}) was split in two, one "
                            f"folder per role: pass --allow-edges DIR (the edges' keys) and "
                            f"--allow-workers DIR (the workers' keys)")
        return Security(secret=args.broker_secret, allow_edges=args.allow_edges,
                        allow_workers=args.allow_workers, insecure=args.insecure)
    return Security(secret=args.curve_secret, server=args.curve_server, insecure=args.insecure)


def _cmd_keys(args: argparse.Namespace) -> None:
    from pipeline.protocol.security import create_keys

    public, secret = create_keys(args.dir, args.name, args.force)
    log.info(f"wrote {public} (public: give it to the broker's --allow-edges or "
             f"--allow-workers folder, by its role, or to clients as --curve-server) and "
             f"{secret} (secret: keep it on this host)")


def _cmd_broker(args: argparse.Namespace) -> None:
    from workers.broker import run_broker

    security = _security(args, broker=True).check([args.frontend, args.backend], "broker")
    _start_metrics(args)
    run_broker(_broker_config(args, security))


def _broker_config(args: argparse.Namespace, security=None,
                   default_timeout_ms: float | None = None):
    """The broker's settings from the options `broker`, `workers` and `up` share (plaintext
    on loopback unless `security` says otherwise)."""
    from workers.config import BrokerConfig

    cfg = BrokerConfig(args.frontend, args.backend, args.max_queue,
                       _queue_timeout_s(args, default_timeout_ms),
                       max_held_bytes=int(args.max_held_mb * (1 << 20)))
    return (cfg if security is None else replace(cfg, security=security)).validate()


def _queue_timeout_s(args: argparse.Namespace, default_ms: float | None = None) -> float:
    from workers.config import BrokerConfig

    ms = args.queue_timeout_ms if args.queue_timeout_ms is not None else default_ms
    return BrokerConfig.queue_timeout_s if ms is None else ms / 1000


def _worker_config(args: argparse.Namespace, backend: str):
    from workers.config import WorkerConfig

    security = _security(args, broker=False).check([backend], "worker")
    return WorkerConfig(backend, args.max_batch, args.max_wait_ms, threads=args.threads,
                        security=security).validate()


def _cmd_workers(args: argparse.Namespace) -> None:
    from pipeline.model.artifacts import load_server
    from workers.broker import run_broker
    from workers.pool import ProcessGroup, stop_on_sigterm
    from workers.tail_worker import run_worker

    if args.n < 1:
        raise UserError("-n must be at least 1")
    load_server(args.artifacts)  # a bad artifact is one error here, not N in the children
    backend = args.broker or args.backend
    cfg = _worker_config(args, backend)
    broker_security = None if args.broker else _security(args, broker=True).check(
        [args.frontend, args.backend], "broker")
    _, announce = _start_metrics(args, {"worker": args.n} | ({} if args.broker else {"broker": 1}))
    stop_on_sigterm()
    group = ProcessGroup()
    try:
        if not args.broker:
            group.start("broker", run_broker, _broker_config(args, broker_security))
        workers = [group.start(f"worker-{i}", run_worker, args.artifacts, cfg)
                   for i in range(args.n)]
        log.info(f"{args.n} workers on {backend}" + ("" if args.broker else
                 f"; edges connect to {args.frontend}") + "; Ctrl-C stops")
        group.wait(workers, on_tick=announce)
    except KeyboardInterrupt:
        pass
    finally:
        group.stop()


def _cmd_edge(args: argparse.Namespace) -> None:
    from pipeline.edge.config import EdgeConfig
    from pipeline.edge.numpy_head import load_numpy_head
    from pipeline.edge.producer import run_producer
    from workers.pool import STOP_TIMEOUT_S, ProcessGroup, check_exits, stop_on_sigterm

    if args.n < 1:
        raise UserError("-n must be at least 1")
    load_numpy_head(args.artifacts)  # a bad artifact is one error here, not N in the children
    results = Path(args.results) if args.results else None
    if results:
        results.mkdir(parents=True, exist_ok=True)
    configs = [EdgeConfig(args.broker, args.deadline_ms, args.dtype, args.codec,
                          args.producer_id + i,
                          str(results / f"edge-{args.producer_id + i}.jsonl") if results
                          else None, max_pack=args.max_pack,
                          security=_security(args, broker=False),
                          target_offload=args.target_offload,
                          uplink_budget=args.uplink_budget, shadow=args.shadow).validate()
               for i in range(args.n)]
    _, announce = _start_metrics(args, {"edge": args.n})
    stop_on_sigterm()
    group = ProcessGroup()
    procs = []
    try:
        procs = [group.start(f"edge-{i}", run_producer, args.artifacts, cfg, args.source,
                             args.fps, args.limit, args.data, (i, args.n) if args.shard else None)
                 for i, cfg in enumerate(configs)]
        group.wait(procs, on_tick=announce)
    except KeyboardInterrupt:
        pass   # SIGTERM or Ctrl-C: each producer stops on the SIGTERM `stop` sends it
    finally:   # a stopping producer answers what it holds within one deadline
        group.stop(timeout_s=STOP_TIMEOUT_S + args.deadline_ms / 1000)
    check_exits(procs)


def _cmd_up(args: argparse.Namespace) -> None:
    from pipeline.edge.config import EdgeConfig
    from pipeline.up import UpConfig, format_run_report, up
    from workers.config import WorkerConfig

    cfg = UpConfig(args.artifacts, args.workers, args.producers, args.fps, args.limit,
                   args.data, args.run_dir, args.metrics_port, args.metrics_addr, args.hold,
                   _broker_config(args, default_timeout_ms=args.deadline_ms),
                   WorkerConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                threads=args.threads),
                   EdgeConfig(deadline_ms=args.deadline_ms, dtype=args.dtype, codec=args.codec,
                              max_pack=args.max_pack, target_offload=args.target_offload,
                              uplink_budget=args.uplink_budget, shadow=args.shadow)).validate()
    report = up(cfg)
    print(format_run_report(report))
    log.info(f"per-frame results in {cfg.run_dir}/edge-*.jsonl, report in "
             f"{cfg.run_dir}/report.json")


def _calibration_frames(args: argparse.Namespace, head):
    """Training frames (never test frames) for the int8 rounding, or None with a warning:
    from --data, else the data folder the training folder's metrics.json names."""
    import json

    from pipeline.edge.quantize import CALIBRATION_FRAMES
    from pipeline.errors import DataError
    from pipeline.model.config import METRICS_FILE, TrainConfig, from_dict
    from pipeline.floor.data import load_dataset

    metrics = Path(args.dir) / METRICS_FILE
    trained = json.loads(metrics.read_text())["config"] if metrics.is_file() else {}
    folder = args.data or trained.get("data", {}).get("dir")
    if folder is None:
        log.warning(f"int8 rounds to nearest: no {METRICS_FILE} in {args.dir} names the training "
                    f"data; pass --data DIR for error-compensated rounding")
        return None
    try:   # the split it was trained with
        t = from_dict(trained, origin=str(metrics)).train if trained else TrainConfig()
        data = load_dataset(folder, t.val_fraction, t.seed, t.val_min, head.input_shape,
                            head.resize)   # as the head reads them
    except DataError as e:
        if args.data:
            raise
        log.warning(f"int8 rounds to nearest: {e}")
        return None
    return data.train.images[:CALIBRATION_FRAMES].astype("float32") / 255


def _cmd_export(args: argparse.Namespace) -> None:
    from pipeline.edge.export_c import export_c
    from pipeline.edge.export_onnx import export_onnx
    from pipeline.edge.numpy_head import load_numpy_head

    if args.target == "onnx" and args.variant != "float32":   # argparse checked each alone
        raise UserError(f"--variant {args.variant!r}: the ONNX export is float32")
    head = load_numpy_head(args.dir)
    name = args.target if args.target == "onnx" else f"{args.target}-{args.variant}"
    out = Path(args.out or Path(args.dir) / f"export-{name}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if args.target == "onnx":
        [path] = export_onnx(args.dir, out)
        log.info(f"wrote {path} (model {head.model_id}): inputs pixels (batch, "
                 f"{head.input_size}), outputs features and exit_logits")
        return
    calibration = _calibration_frames(args, head) if args.variant == "int8" else None
    paths = export_c(args.dir, out, args.variant, calibration)
    log.info(f"wrote {', '.join(str(p) for p in paths)} (model {head.model_id}); build with "
             f"`cc -std=c99 -O2 -c {paths[0]} {out / 'edge_step.c'}` (link -lm), call "
             f"splitexit_edge_step() as {out / 'splitexit_edge.h'} says (the head alone: "
             f"splitexit_head(), {paths[1]})")


def _cmd_top(args: argparse.Namespace) -> None:
    from monitoring.top import run_top

    if args.interval <= 0 or (args.count is not None and args.count < 1):
        raise UserError("--interval must be positive and --count at least 1")
    endpoints = [e if "://" in e else f"http://{e}/metrics" for e in args.endpoints]
    if not run_top(endpoints, args.interval, args.count):
        raise UserError(f"no endpoint answered: {', '.join(endpoints)} (is the system up, "
                        f"with --metrics-port?)")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.edge.config import EdgeConfig
    from pipeline.edge.export_c import C_VARIANTS
    from pipeline.floor.scores import SCORES
    from pipeline.model.config import POLICIES
    from pipeline.up import UpConfig

    ap = argparse.ArgumentParser(prog="splitexit", description="Split computing with early exit "
                                 "on predefined-sparse networks.")
    ap.add_argument("--version", action="version", version=f"splitexit {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    ap.add_argument("--log-level", choices=LEVELS, help=f"log lines at this level and above, "
                    f"timestamped, on stderr (env {LOG_ENV}; default: info)")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a split model, calibrate its exit, write artifacts")
    t.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                   help="TOML file or shipped config name (default: %(default)s)")
    t.add_argument("--out", help="output directory (default: runs/<model name>)")
    t.add_argument("--data", help="folder with the IDX files, or an image folder: one "
                   "subfolder of pictures per class (default: Debian's Fashion-MNIST)")
    t.add_argument("--epochs", type=int, help="train this many passes over the training "
                   "frames instead of the config's step count (train.epochs)")
    t.add_argument("--seed", type=int, help="seed of the weights, shuffling and validation "
                   "split (train.seed; default: the config's)")
    t.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set train.lr=0.001")
    bar = t.add_mutually_exclusive_group()
    bar.add_argument("--quiet", action="store_true", help="no progress bar")
    bar.add_argument("--progress", action="store_true", help="a progress bar even when "
                     "stderr is not a terminal (default: only on a terminal)")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("calibrate", help="choose a new exit threshold for a trained directory")
    c.add_argument("dir", nargs="?", default=DEFAULT_OUT,
                   help="a training folder, rewritten in place (default: %(default)s)")
    c.add_argument("--policy", choices=POLICIES, help="offload: send --target-offload of the "
                   "frames; max_drop: offload the fewest frames that keep accuracy within "
                   "--max-drop points of the full model (default: the training's)")
    c.add_argument("--target-offload", type=float, help="fraction of frames to offload")
    c.add_argument("--max-drop", type=float, help="accuracy points allowed below the full model")
    c.add_argument("--score", choices=SCORES, help="the exit's confidence: the top "
                   "softmax probability, the top two's margin, or 1 - normalized entropy "
                   "(default: the training's)")
    c.add_argument("--data", help="IDX or image folder (default: the training's)")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set calibrate.max_drop=1.0")
    c.set_defaults(func=_cmd_calibrate)

    b = sub.add_parser("broker", help="run the broker (edges on one port, workers on another)")
    options.add_broker_addresses(b)
    options.add_metrics_options(b, METRICS_PORTS["broker"], launcher=False)
    options.add_security_options(b, client=False, broker=True)
    b.set_defaults(func=_cmd_broker)

    w = sub.add_parser("workers", help="start a broker and N tail workers, or join a broker")
    w.add_argument("-n", type=int, default=2, help="workers (default: %(default)s)")
    w.add_argument("--artifacts", default=DEFAULT_OUT, help="the training folder whose "
                   "server.pt the workers run (default: %(default)s)")
    options.add_broker_option(w, "--backend", None, "join the workers to this broker's "
                              "backend instead of starting a broker (--join: the old name)",
                              "--join")
    options.add_broker_addresses(w)
    options.add_worker_options(w)
    options.add_metrics_options(w, METRICS_PORTS["workers"], launcher=True)
    options.add_security_options(w, client=True, broker=True)
    w.set_defaults(func=_cmd_workers)

    e = sub.add_parser("edge", help="start M edge producers on a source")
    e.add_argument("-n", type=int, default=1, help="producers (default: %(default)s)")
    e.add_argument("--source", default="dataset", help="camera index, video file or URL, "
                   "image folder, or dataset (default: %(default)s)")
    e.add_argument("--shard", action="store_true",
                   help="producers split the source's frames instead of each taking all")
    e.add_argument("--artifacts", default=DEFAULT_OUT, help="the training folder whose "
                   "edge head the producers run (default: %(default)s)")
    options.add_broker_option(e, "--frontend", EdgeConfig.broker, "the broker's frontend")
    e.add_argument("--fps", type=float, help="frames per second per producer (default: as "
                   "fast as the source gives them)")
    e.add_argument("--producer-id", type=int, default=0, help="id of the first producer")
    e.add_argument("--results", metavar="DIR", help="write edge-<id>.jsonl per producer here")
    options.add_edge_options(e)
    options.add_metrics_options(e, METRICS_PORTS["edge"], launcher=True)
    options.add_security_options(e, client=True, broker=False)
    e.set_defaults(func=_cmd_edge)

    u = sub.add_parser("up", help="the whole system on this machine, replaying Fashion-MNIST")
    u.add_argument("--artifacts", default=UpConfig.artifacts,
                   help="the training folder to serve (default: %(default)s; trained "
                        "first if missing)")
    u.add_argument("--workers", type=int, default=UpConfig.workers,
                   help="tail worker processes (default: %(default)s)")
    u.add_argument("--producers", type=int, default=UpConfig.producers,
                   help="edge producer processes (default: %(default)s)")
    u.add_argument("--fps", type=float, default=UpConfig.fps,
                   help="frames per second per producer, 0 for as fast as possible "
                        "(default: %(default)s)")
    u.add_argument("--run-dir", default=UpConfig.run_dir, help="results, report and metric "
                   "files (default: %(default)s)")
    u.add_argument("--hold", type=float, default=UpConfig.hold_s, metavar="S",
                   help="keep serving metrics S seconds after the replay, for scrapers")
    options.add_broker_addresses(u)
    options.add_worker_options(u)
    options.add_edge_options(u)
    options.add_metrics_options(u, UpConfig.metrics_port, launcher=False)  # files live in --run-dir
    u.set_defaults(func=_cmd_up)

    x = sub.add_parser("export", help="the edge head as C99 or ONNX for a device",
                       description="Export a training folder's edge head (from edge.npz) for "
                       "a device that runs no Python: C99 source with const tables and one "
                       "function, splitexit_head(pixels, features, exit_logits), or an ONNX "
                       "graph.")
    x.add_argument("dir", nargs="?", default=DEFAULT_OUT,
                   help="a training folder (default: %(default)s)")
    x.add_argument("--target", default="c", choices=EXPORT_TARGETS, help="c (default): "
                   "splitexit_head.c + .h, const tables, one function, no allocation, nothing "
                   "beyond <stdint.h> | onnx: splitexit_head.onnx, a dynamic batch, ELL kept "
                   "as Gather/Mul/ReduceSum (needs the onnx extra)")
    x.add_argument("--variant", default="float32", choices=C_VARIANTS, help="float32 "
                   "(default; equals the trained head) | int8 (int8 tables with a float scale "
                   "per row, 4x smaller; rounded so errors cancel on training frames; C only)")
    x.add_argument("--data", help="int8: the training data folder to calibrate the rounding "
                   "on (default: the one DIR/metrics.json names)")
    x.add_argument("--out", help="output folder (default: DIR/export-TARGET-VARIANT)")
    x.set_defaults(func=_cmd_export)

    k = sub.add_parser("keys", help="make a CURVE key pair for a broker, worker or edge")
    k.add_argument("dir", help="folder to write NAME.key and NAME.key_secret into")
    k.add_argument("--name", required=True, help="e.g. broker, worker1, camera-7")
    k.add_argument("--force", action="store_true",
                   help="replace an existing pair of that name (the old key stops working)")
    k.set_defaults(func=_cmd_keys)

    t = sub.add_parser("top", help="live summary from /metrics endpoints")
    t.add_argument("endpoints", nargs="*", default=[f"127.0.0.1:{METRICS_PORTS['up']}"],
                   help=f"HOST:PORT or URLs (default: a running `up`, "
                        f"127.0.0.1:{METRICS_PORTS['up']})")
    t.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    t.add_argument("--count", type=int, help="refreshes before exiting (default: until Ctrl-C)")
    t.set_defaults(func=_cmd_top)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        log_setup("debug" if args.verbose else args.log_level)
    except ValueError as e:   # $SPLITEXIT_LOG_LEVEL names no level (the flag has choices)
        print(f"splitexit: error: {e}", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (UserError, MetricsError) as e:
        print(f"splitexit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splitexit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
