"""How many cameras one broker and its tail workers serve with what the model's edge sends,
and the offload hop against its floor.

All in one run on this machine, loopback tcp, real processes. The requests are what the
model's edge sends: real test frames through the edge's own NumPy head, only the frames its
exit is unsure of (what it offloads), one frame a request (a 30-fps camera has one frame at a
time), in the dtype and codec the edge artifact implies (the edge's `--dtype auto --codec
auto`: for the default, 4-bit codes and the model's static code), made by
wire.encode_request as the edge makes them (so the fastest coder installed is the one timed).
Beside them, in the same run and through the same servers, the same dtype with `--codec
none`: what the coder costs is a ratio measured side by side, not two runs on a busy machine.

Paths (table 2):
  floor 1  direct DEALER <-> ROUTER echo (no broker)
  floor 2  a minimal zguide-style Python load-balancing broker + an echo worker
  ours     our broker (heartbeats, credit, redelivery, metrics in multiprocess mode) with an
           echo worker that speaks our protocol, and with our real tail workers, once with
           each uplink
  scale    one broker, then --brokers brokers, each with its own echo worker, driven by one
           client process per broker (as many edges on other hosts would be): messages/s
           summed, side by side in the same run
Tables:
  1. each uplink: bytes per frame on the wire, the edge's encode time per frame
  2. the hop's round trip at a low rate (one request every 5 ms): p50 / p99; and messages/s
     with a window of requests in flight
  3. cameras: the most 30-fps cameras (each offloading what the model's exit offloads on the
     test set) that our broker and its tail workers serve with every request answered and a
     hop p99 <= 50 ms (--budget-ms), searched for each uplink in turns (double until a count
     fails, then bisect), against the README's 1 600 (measured before the bandwidth work)
A step of table 3 repeats no message id (up to POOL requests), so the broker's duplicate rule
refuses nothing that only a reused id made look in flight; each step starts with the servers
idle (the previous step's answers all in, or given up on).

    python -m benchmarks.capacity                       # runs/default, a few minutes
    python -m benchmarks.capacity --seconds 2 --low-rate-requests 500 --start-cameras 400
    python -m benchmarks.capacity --dtype int8 --codec lz4     # another uplink beside none
    python -m benchmarks.capacity --tiny --artifacts DIR --data IDX_DIR   # seconds
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks import add_tiny, apply_tiny
from benchmarks.camera_search import CAMERA_FPS, Search, cameras
from benchmarks.common import free_port, metrics, start_pool
from benchmarks.echo_servers import echo_router, minimal_broker, minimal_echo_worker, \
    protocol_echo_worker
from benchmarks.hop_clients import WINDOW, answer_of, client_rate, dealer, low_rate_rtts, \
    window_rate
from monitoring.exposition import total
from pipeline.edge.config import AUTO, wire_codec, wire_dtype
from pipeline.edge.numpy_head import NumpyHead, exit_scores, load_numpy_head
from pipeline.errors import UserError
from pipeline.model.config import FASHION_MNIST_DIR
from pipeline.floor.data import load_test_split
from pipeline.floor import native
from pipeline.protocol import wire
from pipeline.protocol.wire import CODEC_NAMES, DTYPE_NAMES, Codec
from workers.broker import run_broker
from workers.config import BrokerConfig
from workers.pool import START_TIMEOUT_S, ProcessGroup, wait_until

P99_BUDGET_MS = 50.0
README_CAMERAS = 1600            # the README's figure, 30 % offloaded, before the bandwidth work
README_OFFLOAD = 0.3
POOL = 32768                     # most distinct requests (message ids) encoded per uplink


# -- what the edge sends ------------------------------------------------------------------------

@dataclass
class Uplink:
    """One way of putting features on the wire, and POOL requests made that way."""
    dtype: wire.DType
    codec: Codec
    requests: list = field(default_factory=list)   # [request] per message id 1..len
    encode_us: float = 0.0                         # wire.encode_request per frame
    wire_bytes: float = 0.0                        # per request, ZMTP framing included

    @property
    def name(self) -> str:
        return f"{self.dtype.name.lower()} + {self.codec.name.lower()}"


def unsure_features(artifacts: str, data: str) -> tuple[np.ndarray, float, NumpyHead]:
    """(features of the test frames the exit is unsure of, the fraction it offloads, the
    head): what the edge producer computes before it encodes a request."""
    head = load_numpy_head(artifacts)
    pixels = (load_test_split(data, head.input_shape, head.resize).images.astype(np.float32)
              / np.float32(255))
    logits, hidden = head.run_exit(pixels)
    unsure = np.flatnonzero(exit_scores(logits, head.score, head.temperature) < head.threshold)
    if len(unsure) == 0:   # an exit sure of every frame offloads none: send them all
        unsure = np.arange(len(pixels))
    return head.run_uplink(hidden[unsure]), len(unsure) / len(pixels), head


def requests_for(uplink: Uplink, features: np.ndarray, tag: bytes, code, count: int) -> None:
    """`count` one-frame requests, message ids 1..count, the unsure frames in turn."""
    start = time.perf_counter()
    uplink.requests = [wire.encode_request(i + 1, tag, features[i % len(features)][None],
                                           uplink.dtype, uplink.codec, code)
                       for i in range(count)]
    uplink.encode_us = (time.perf_counter() - start) / count * 1e6
    uplink.wire_bytes = float(np.mean([wire.wire_bytes(r) for r in uplink.requests]))


def uplinks(args: argparse.Namespace, head: NumpyHead) -> list[Uplink]:
    """The edge's uplink for --dtype/--codec (auto: what the artifact implies), then the
    same dtype without a codec."""
    dtype = wire_dtype(args.dtype, head.uplink_bits)
    shipped = Uplink(dtype, wire_codec(args.codec, dtype, head.code))
    return [shipped] if shipped.codec == Codec.NONE else [shipped, Uplink(dtype, Codec.NONE)]


# -- the run ------------------------------------------------------------------------------------

def measure(name: str, address: str, requests: list, args, rows: list) -> None:
    sock = dealer(address)
    try:
        # a first round trip proves the path is up (the broker has its workers)
        sock.send_multipart(requests[0])
        if not sock.poll(START_TIMEOUT_S * 1000):
            raise RuntimeError(f"{name}: no answer within {START_TIMEOUT_S:.0f} s")
        if not answer_of(sock)[1]:
            raise RuntimeError(f"{name}: the first request was refused")
        rtt = low_rate_rtts(sock, requests, args.low_rate_requests)
        rate = window_rate(sock, requests, args.seconds)
    finally:
        sock.close()
    rows.append((name, np.percentile(rtt, 50), np.percentile(rtt, 99), rate))
    print(f"I: {name}: p50 {rows[-1][1]:.3f} ms, p99 {rows[-1][2]:.3f} ms, {rate:.0f} msg/s",
          flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def brokers_rate(brokers: int, clients: int, requests: list, tag: bytes, args,
                 registry) -> tuple[float, float]:
    """Messages/s summed over `clients` client processes, spread over `brokers` brokers with
    an echo worker each; and the busiest broker's CPU use meanwhile, in cores (1.0: it is
    the limit)."""
    spawn = multiprocessing.get_context("spawn")
    group, fronts = ProcessGroup(), []
    try:
        for i in range(brokers):
            front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            group.start(f"broker-{i}", run_broker, BrokerConfig(frontend=front, backend=back))
            group.start(f"echo-{i}", protocol_echo_worker, back, tag)
            fronts.append(front)
        wait_until(lambda: total(registry, "splitexit_broker_workers") >= brokers,
                   START_TIMEOUT_S, "an echo worker known to each broker", group.procs)
        rates = spawn.Queue()
        procs = [spawn.Process(target=client_rate, daemon=True,
                               args=(fronts[i % brokers], requests, args.seconds, rates))
                 for i in range(clients)]
        pids = [p.pid for p in group.procs if p.name.startswith("broker")]
        cpu, start = [cpu_seconds(pid) for pid in pids], time.monotonic()
        for p in procs:
            p.start()
        total_rate = sum(rates.get(timeout=START_TIMEOUT_S + 10 * args.seconds)
                         for _ in procs)
        busiest = max(cpu_seconds(pid) - before for pid, before in zip(pids, cpu)) \
            / (time.monotonic() - start)
        for p in procs:
            p.join()
    finally:
        group.stop()
    print(f"I: {brokers} broker(s), {clients} clients: {total_rate:.0f} msg/s, the busiest "
          f"broker at {busiest:.2f} of a core", flush=True)
    return total_rate, busiest


def parse(argv: list[str] | None) -> argparse.Namespace:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str):   # one line, as the CLI's user errors
            self.exit(2, f"capacity: error: {message} (see --help)\n")

    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="runs/default", help="the trained model folder")
    ap.add_argument("--data", default=FASHION_MNIST_DIR, help="the test frames' folder")
    ap.add_argument("--dtype", default=AUTO, choices=[AUTO, *DTYPE_NAMES],
                    help="as the edge's --dtype (auto: what the model's uplink was trained for)")
    ap.add_argument("--codec", default=AUTO, choices=[AUTO, *CODEC_NAMES],
                    help="as the edge's --codec (auto: the model's static code if it has one); "
                         "the same dtype with codec none always runs beside it")
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    ap.add_argument("--low-rate-requests", type=int, default=2000)
    ap.add_argument("--offload", type=float, help="fraction of its frames a camera offloads "
                    "(default: what the model's exit offloads on the test frames)")
    ap.add_argument("--budget-ms", type=float, default=P99_BUDGET_MS,
                    help="the hop p99 a count of cameras must hold (default: %(default)s)")
    ap.add_argument("--start-cameras", type=int, default=100)
    ap.add_argument("--max-cameras", type=int, default=6400)
    ap.add_argument("--resolution", type=float, default=0.1, help="the search stops when the "
                    "fewest cameras that failed are within this fraction of the most that held")
    ap.add_argument("--tries", type=int, default=2,
                    help="a count of cameras fails only when this many steps at it failed")
    ap.add_argument("--workers", type=int, default=2, help="tail workers")
    ap.add_argument("--brokers", type=int, default=2, help="brokers in the scale-out rows, "
                    "and client processes in both (default: %(default)s)")
    add_tiny(ap)
    args = ap.parse_args(argv)
    apply_tiny(ap, args, seconds=0.3, low_rate_requests=20, workers=1, start_cameras=5,
               max_cameras=10, budget_ms=2000.0)
    for wrong, rule in ((args.seconds <= 0, "--seconds must be positive"),
                        (args.low_rate_requests < 10, "--low-rate-requests must be >= 10"),
                        (args.offload is not None and not 0 < args.offload <= 1,
                         "--offload must be in (0, 1]"),
                        (args.budget_ms <= 0, "--budget-ms must be positive"),
                        (not 1 <= args.start_cameras <= args.max_cameras,
                         "want 1 <= --start-cameras <= --max-cameras"),
                        (args.resolution <= 0, "--resolution must be positive"),
                        (args.tries < 1, "--tries must be >= 1"),
                        (args.workers < 1, "--workers must be >= 1"),
                        (args.brokers < 1, "--brokers must be >= 1")):
        if wrong:
            ap.error(rule)
    return args


def run(args: argparse.Namespace) -> None:
    features, offload, head = unsure_features(args.artifacts, args.data)
    args.offload = args.offload or offload
    links = uplinks(args, head)
    tag = wire.model_tag(head.model_id)
    registry = metrics()  # before any server starts: they write their metrics where it reads
    most = args.max_cameras * CAMERA_FPS * args.offload * args.seconds
    count = int(min(POOL, max(2 * WINDOW, args.low_rate_requests, math.ceil(most))))
    for link in links:
        requests_for(link, features, tag, head.code, count)
    print(f"I: {args.artifacts}: {len(features)} test frames offloaded "
          f"({100 * offload:.1f} %), {head.width} features; {count} requests per uplink; "
          f"coder: {native.coder_status()}", flush=True)
    spawn = multiprocessing.get_context("spawn")
    shipped = links[0].requests
    rows: list = []

    def run_server(name, targets, address):
        procs = [spawn.Process(target=t, args=a, daemon=True) for t, a in targets]
        for p in procs:
            p.start()
        try:
            measure(name, address, shipped, args, rows)
        finally:
            for p in procs:
                p.kill()
                p.join()

    direct = f"tcp://127.0.0.1:{free_port()}"
    run_server("direct DEALER-ROUTER", [(echo_router, (direct,))], direct)
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    run_server("minimal Python broker + echo worker",
               [(minimal_broker, (front, back)), (minimal_echo_worker, (back,))], front)

    group = ProcessGroup()
    try:  # ours, with a protocol-speaking echo worker: the broker's own cost
        front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        group.start("broker", run_broker, BrokerConfig(front, back))
        group.start("echo", protocol_echo_worker, back, tag)
        wait_until(lambda: total(registry, "splitexit_broker_workers") >= 1, START_TIMEOUT_S,
                   "the echo worker known to the broker", group.procs)
        measure("our broker + echo worker", front, shipped, args, rows)
    finally:
        group.stop()
    scale = [(n, brokers_rate(n, args.brokers, shipped, tag, args, registry))
             for n in (1, args.brokers)]
    group = ProcessGroup()
    try:  # ours, end to end on the server side: broker + real tail workers, each uplink
        front, _, _ = start_pool(group, args.artifacts, args.workers)
        for link in links:
            measure(f"our broker + {args.workers} tail worker{'s' * (args.workers > 1)}, "
                    f"{link.name}", front, link.requests, args, rows)
        searches = cameras(front, links, args)
    finally:
        group.stop()
    report(args, links, rows, searches, scale)


def report(args, links: list[Uplink], rows: list, searches: list[Search],
           scale: list[tuple[int, float]]) -> None:
    print("\n| uplink | bytes a request on the wire | edge encode µs a frame |\n|---|---|---|")
    for link in links:
        print(f"| {link.name} | {link.wire_bytes:.1f} | {link.encode_us:.1f} |")
    floor_rtt, floor_rate = rows[1][1], rows[1][3]
    print("\n| path | hop p50 ms | hop p99 ms | vs minimal broker p50 | msg/s (window "
          f"{WINDOW}) | vs minimal broker msg/s |\n|---|---|---|---|---|---|")
    for name, p50, p99, rate in rows:
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / floor_rtt:.2f}x | {rate:.0f} | "
              f"{100 * rate / floor_rate:.0f} % |")
    print(f"\n| brokers, an echo worker each | clients | msg/s (window {WINDOW} a client) | "
          f"vs one broker | busiest broker, cores |\n|---|---|---|---|---|")
    for brokers, (rate, busiest) in scale:
        print(f"| {brokers} | {args.brokers} | {rate:.0f} | {rate / scale[0][1][0]:.2f}x | "
              f"{busiest:.2f} |")
    print(f"\n| uplink | cameras at {CAMERA_FPS:g} fps, {100 * args.offload:.1f} % offloaded | "
          f"requests/s | hop p50 ms | hop p99 ms | answered | p99 <= {args.budget_ms:g} ms |\n"
          f"|---|---|---|---|---|---|---|")
    for link, search in zip(links, searches):
        for s in search.steps:
            print(f"| {link.name} | {s.cameras} | {s.rate:.0f} | {s.p50:.2f} | {s.p99:.2f} | "
                  f"{s.replies}/{s.sent} | {'yes' if s.ok else 'no'} |")
    readme_rate = README_CAMERAS * CAMERA_FPS * README_OFFLOAD
    print(f"\n| uplink | capacity, cameras | requests/s | vs {links[-1].name} | vs the README's "
          f"{README_CAMERAS} cameras ({readme_rate:.0f} requests/s) |\n|---|---|---|---|---|")
    for link, search in zip(links, searches):
        at = search.at_capacity
        rate = at.rate if at else 0.0
        bound = "" if search.failed else f" (>=, --max-cameras {args.max_cameras} held)"
        print(f"| {link.name} | {search.held}{bound} | {rate:.0f} | "
              f"{search.held / max(1, searches[-1].held):.2f}x | {rate / readme_rate:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse(argv))
    except UserError as e:     # no model, no data, a bad option: one line, no traceback
        print(f"capacity: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a server that stopped answering
        print(f"capacity: failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
