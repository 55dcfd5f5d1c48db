"""The edge: head + exit on every frame, offload the unsure ones, one answer each.

`AsyncEdge` is the I/O shell around the pure rules of pipeline.edge.core.EdgeCore (which
frames the exit answers, which are offloaded or shadowed, what each answer, refusal and
deadline makes of them): it runs the head, owns the socket and the coroutines, and hands the
core's outcomes out. It is the library's asyncio API (`submit` a frame, await its final
answer; `classify` one locally) and, with `run(source)` (frames read in a capture thread),
the CLI's producer; `pipeline.edge.blocking.Edge` is the same object for a plain loop.

One asyncio loop, one coroutine per concern (pyzmq's coroutines.py shape):
    process  - head + exit on the frames waiting; the core decides; send what it says to
               (never blocks: a full send queue means the server is unreachable)
    receive  - poll, then read (never wait_for(recv): pyzmq #1925 loses the message) answers
    expire   - sleeps until the core's next deadline, then lets it expire what is due
    watch    - the socket's handshake events: readiness, and a rejected CURVE key said once

Answers go out in batches (`_deliver`): the results file's lines first, then the metrics, then
the callers' futures, so a frame counted as answered is in the file (kill -9 included).
`stop()` (SIGTERM, Ctrl-C for a producer) ends capture; the frames already taken get their
answers, each by its deadline at the latest. The producer process around it (a source, the
signals): pipeline.edge.producer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY, CollectorRegistry

from pipeline.edge.brokers import Brokers
from pipeline.edge.config import EdgeConfig, wire_codec, wire_dtype
from pipeline.edge.core import EdgeCore, Plan
from pipeline.edge.intake import Intake
from pipeline.edge.link import BrokerLink
from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.edge.results import Outcome, Results, Summary
from pipeline.edge.source_base import Frame, as_pixels
from pipeline.edge.telemetry import EdgeTelemetry
from pipeline.env import from_env
from pipeline.errors import ConfigError, UserError
from pipeline.protocol import wire
from pipeline.protocol.endpoints import split_endpoints

__all__ = ["AsyncEdge", "LocalAnswer", "API_SOURCE"]

log = logging.getLogger(__name__)

CAPTURE_QUEUE_FRAMES = 256      # frames between the capture thread and the head (files, replay)
LIVE_QUEUE_FRAMES = 2           # ... for cameras and streams: stale frames are dropped upstream
API_SOURCE = "python"           # the source name of frames submitted without one


@dataclass(frozen=True)
class LocalAnswer:
    """What the edge alone says about a frame: the exit's class and calibrated confidence,
    whether the frame is unlike the training set (its unfamiliarity score over the trained
    threshold), and whether the exit's answer would be final (sure, and not unfamiliar;
    else `submit` would offload it)."""
    cls: int
    confidence: float
    sure: bool
    unfamiliar: bool = False
    unfamiliarity: float = 0.0   # the score itself (pipeline.floor.unfamiliar)


def edge_config(cfg: EdgeConfig | None, settings: dict) -> EdgeConfig:
    """`cfg` with keyword settings on top; the broker, unless given, from SPLITEXIT_FRONTEND
    (as for `splitexit edge`)."""
    known = [f.name for f in dataclasses.fields(EdgeConfig)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"unknown edge setting {', '.join(unknown)}; known: "
                          f"{', '.join(known)}")
    if cfg is None:
        settings.setdefault("broker", from_env("--frontend", EdgeConfig.broker))
    return dataclasses.replace(cfg or EdgeConfig(), **settings).validate()


class AsyncEdge:
    """An edge: load the head once, then answer frames: `classify` (local, no network),
    `await submit(frame)` (exit, offload or fallback, as the CLI decides), `run(source)`.

        async with AsyncEdge("runs/default", broker="tcp://127.0.0.1:5555") as edge:
            answer = await edge.submit(image)   # an Outcome: .cls, .path, .confidence
    """

    def __init__(self, artifacts: str | Path, cfg: EdgeConfig | None = None, *,
                 ctx: zmq.asyncio.Context | None = None, registry: CollectorRegistry = REGISTRY,
                 **settings):
        self.cfg = cfg = edge_config(cfg, settings)
        self.head = load_numpy_head(artifacts)
        self.model_tag = wire.model_tag(self.head.model_id)
        self.dtype = wire_dtype(cfg.dtype, self.head.uplink_bits)
        self.codec = wire_codec(cfg.codec, self.dtype, self.head.code)
        first_guess = wire.wire_bytes(wire.encode_request(   # a frame's bytes, until some
            1, self.model_tag, np.zeros((1, self.head.width), np.float32), self.dtype,
            wire.Codec.NONE))                                # are sent
        endpoints = split_endpoints(cfg.broker)
        self.core = EdgeCore(self.head.threshold, cfg.deadline_ms / 1000, self.head.classes,
                             controller=cfg.controller(), shadow=cfg.shadow,
                             brokers=Brokers(endpoints, self.edge_id()),
                             bytes_per_offload_hint=first_guess)
        self.telemetry = EdgeTelemetry(registry, cfg.producer_id, self.head.model_id, self.core)
        self.results = Results(cfg.results)
        self.summary: Summary = self.results.summary
        if self.core.shadows is not None:
            self.summary.shadows = self.core.shadows.counts
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self._intake: Intake | None = None           # made by start(), in the loop
        self._frame_ids = itertools.count()
        self._source = None                          # run()'s, for its drop counts
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._stopping = threading.Event()           # stop(), maybe before start()
        self.links = [BrokerLink(self.ctx, endpoint, cfg.security, cfg.send_queue,
                                 cfg.producer_id, self.telemetry) for endpoint in endpoints]
        self._told_unreachable = False

    def edge_id(self) -> str:
        """What ranks the brokers for this edge: unique per edge object and host, so that
        edges spread over the brokers (pipeline.edge.brokers)."""
        return f"{socket.gethostname()}-{os.getpid()}-{self.cfg.producer_id}-{id(self):x}"

    # -- the API ------------------------------------------------------------------------------

    def classify(self, image: np.ndarray) -> LocalAnswer:
        """The exit's answer for one frame, here and now: no network, nothing recorded."""
        logits, hidden = self.head.run_exit(self._pixels(image)[None])
        score = float(exit_scores(logits, self.head.score, self.head.temperature)[0])
        distance, unfamiliar = self.head.unfamiliar(hidden)
        return LocalAnswer(int(logits[0].argmax()), score,
                           score >= self.threshold_now and not unfamiliar[0],
                           bool(unfamiliar[0]), float(distance[0]))

    async def submit(self, image: np.ndarray, label: int | None = None,
                     source: str = API_SOURCE) -> Outcome:
        """The final answer for one frame, by the CLI's rules: the exit's if it is sure, else
        the server's, else (refused, late, unreachable) the exit's as a fallback. Waits for
        room when frames come faster than the head runs; many can be in flight at once
        (asyncio.gather). Each frame is counted and exported like the CLI's."""
        answer = asyncio.get_running_loop().create_future()
        await self._put((self.frame(image, label, source), answer))
        return await answer

    async def _put(self, item: tuple | None) -> None:
        """None ends the queue, and no frame may follow it."""
        if item is not None and (self._closed or not self._tasks):
            raise UserError("this edge is not running: submit inside `async with`, "
                            "or after start() and before close()")
        await self._intake.put(item)

    def frame(self, image: np.ndarray, label: int | None = None,
              source: str = API_SOURCE) -> Frame:
        """A frame of this edge's own numbering (what its answer is found by), captured now."""
        return Frame(next(self._frame_ids), self._pixels(image), label, source, time.time())

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        return as_pixels(image, self.head.input_shape, self.head.resize)

    def put_threadsafe(self, frame: Frame | None,
                       answer: concurrent.futures.Future | None = None) -> None:
        """From another thread: queue a frame (blocking while the queue is full), or None to
        end; `answer` gets its Outcome (then the frame must come from `frame()`)."""
        self._intake.put_threadsafe((frame, answer) if frame is not None else None)

    async def start(self, queue_frames: int = CAPTURE_QUEUE_FRAMES) -> "AsyncEdge":
        if self._tasks:
            return self
        self._intake = Intake(queue_frames, self._stopping)
        self._opened, self._settled = asyncio.Event(), asyncio.Event()
        self._tasks = [asyncio.create_task(c) for c in (
            self._process(), self._expire(), *map(self._receive, self.links),
            *(link.watch(functools.partial(self._link_changed, i))
              for i, link in enumerate(self.links)))]
        return self

    async def close(self) -> Summary:
        """Answer every frame submitted so far (each within its deadline), then let go of
        the socket; returns the counts."""
        if self._closed:
            return self.summary
        self._closed = True
        if not self._tasks:
            self._release()
            return self.summary
        await self._put(None)
        return await self._finish_run()

    async def __aenter__(self) -> "AsyncEdge":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(self, source) -> Summary:
        """Every frame of `source` (pipeline.edge.sources), read in a capture thread, until
        it ends; then the last answers."""
        # A live source keeps only its newest frame itself; a deep queue here would undo that.
        await self.start(LIVE_QUEUE_FRAMES if getattr(source, "live", False)
                         else CAPTURE_QUEUE_FRAMES)
        self._source, self._closed = source, True
        self._intake.capture(source)
        return await self._finish_run()

    def stop(self) -> None:
        """End run() early (SIGTERM, Ctrl-C): capture stops, the frames already taken get
        their answers (each by its deadline at the latest), then run() returns as at the
        source's end. From the loop's thread; a second call changes nothing."""
        self._stopping.set()
        if self._intake is not None:
            self._intake.stop()

    @property
    def threshold_now(self) -> float:
        """The trained threshold, or the controller's latest."""
        return self.core.threshold

    # -- the one place frames are handed out ----------------------------------------------------

    def _deliver(self, outcomes: list[Outcome] = ()) -> None:
        """Hand out finished answers: their lines in the results file first (one write), then
        the metrics, then the callers' futures. Every wake-up ends here, before its next
        await, so the counts the core kept meanwhile are exported too."""
        if outcomes:
            wall = time.time()
            for o in outcomes:
                o.latency_ms = (wall - o.capture_ts) * 1000
            self.results.add(outcomes)
            self.telemetry.handed_out(outcomes)
            self._intake.answer(outcomes)
        self.summary.duplicates = self.core.counts["duplicates"]
        self.telemetry.export(self._source)
        if not len(self.core):
            self._settled.set()

    # -- coroutines -----------------------------------------------------------------------------

    async def _finish_run(self) -> Summary:
        """Wait for the queue's end and the last answers (bounded by their deadlines), then
        stop the coroutines and let go of everything."""
        try:
            await self._tasks[0]    # process: returns at the queue's end
            while len(self.core):
                self._settled.clear()
                await self._settled.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._intake.fail_waiting("the edge stopped before answering")
            self._release()
        return self.summary

    def _release(self) -> None:
        self.core.close()
        self.telemetry.export(self._source)
        self.telemetry.ready.set(0)
        for link in self.links:
            link.close()
        self.results.close()

    async def _process(self) -> None:
        while True:
            frames, ended = await self._intake.take(self.cfg.max_pack)
            if frames:
                await self._handle(frames)
            if ended:
                return

    async def _handle(self, frames: list[Frame]) -> None:
        """Head + exit on the frames that are waiting, then what the core decides: answer
        the sure, pack the unsure into one request (packing adds no wait: only frames
        already here go together), shadow a few of the sure."""
        start = time.perf_counter()
        exit_logits, hidden = self.head.run_exit(np.stack([f.pixels for f in frames]))
        scores = exit_scores(exit_logits, self.head.score, self.head.temperature)
        _, unfamiliar = self.head.unfamiliar(hidden)
        head_ms = (time.perf_counter() - start) * 1000 / len(frames)
        self.telemetry.ran_head(head_ms, len(frames))
        plan = self.core.decide(frames, exit_logits.argmax(1).tolist(), scores, head_ms,
                                time.monotonic(), unfamiliar)
        self._deliver(plan.local)
        if plan.shadow:
            msg_id = self.core.open_shadow(plan, time.monotonic())
            request = self._request(msg_id, self.head.run_uplink(hidden[plan.shadow]),
                                    shadow=True)
            self.core.shadow_sent(msg_id, wire.wire_bytes(request)
                                  if await self.links[plan.broker].send(request) else None)
        if plan.offload:
            self._deliver(await self._offload(plan, hidden[plan.offload]))

    async def _offload(self, plan: Plan, hidden: np.ndarray) -> list[Outcome]:
        features = self.head.run_uplink(hidden)   # (frames sent, W_split)
        request = self._request(self.core.next_msg_id(), features)
        size = wire.wire_bytes(request)
        msg_id = self.core.open_request(plan, size, time.monotonic())
        self._opened.set()
        sent = await self.links[plan.broker].send(request)
        return self.core.request_sent(
            plan, msg_id, sent, size, len(features) * wire.row_bytes(self.dtype, features.shape[1]),
            len(request[0]) - wire.REQUEST_HEADER_BYTES, time.monotonic())

    def _request(self, msg_id: int, features: np.ndarray, shadow: bool = False) -> list:
        return wire.encode_request(msg_id, self.model_tag, features, self.dtype, self.codec,
                                   self.head.code, shadow=shadow)

    async def _receive(self, link: BrokerLink) -> None:
        while True:   # from any broker: msg_ids are this edge's own
            answers = await link.receive()
            self._deliver([o for a in answers for o in self.core.receive(a, time.monotonic())])

    async def _expire(self) -> None:
        """Wake at the next deadline, not on a polling tick."""
        while True:
            deadline = self.core.next_deadline()
            if deadline is None:
                self._opened.clear()
                await self._opened.wait()
                continue
            delay_s = deadline - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
                continue
            expired = self.core.expire(time.monotonic())
            if expired and not (self._told_unreachable or any(
                    link.linked or link.key_rejected for link in self.links)):
                self._told_unreachable = True   # once: every later frame would say it again
                log.warning(f"edge {self.cfg.producer_id}: no broker has answered at "
                            f"{self.cfg.broker}: offloaded frames get the exit's answer at "
                            f"their deadline; is `splitexit workers` or `up` running there?")
            self._deliver(expired)

    def _link_changed(self, i: int, up: bool) -> None:
        """Ready while any broker's link stands; the core routes around one that dropped."""
        if up:
            self.core.brokers.link_up(i, time.monotonic())
        else:
            self.core.brokers.link_down(i)
        self.telemetry.ready.set(int(any(link.up for link in self.links)))
        self.telemetry.export(self._source)
