"""The `splitexit` command. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from monitoring.exposition import METRICS_PORTS, MetricsError
from pipeline import __version__, build_commands, options
from pipeline.build_commands import DEFAULT_OUT
from pipeline.log import ENV as LOG_ENV, LEVELS, setup as log_setup
from pipeline.errors import UserError

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


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
    from workers.config import BrokerConfig

    cfg = BrokerConfig.from_args(args, security=_security(args, broker=True))
    _start_metrics(args)
    run_broker(cfg)


def _cmd_workers(args: argparse.Namespace) -> None:
    from pipeline.model.artifacts import load_server
    from workers.broker import run_broker
    from workers.config import BrokerConfig, WorkerConfig
    from workers.pool import ProcessGroup, stop_on_sigterm
    from workers.tail_worker import run_worker

    load_server(args.artifacts)  # a bad artifact is one error here, not N in the children
    backend = args.broker or args.backend
    cfg = WorkerConfig.from_args(args, broker=backend, security=_security(args, broker=False))
    broker = None if args.broker else BrokerConfig.from_args(
        args, security=_security(args, broker=True))
    _, announce = _start_metrics(args, {"worker": args.n} | ({} if args.broker else {"broker": 1}))
    stop_on_sigterm()
    group = ProcessGroup()
    try:
        if not args.broker:
            group.start("broker", run_broker, broker)
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

    load_numpy_head(args.artifacts)  # a bad artifact is one error here, not N in the children
    results = Path(args.results) if args.results else None
    if results:
        results.mkdir(parents=True, exist_ok=True)
    security = _security(args, broker=False)
    configs = [EdgeConfig.from_args(args, broker=args.broker, producer_id=args.producer_id + i,
                                    results=str(results / f"edge-{args.producer_id + i}.jsonl")
                                    if results else None, security=security)
               for i in range(args.n)]
    _, announce = _start_metrics(args, {"edge": args.n})
    stop_on_sigterm()
    group = ProcessGroup()
    procs = []
    try:
        procs = [group.start(f"edge-{i}", run_producer, args.artifacts, cfg, args.source,
                             args.fps, args.limit, args.data, (i, args.n) if args.shard else None,
                             args.loop)
                 for i, cfg in enumerate(configs)]
        group.wait(procs, on_tick=announce)
    except KeyboardInterrupt:
        pass   # SIGTERM or Ctrl-C: each producer stops on the SIGTERM `stop` sends it
    finally:   # a stopping producer answers what it holds within one deadline
        group.stop(timeout_s=STOP_TIMEOUT_S + args.deadline_ms / 1000)
    check_exits(procs)


def _cmd_up(args: argparse.Namespace) -> None:
    from pipeline.up import UpConfig, format_run_report, up
    from workers.pool import stop_on_sigterm

    cfg = UpConfig.from_args(args)
    stop_on_sigterm()
    report = up(cfg)
    print(format_run_report(report))
    log.info(f"per-frame results in {cfg.run_dir}/edge-*.jsonl, report in "
             f"{cfg.run_dir}/report.json")


def _cmd_top(args: argparse.Namespace) -> None:
    from monitoring.top import run_top

    endpoints = [e if "://" in e else f"http://{e}/metrics" for e in args.endpoints]
    if not run_top(endpoints, args.interval, args.count):
        raise UserError(f"no endpoint answered: {', '.join(endpoints)} (is the system up, "
                        f"with --metrics-port?)")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.edge.config import EdgeConfig
    from pipeline.up import UpConfig

    ap = argparse.ArgumentParser(prog="splitexit", description="Split computing with early exit "
                                 "on predefined-sparse networks.")
    ap.add_argument("--version", action="version", version=f"splitexit {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    ap.add_argument("--log-level", choices=LEVELS, help=f"log lines at this level and above, "
                    f"timestamped, on stderr (env {LOG_ENV}; default: info)")
    sub = ap.add_subparsers(dest="command", required=True)

    build_commands.add_train(sub)
    build_commands.add_calibrate(sub)

    b = sub.add_parser("broker", help="run the broker (edges on one port, workers on another)")
    options.add_broker_addresses(b)
    options.add_metrics_options(b, METRICS_PORTS["broker"], launcher=False)
    options.add_security_options(b, client=False, broker=True)
    b.set_defaults(func=_cmd_broker)

    w = sub.add_parser("workers", help="start a broker and N tail workers, or join a broker")
    w.add_argument("-n", type=options.at_least_one, default=2,
                   help="workers (default: %(default)s)")
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
    e.add_argument("-n", type=options.at_least_one, default=1,
                   help="producers (default: %(default)s)")
    e.add_argument("--source", default="dataset", help="camera index, video file or URL, "
                   "image folder, or dataset (default: %(default)s)")
    e.add_argument("--shard", action="store_true",
                   help="producers split the source's frames instead of each taking all")
    e.add_argument("--artifacts", default=DEFAULT_OUT, help="the training folder whose "
                   "edge head the producers run (default: %(default)s)")
    options.add_broker_option(e, "--frontend", EdgeConfig.broker, "the broker's frontend")
    e.add_argument("--fps", type=float, help="frames per second per producer (default: as "
                   "fast as the source gives them)")
    e.add_argument("--loop", action="store_true", help="replay a file, folder or data set "
                   "again and again, until --limit or a stop (SIGTERM, Ctrl-C)")
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
    u.add_argument("--brokers", type=int, default=UpConfig.brokers,
                   help="brokers; every worker and edge uses all of them, broker i on the "
                        "--frontend and --backend ports + 2i (default: %(default)s)")
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

    build_commands.add_export(sub)

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
    t.add_argument("--interval", type=options.positive, default=2.0,
                   help="seconds between refreshes")
    t.add_argument("--count", type=options.at_least_one,
                   help="refreshes before exiting (default: until Ctrl-C)")
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
