"""Command-line options that several commands share. Their defaults are read from the
config dataclasses (EdgeConfig, BrokerConfig, WorkerConfig) and the metric ports from
monitoring.exposition, so a default is stated once."""

from __future__ import annotations

import argparse

# the environment's defaults: the rule lives in pipeline.env, which the library reads too
from pipeline.env import ENV_PREFIX, env_name, from_env

__all__ = ["add_metrics_options", "add_security_options", "add_broker_addresses",
           "add_worker_options", "add_edge_options", "add_broker_option", "at_least_one",
           "positive", "ENV_PREFIX"]


# argparse types for the few values no config dataclass holds (a launcher's -n, `top`'s
# --interval and --count): refused where they are parsed. Every other value is checked by
# its config's validate() (pipeline.edge.config, workers.config, pipeline.up).
def at_least_one(text: str) -> int:
    """A count: a whole number, at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


def positive(text: str) -> float:
    """A number above 0 (a period in seconds)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"{x:g} must be positive")
    return x


def add_broker_option(p: argparse.ArgumentParser, port: str, default: str | None, what: str,
                      *aliases: str) -> None:
    """--broker: the broker a client connects to, the same flag for the same meaning; its
    environment variable names the broker's port it means (`port`: --frontend for an edge,
    --backend for workers), so one deployment's two variables serve every role."""
    p.add_argument("--broker", *aliases, default=from_env(port, default),
                   metavar="tcp://HOST:PORT[,...]",
                   help=f"{what}; several brokers comma-separated, all used (env "
                        f"{env_name(port)}; default: %(default)s)")


def add_metrics_options(p: argparse.ArgumentParser, port: int, launcher: bool) -> None:
    from monitoring.exposition import DEFAULT_ADDR

    p.add_argument("--metrics-port", type=int, default=port,
                   help="serve Prometheus /metrics and /ready here, 0 for none "
                        "(default: %(default)s)")
    p.add_argument("--metrics-addr", default=DEFAULT_ADDR,
                   help="address to serve metrics on (default: %(default)s, loopback only)")
    if launcher:
        p.add_argument("--metrics-dir", help="folder for the children's metric files, this "
                       "launcher's alone while it runs (default: runs/metrics-PORT, or a "
                       "temporary folder without a port)")


def add_security_options(p: argparse.ArgumentParser, client: bool, broker: bool) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="plaintext instead of CURVE; only allowed on loopback addresses")
    # One name, one key, in every command: --curve-secret is always this client's own pair,
    # --broker-secret always the broker's pair (`broker` once took it as --curve-secret:
    # still read there, as an alias).
    if client:
        p.add_argument("--curve-secret", metavar="NAME.key_secret",
                       default=from_env("--curve-secret"),
                       help=f"this client's CURVE key pair, from `splitexit keys` (env "
                            f"{env_name('--curve-secret')})")
        p.add_argument("--curve-server", metavar="NAME.key", default=from_env("--curve-server"),
                       help=f"the broker's public key (env {env_name('--curve-server')})")
    if broker:
        names = ["--broker-secret"] if client else ["--broker-secret", "--curve-secret"]
        p.add_argument(*names, dest="broker_secret", metavar="NAME.key_secret",
                       default=from_env("--broker-secret"),
                       help=f"the broker's CURVE key pair (env {env_name('--broker-secret')})")
        # A key has one role: edges' and workers' keys live in two folders, one per socket.
        p.add_argument("--allow-edges", metavar="DIR", default=from_env("--allow-edges"),
                       help=f"folder of the public keys (*.key) of edges allowed on the "
                            f"frontend (env {env_name('--allow-edges')})")
        p.add_argument("--allow-workers", metavar="DIR", default=from_env("--allow-workers"),
                       help=f"folder of the public keys (*.key) of workers allowed on the "
                            f"backend (env {env_name('--allow-workers')})")
        p.add_argument("--allow", default=from_env("--allow"), help=argparse.SUPPRESS)


