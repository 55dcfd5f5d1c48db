"""`splitexit up`: the whole system on one machine, and its end-of-run report.

Trains the recommended default first if its artifacts are missing, then starts a broker,
N tail workers and M edge producers that replay the Fashion-MNIST test set between them
(producer i takes every M-th frame), shows a live status line from the producers' JSONL
results, and reports from those same results when the replay ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from monitoring.exposition import DEFAULT_ADDR, METRICS_PORTS, MetricsServer, \
    claim_metrics_dir, mark_dead, multiprocess_registry, readiness
from monitoring.metrics import PROMQL
from pipeline.edge.config import EdgeConfig
from pipeline.errors import ConfigError
from pipeline.model.config import CONFIG_DIR, METRICS_FILE
from pipeline.floor.frames import DEFAULT_SHAPE
from pipeline.protocol.endpoints import shift_port
from workers.config import BrokerConfig, WorkerConfig
from workers.pool import ProcessGroup, check_exits, start_server

__all__ = ["UpConfig", "up", "read_results", "format_run_report"]

log = logging.getLogger(__name__)

STATUS_EVERY_S = 2.0          # status line period when stderr is not a terminal


@dataclass
class UpConfig:
    artifacts: str = "runs/default"
    workers: int = 2
    brokers: int = 1              # broker i on the frontend and backend ports + 2i
    producers: int = 2
    fps: float = 1000.0           # per producer; 0 = as fast as possible
    limit: int | None = None      # frames in the replay (default: the whole test set)
    data_dir: str | None = None
    run_dir: str = "runs/up"
    metrics_port: int = METRICS_PORTS["up"]   # the one /metrics and /ready for all; 0 = none
    metrics_addr: str = DEFAULT_ADDR
    hold_s: float = 0.0           # keep serving metrics this long after the replay
    # The processes' own settings; up points edges and workers at the broker's addresses.
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "UpConfig":
        """`splitexit up`'s parsed options, its processes' included; validated. The broker
        drops a request once the edges' deadline has passed, unless --queue-timeout-ms
        says otherwise (the edge's settings are checked first: a bad --deadline-ms is named
        as itself)."""
        edge = EdgeConfig.from_args(args)
        return cls(artifacts=args.artifacts, workers=args.workers, brokers=args.brokers,
                   producers=args.producers,
                   fps=args.fps, limit=args.limit, data_dir=args.data, run_dir=args.run_dir,
                   metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                   hold_s=args.hold,
                   broker=BrokerConfig.from_args(args, default_timeout_ms=edge.deadline_ms),
                   worker=WorkerConfig.from_args(args), edge=edge).validate()

    def broker_configs(self) -> list[BrokerConfig]:
        """One per broker: the first on --frontend and --backend, broker i 2i ports above."""
        return [replace(self.broker, frontend=shift_port(self.broker.frontend, 2 * i),
                        backend=shift_port(self.broker.backend, 2 * i))
                for i in range(self.brokers)]

    def validate(self) -> "UpConfig":
        """The one check of `up`'s settings, its processes' included."""
        limit = 1 if self.limit is None else self.limit
        if min(self.workers, self.brokers, self.producers, limit) < 1:
            raise ConfigError("--workers, --brokers, --producers and --limit must be at "
                              "least 1")
        if not self.fps >= 0:
            raise ConfigError(f"--fps {self.fps}: frames per second per producer, 0 for as "
                              f"fast as possible")
        try:
            brokers = self.broker_configs()
        except ValueError as e:
            raise ConfigError(f"--brokers {self.brokers}: {e}") from None
        for broker in brokers:
            broker.validate()
        self.worker.validate()
        self.edge.validate()
        return self


def _ensure_artifacts(cfg: UpConfig) -> None:
    from pipeline.model.artifacts import EDGE_FILE, SERVER_FILE, ensure_edge_npz

    art = Path(cfg.artifacts)
    if (art / EDGE_FILE).is_file() and (art / SERVER_FILE).is_file():
        ensure_edge_npz(art)  # the edges run torch-free from edge.npz
        return
    from pipeline.model.config import load_config
    from pipeline.model.report import format_report
    from pipeline.model.train import run

    log.info(f"no artifacts in {art}: training the recommended default first")
    overrides = [f"data.dir={cfg.data_dir!r}"] if cfg.data_dir else []
    print(format_report(run(load_config("default", overrides), art)), flush=True)


def _trained_on(artifacts: Path) -> str | None:
    """The data folder the model was trained on (its test split is what the edges replay),
    from its metrics.json; None (Fashion-MNIST) if it names none that is here."""
    metrics = artifacts / METRICS_FILE
    if not metrics.is_file():
        return None
    folder = json.loads(metrics.read_text()).get("config", {}).get("data", {}).get("dir")
    if folder and not Path(folder).is_dir():
        log.warning(f"{artifacts} was trained on {folder}, which is not here: replaying "
                    f"Fashion-MNIST's test split instead (--data DIR names another)")
        return None
    return folder


class ResultTail:
    """Reads new JSONL lines from the producers' files as they grow (for the status line)."""

    def __init__(self, paths: list[Path]):
        self.offsets = {p: 0 for p in paths}
        self.paths = Counter()

    def poll(self) -> Counter:
        for path, offset in self.offsets.items():
            if not path.exists():
                continue
            with open(path) as f:
                f.seek(offset)
                for line in f:
                    if line.endswith("\n"):
                        self.paths[json.loads(line)["path"]] += 1
                        offset += len(line.encode())
                self.offsets[path] = offset
        return self.paths