def add_broker_addresses(p: argparse.ArgumentParser) -> None:
    from workers.config import BrokerConfig

    p.add_argument("--frontend", default=from_env("--frontend", BrokerConfig.frontend),
                   help=f"the broker binds this, edges connect here (env "
                        f"{env_name('--frontend')}; default: %(default)s)")
    p.add_argument("--backend", default=from_env("--backend", BrokerConfig.backend),
                   help=f"the broker binds this, workers connect here (env "
                        f"{env_name('--backend')}; default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=BrokerConfig.max_queue,
                   help="queued requests before edges are told BUSY (default: %(default)s)")
    p.add_argument("--max-held-mb", type=float,
                   default=BrokerConfig.max_held_bytes / (1 << 20),
                   help="MiB of requests held at once, queued or in workers' hands, before "
                        "edges are told BUSY (default: %(default)g)")
    p.add_argument("--queue-timeout-ms", type=float, default=None,
                   help="a request older than this, queued or in a worker's hands, is "
                        "dropped (NO_WORKER): its edge has given up and serving it would only "
                        "delay the next ones; set it to the edges' "
                        f"--deadline-ms (default: {BrokerConfig.queue_timeout_s * 1000:.0f}; "
                        "`up`: its own --deadline-ms)")


def add_worker_options(p: argparse.ArgumentParser) -> None:
    from workers.config import WorkerConfig

    p.add_argument("--max-batch", type=int, default=WorkerConfig.max_batch,
                   help="frames per tail call (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=WorkerConfig.max_wait_ms,
                   help="longest wait for a batch to fill; 0 runs a batch as soon as the "
                        "worker is free (default: %(default)s)")
    p.add_argument("--threads", type=int, default=WorkerConfig.threads,
                   help="torch threads per worker (default: %(default)s)")


def add_edge_options(p: argparse.ArgumentParser) -> None:
    from pipeline.edge.config import AUTO, EdgeConfig
    from pipeline.protocol.wire import CODEC_NAMES, DTYPE_NAMES

    p.add_argument("--deadline-ms", type=float, default=EdgeConfig.deadline_ms,
                   help="server answer deadline; then the local exit answers (default: "
                        "%(default)s)")
    p.add_argument("--dtype", default=EdgeConfig.dtype, choices=[AUTO, *DTYPE_NAMES],
                   help=f"features on the wire: "
                   f"auto | {' | '.join(DTYPE_NAMES)}; auto sends what the model's uplink "
                   f"was trained for (model.uplink_bits), else int8 (default: %(default)s)")
    p.add_argument("--codec", default=EdgeConfig.codec, choices=[AUTO, *CODEC_NAMES],
                   help=f"auto | "
                   f"{' | '.join(CODEC_NAMES)}; auto is the model's static code where it "
                   f"has one (model.uplink_bits), else lz4; each is used only when it "
                   f"shrinks a payload (default: %(default)s)")
    p.add_argument("--max-pack", type=int, default=EdgeConfig.max_pack,
                   help="frames per request when several are waiting (default: %(default)s)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-offload", type=float, metavar="RATIO",
                        help="move the exit threshold online to send this fraction of "
                             "frames, and less while the server refuses (default: the "
                             "trained threshold, fixed)")
    target.add_argument("--uplink-budget", type=float, metavar="BYTES_PER_S",
                        help="move the exit threshold online to send at most this many bytes "
                             "per second, and less while the server refuses")
    p.add_argument("--shadow", type=float, default=EdgeConfig.shadow, metavar="FRACTION",
                   help="also send this fraction of the frames the exit answered, to measure "
                        "its agreement with the tail; their answers stay the exit's, they are "
                        "not offloads, and they are the first dropped under load (default: "
                        "%(default)s)")
    p.add_argument("--limit", type=int, help="stop after this many frames")
    p.add_argument("--data", help="IDX folder for dataset replay (default: Debian's)")