def up(cfg: UpConfig) -> dict:
    from pipeline.edge.producer import run_producer

    _ensure_artifacts(cfg)
    server = MetricsServer(cfg.metrics_port, cfg.metrics_addr) if cfg.metrics_port else None
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = [run_dir / f"edge-{i}.jsonl" for i in range(cfg.producers)]
    for path in results:
        path.unlink(missing_ok=True)
    # Every child writes its metrics here; up reads them for readiness and serves their sum.
    registry = multiprocess_registry(claim_metrics_dir(run_dir / "metrics"))
    if server:
        server.start(registry, readiness(registry, {"broker": cfg.brokers,
                                                    "worker": cfg.workers}))
        log.info(f"metrics for every process on http://{server.addr}:{server.port}/metrics, "
                 f"readiness on /ready ({CONFIG_DIR / 'prometheus.yml'} scrapes it); in "
                 f"Prometheus:\n"
                 f"   offload ratio:  {PROMQL['offload_ratio']}\n"
                 f"   uplink bytes/s: {PROMQL['uplink_bytes_per_second']}")
    group = ProcessGroup()
    started = time.monotonic()
    try:
        brokers = cfg.broker_configs()
        worker_cfg = replace(cfg.worker, broker=",".join(b.backend for b in brokers))
        server_procs = start_server(group, cfg.artifacts, cfg.workers, worker_cfg, registry,
                                    brokers=brokers)
        workers = [p for name, p in server_procs.items() if not name.startswith("broker")]
        log.info(f"{len(brokers)} broker(s) and {cfg.workers} workers ready "
                 f"({time.monotonic() - started:.1f} s); starting {cfg.producers} edge "
                 f"producers")
        started = time.monotonic()  # the replay's rate counts from here
        data_dir = cfg.data_dir or _trained_on(Path(cfg.artifacts))
        producers = [group.start(f"edge-{i}", run_producer, cfg.artifacts,
                                 replace(cfg.edge, producer_id=i,
                                         broker=",".join(b.frontend for b in brokers),
                                         results=str(results[i])).validate(),
                                 "dataset", cfg.fps or None, cfg.limit, data_dir,
                                 (i, cfg.producers)) for i in range(cfg.producers)]
        tail = ResultTail(results)
        tty = sys.stderr.isatty()
        last_line = [0.0]

        def status(final: bool = False, now: float | None = None):
            now = time.monotonic() if now is None else now
            if not (tty or final or now - last_line[0] >= STATUS_EVERY_S):
                return  # a log file gets a line every few seconds, a terminal a live line
            last_line[0] = now
            c = tail.poll()
            n = sum(c.values())
            line = (f"{n} frames ({n / max(now - started, 1e-9):.0f}/s): exit {c['exit']}, "
                    f"offload {c['offload']}, fallback {c['fallback']}; workers up "
                    f"{sum(p.is_alive() for p in workers)}/{cfg.workers}")
            if tty:   # a live line, redrawn in place; the log gets the final count
                print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)
            if final or not tty:
                log.info(line)

        group.wait(producers, on_tick=status)
        ended = time.monotonic()
        replay_s = ended - started   # the report's rate is the final line's
        status(final=True, now=ended)
        check_exits(producers)
        for p in producers:
            mark_dead(p.pid)
        if cfg.hold_s > 0 and server:
            log.info(f"replay done; metrics stay up {cfg.hold_s:.0f} s (Ctrl-C ends)")
            time.sleep(cfg.hold_s)  # the user asked for this: scrapers read the final counts
    finally:
        group.stop()
        if server:
            server.close()
    report = read_results(results, Path(cfg.artifacts), replay_s)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p = np.percentile(values, [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def read_results(paths: list[Path], artifacts: Path, elapsed_s: float) -> dict:
    outcomes = [json.loads(line) for path in paths if path.exists()
                for line in path.read_text().splitlines()]
    paths_count = Counter(o["path"] for o in outcomes)
    n = len(outcomes)
    offloaded = [o for o in outcomes if o["uplink_bytes"]]
    labelled = [o for o in outcomes if o["label"] is not None]
    training = {}
    metrics_file = artifacts / METRICS_FILE
    input_shape = DEFAULT_SHAPE
    if metrics_file.is_file():
        trained = json.loads(metrics_file.read_text())
        training = dict(trained["calibration"]["test"])
        with_unfamiliar = trained["calibration"].get("unfamiliar", {}).get("test", {})
        if "split_exit" in with_unfamiliar:   # as the runtime answers: flagged, unknown
            training["split_exit"] = with_unfamiliar["split_exit"]
        input_shape = trained["config"]["model"].get("input_shape", DEFAULT_SHAPE)
    return {
        "frames": n,
        "unique_frames": len({(o["source"], o["frame"]) for o in outcomes}),
        "frames_per_s": n / elapsed_s if elapsed_s > 0 else None,
        "paths": dict(paths_count),
        "fallback_reasons": dict(Counter(o["reason"] for o in outcomes if o["reason"])),
        "unfamiliar": sum(bool(o.get("unfamiliar")) for o in outcomes),
        "unknown": sum(o["cls"] == -1 for o in outcomes),
        "offload_ratio": (paths_count["offload"] + paths_count["fallback"]) / n if n else None,
        "accuracy": (sum(o["cls"] == o["label"] for o in labelled) / len(labelled)
                     if labelled else None),
        "training_test": training,
        "uplink_bytes_per_offloaded_frame": (sum(o["uplink_bytes"] for o in offloaded)
                                             / len(offloaded) if offloaded else None),
        "uplink_bytes_per_frame": (sum(o["uplink_bytes"] for o in offloaded) / n
                                   if n else None),
        "raw_frame_bytes": math.prod(input_shape),   # one uint8 frame as the model reads it
        "latency_ms": {path: _quantiles([o["latency_ms"] for o in outcomes if o["path"] == path])
                       for path in ("exit", "offload", "fallback")},
        "workers": dict(Counter(o["worker"] for o in outcomes if o["worker"])),
    }


def format_run_report(r: dict) -> str:
    def pct(x):
        return "—" if x is None else f"{100 * x:.2f}%"

    t = r["training_test"]
    lines = [
        f"frames {r['frames']} (unique {r['unique_frames']}), {r['frames_per_s']:.0f} frames/s",
        f"paths {r['paths']}, fallbacks {r['fallback_reasons'] or 'none'}",
        f"offload ratio {pct(r['offload_ratio'])} (offloaded = sent to the server, answered "
        f"by it or by the fallback)",
        f"unfamiliar frames: {r['unfamiliar']} flagged by the edge (offloaded, never the exit's "
        f"answer), {r['unknown']} answered `unknown`",
        "",
        "| accuracy | end to end (this run) | exit only | full model | split+exit (offline) |",
        "|---|---|---|---|---|",
        f"| test set | {pct(r['accuracy'])} | {pct(t.get('exit_only'))} | {pct(t.get('full'))} "
        f"| {pct(t.get('split_exit'))} |",
        "",
        f"uplink per offloaded frame: {r['uplink_bytes_per_offloaded_frame'] or 0:.1f} B on the "
        f"wire (ZeroMQ frames included) vs {r['raw_frame_bytes']} B for the raw frame; "
        f"{r['uplink_bytes_per_frame'] or 0:.1f} B per frame on average",
        "",
        "| path | frames | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for path, q in r["latency_ms"].items():
        if q["p50"] is not None:
            lines.append(f"| {path} | {r['paths'].get(path, 0)} | {q['p50']:.2f} | "
                         f"{q['p95']:.2f} | {q['p99']:.2f} |")
    lines.append(f"\nworkers that answered: {r['workers']}")
    return "\n".join(lines)
