"""The edge: head + exit on every frame, offload the unsure ones, one answer each.

`AsyncEdge` is both the library's asyncio API (`submit` a frame, await its final answer;
`classify` one locally) and the CLI's producer (`run(source)` submits a source's frames from
a capture thread). `pipeline.edge.blocking.Edge` is the same object for a plain loop.

One asyncio loop, one coroutine per concern (pyzmq's coroutines.py shape), all of them thin
I/O around the pure in-flight table (pipeline.edge.inflight), which owns the exactly-one-
answer rule:
    submit   - frames enter one bounded queue: from the caller's coroutine, the caller's
               thread (Edge) or the capture thread that reads a source; never from the network
    process  - head + exit; confident -> final local answer; else open a request in the table
               and send it (never blocks: a full send queue means the server is unreachable)
    receive  - poll, then read (never wait_for(recv): pyzmq #1925 loses the message) answers
    expire   - sleeps until the table's next deadline, then lets the table expire what is due
    watch    - the socket's handshake events: readiness, and a rejected CURVE key said once

Answers go out in batches (`_deliver`): the results file's lines first, then the metrics, then
the callers' futures, so a frame counted as answered is in the file (kill -9 included).
`stop()` (SIGTERM, Ctrl-C for a producer) ends capture; the frames already taken get their
answers, each by its deadline at the latest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY, CollectorRegistry
from zmq.utils.monitor import parse_monitor_message

from monitoring.metrics import PATHS, CounterDeltas, EdgeMetrics, ProcessMetrics, for_registry
from pipeline import __version__
from pipeline.edge.config import EdgeConfig, wire_codec, wire_dtype
from pipeline.edge.controller import Controller, State
from pipeline.edge.shadows import Shadows
from pipeline.edge.inflight import BAD_REPLY_REASONS, FALLBACK_REASONS, InFlight, Resolution, \
    Status, reply_fault
from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.edge.results import Outcome, Results, Summary, log_summary
from pipeline.edge.sources import Frame, as_pixels
from pipeline.env import from_env
from pipeline.errors import ConfigError, UserError
from pipeline.protocol import wire
from pipeline.protocol.security import HANDSHAKE_FAILED, HANDSHAKE_HINT
from pipeline.protocol.wire import WireError

__all__ = ["AsyncEdge", "LocalAnswer", "run_producer"]

log = logging.getLogger(__name__)

CAPTURE_QUEUE_FRAMES = 256      # frames between the capture thread and the head (files, replay)
LIVE_QUEUE_FRAMES = 2           # ... for cameras and streams: stale frames are dropped upstream
RECEIVE_BURST = 1000            # answers read per wake-up before yielding to the other tasks
REQUEST_STATUSES = tuple(s.value for s in (Status.ANSWERED, Status.REFUSED, Status.DEADLINE,
                                           Status.UNREACHABLE))
LINK_EVENTS = HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
API_SOURCE = "python"           # the source name of frames submitted without one
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)   # a producer process stops on these


@dataclass(frozen=True)
class LocalAnswer:
    """What the edge alone says about a frame: the exit's class and calibrated confidence,
    and whether that is sure enough to be the final answer (else `submit` would offload it)."""
    cls: int
    confidence: float
    sure: bool


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
        cfg = edge_config(cfg, settings)
        self.cfg = cfg
        self.head = load_numpy_head(artifacts)
        self.threshold, self.score = self.head.threshold, self.head.score
        self.classes = len(self.head.classes)       # a reply's class index is below this
        self.model_tag = wire.model_tag(self.head.model_id)
        self.dtype = wire_dtype(cfg.dtype, self.head.uplink_bits)
        self.codec = wire_codec(cfg.codec, self.dtype, self.head.code)
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self._frames: queue.Queue | None = None     # (frame, future | None), None ends
        self._answers: dict[int, asyncio.Future | concurrent.futures.Future] = {}
        self._frame_ids = itertools.count()
        self._source = None                          # run()'s, for its drop counts
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._stopping = threading.Event()           # stop(): read by the capture thread
        self._pending: list[tuple[Outcome, Frame]] = []   # finished, not yet delivered
        self._arrived: asyncio.Event | None = None
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = cfg.send_queue
        self.sock.identity = f"edge-{cfg.producer_id}-{os.getpid()}-{id(self):x}".encode()
        cfg.security.client_socket(self.sock)
        self.monitor = self.sock.get_monitor_socket(LINK_EVENTS)
        self._linked = self._told_unreachable = False   # a broker ever answered the link
        self.sock.connect(cfg.broker)
        self.inflight = InFlight(cfg.deadline_ms / 1000)
        controller = cfg.controller()
        self.controller = controller and Controller(
            controller, self.threshold, wire.wire_bytes(wire.encode_request(
                1, self.model_tag, np.zeros((1, self.head.width), np.float32), self.dtype,
                wire.Codec.NONE)))   # a first guess at a frame's bytes, until some are sent
        self.results = Results(cfg.results)
        self.summary: Summary = self.results.summary
        self.shadows = Shadows(cfg.shadow) if cfg.shadow else None
        if self.shadows is not None:
            self.summary.shadows = self.shadows.counts
        self._opened: asyncio.Event | None = None    # a request entered an empty table
        self._settled: asyncio.Event | None = None   # the table became empty
        m, p = for_registry(EdgeMetrics, registry), str(cfg.producer_id)
        common = for_registry(ProcessMetrics, registry)
        self.m_ready = common.ready.labels("edge")   # metric children bound once
        common.build_info.labels("edge", __version__, self.head.model_id).set(1)
        self.m_bad = common.bad_messages
        self.m_handshake_failures = common.handshake_failures.labels("edge")
        self.m_frames = {path: m.frames.labels(p, path) for path in PATHS}
        self.m_latency = {path: m.latency.labels(p, path) for path in PATHS}
        self.m_head = m.head.labels(p)
        self.m_fallbacks = {r: m.fallbacks.labels(p, r) for r in FALLBACK_REASONS}
        self.m_requests = {s: m.requests.labels(p, s) for s in REQUEST_STATUSES}
        self.m_uplink, self.m_feature = m.uplink_bytes.labels(p), m.feature_bytes.labels(p)
        self.m_payload, self.m_duplicates = m.payload_bytes.labels(p), m.duplicates.labels(p)
        self.m_bad_replies = {r: m.bad_replies.labels(p, r) for r in BAD_REPLY_REASONS}
        self.m_exit_confidence = m.exit_confidence.labels(p)
        self._shadow_counts = CounterDeltas({
            **{o: m.shadows.labels(p, o) for o in ("sent", "answered", "dropped")},
            "agreed": m.shadow_agreements.labels(p),
            "exit_correct": m.shadow_exit_correct.labels(p)})
        self.m_shadow_bytes = m.shadow_bytes.labels(p)
        self.m_threshold = m.threshold.labels(p)
        self.m_threshold.set(self.threshold)
        self._source_counts = CounterDeltas({"dropped": m.source_dropped.labels(p),
                                             "reconnects": m.source_reconnects.labels(p)})
        if self.controller:
            kind, target = (("offload_ratio", cfg.target_offload) if cfg.target_offload
                            else ("uplink_bytes_per_second", cfg.uplink_budget))
            m.controller_target.labels(p, kind).set(target)
            self.m_ratio, self.m_state = m.controller_ratio.labels(p), m.controller_state.labels(p)
            self._controller_exported: tuple | None = None

    # -- the API ------------------------------------------------------------------------------

    def classify(self, image: np.ndarray) -> LocalAnswer:
        """The exit's answer for one frame, here and now: no network, nothing recorded."""
        logits, _ = self.head.run_exit(self._pixels(image)[None])
        score = float(exit_scores(logits, self.score, self.head.temperature)[0])
        return LocalAnswer(int(logits[0].argmax()), score, score >= self.threshold_now)

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
        """Queue from the loop's own thread, waiting for room; None ends the queue, and no
        frame may follow it."""
        while True:
            if item is not None and (self._closed or not self._tasks):
                raise UserError("this edge is not running: submit inside `async with`, "
                                "or after start() and before close()")
            try:
                self._frames.put_nowait(item)
                break
            except queue.Full:
                self._room.clear()
                await self._room.wait()
        self._arrived.set()

    def frame(self, image: np.ndarray, label: int | None = None,
              source: str = API_SOURCE) -> Frame:
        """A frame of this edge's own numbering, captured now."""
        return Frame(next(self._frame_ids), self._pixels(image), label, source, time.time())

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        return as_pixels(image, self.head.input_shape, self.head.resize)

    def put_threadsafe(self, frame: Frame | None,
                       answer: concurrent.futures.Future | None = None) -> None:
        """From another thread: queue a frame (blocking while the queue is full), or None to
        end; `answer` gets its Outcome."""
        self._frames.put((frame, answer) if frame is not None else None)
        self._loop.call_soon_threadsafe(self._arrived.set)

    async def start(self, queue_frames: int = CAPTURE_QUEUE_FRAMES) -> "AsyncEdge":
        if self._tasks:
            return self
        self._loop = asyncio.get_running_loop()
        self._frames = queue.Queue(queue_frames)
        self._arrived, self._room = asyncio.Event(), asyncio.Event()
        self._opened, self._settled = asyncio.Event(), asyncio.Event()
        self._tasks = [asyncio.create_task(c) for c in (
            self._process(), self._receive(), self._expire(), self._watch())]
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
        threading.Thread(target=self._capture, args=(source,), daemon=True,
                         name="capture").start()
        return await self._finish_run()

    def stop(self) -> None:
        """End run() early (SIGTERM, Ctrl-C): capture stops, the frames already taken get
        their answers (each by its deadline at the latest), then run() returns as at the
        source's end. From the loop's thread; a second call changes nothing."""
        self._stopping.set()
        if self._arrived is not None:
            self._arrived.set()

    @property
    def threshold_now(self) -> float:
        """The trained threshold, or the controller's latest."""
        return self.controller.threshold if self.controller else self.threshold

    # -- the one place a frame is finished ----------------------------------------------------

    def _finish(self, o: Outcome, frame: Frame) -> None:
        if 0 <= o.cls < len(self.head.classes):
            o.class_name = self.head.classes[o.cls]
        self._pending.append((o, frame))   # the frame lives until delivered (the table or
                                           # the batch held it so far)

    def _deliver(self) -> None:
        """Hand out the answers finished since the last call: their lines in the results
        file first (one write), then the metrics, then the callers' futures. Every wake-up
        that finishes frames ends here, before its next await."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        self.results.add([o for o, _ in pending])
        for o, frame in pending:
            self.m_frames[o.path].inc()
            self.m_latency[o.path].observe(o.latency_ms / 1000)
            if o.reason:
                self.m_fallbacks[o.reason].inc()
            answer = self._answers.pop(id(frame), None)
            if answer is not None:
                # its caller may have cancelled it, from another thread at any moment
                with contextlib.suppress(asyncio.InvalidStateError,
                                         concurrent.futures.InvalidStateError):
                    answer.set_result(o)

    def _resolve(self, r: Resolution) -> None:
        """Carry out what the in-flight table decided."""
        if r.status is Status.DUPLICATE:
            self.summary.duplicates += 1  # late, or a second answer after a redelivery
            self.m_duplicates.inc()
            if self.controller and r.reply:
                self._answered(r.reply, late=True)
            return
        if r.status is Status.REJECTED:
            self.m_bad_replies[r.reason].inc()  # the request's deadline decides
            return
        self.m_requests[r.status.value].inc()
        if self.controller:
            if r.status is Status.ANSWERED:
                self._answered(r.reply)
            else:
                self.controller.refused(r.finals[0].reason, time.monotonic())
        now, head_ms, reply = time.time(), r.note, r.reply
        for f in r.finals:
            self._finish(Outcome(
                f.frame.frame_id, f.frame.source, f.path, f.cls, f.confidence, f.frame.label,
                f.reason, f.frame.capture_ts, head_ms, (now - f.frame.capture_ts) * 1000,
                f.uplink_bytes, *((reply.worker_id, reply.queue_us, reply.tail_us, reply.batch)
                                  if reply else ())), f.frame)
        if not self.inflight:
            self._settled.set()

    # -- coroutines -----------------------------------------------------------------------------

    async def _finish_run(self) -> Summary:
        """Wait for the queue's end and the last answers (bounded by their deadlines), then
        stop the coroutines and let go of everything."""
        try:
            await self._tasks[0]    # process: returns at the queue's end
            while self.inflight:
                self._settled.clear()
                await self._settled.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._deliver()
            for answer in self._answers.values():   # only if processing failed
                if not answer.done():
                    answer.set_exception(RuntimeError("the edge stopped before answering"))
            self._release()
        return self.summary

    def _release(self) -> None:
        if self.shadows is not None:
            self.shadows.close()
            self._export_shadows()
        self.m_ready.set(0)
        self.sock.disable_monitor()
        self.monitor.close()
        self.results.close()
        self.sock.close()

    def _capture(self, source) -> None:
        """Thread: read frames and hand them over; blocks only when the head falls behind.
        After stop() it hands over nothing more: the run may be over, its loop closed."""
        try:
            for frame in source.frames():
                if self._stopping.is_set():
                    return
                self.put_threadsafe(frame)
        except RuntimeError:
            if not self._stopping.is_set():   # else: stopped while handing over
                raise
        finally:
            if not self._stopping.is_set():
                self.put_threadsafe(None)

    async def _next_frames(self) -> list:
        """Every frame waiting now (up to max_pack), or wait for one; None ends the queue,
        as does an empty queue after stop()."""
        while True:
            self._arrived.clear()
            batch = []
            while len(batch) < self.cfg.max_pack:
                try:
                    batch.append(self._frames.get_nowait())
                except queue.Empty:
                    if self._stopping.is_set():
                        batch.append(None)
                    break
            if batch:
                self._room.set()
                return batch
            await self._arrived.wait()

    def _export_source(self) -> None:
        """A live source's skipped frames and reconnects, as counted by its capture side."""
        self._source_counts.export({name: getattr(self._source, name, 0)
                                    for name in ("dropped", "reconnects")})

    async def _process(self) -> None:
        while True:
            batch = await self._next_frames()
            done = batch[-1] is None
            frames = []
            for item in batch:
                if item is not None:
                    frame, answer = item
                    frames.append(frame)
                    if answer is not None:
                        self._answers[id(frame)] = answer
            if frames:
                await self._handle(frames)
            if self._source is not None:
                self._export_source()
            if done:
                return

    async def _handle(self, batch: list) -> None:
        """Head + exit on the frames that are waiting; answer or pack the unsure into one
        request (packing adds no wait: only frames already here go together)."""
        start = time.perf_counter()
        exit_logits, hidden = self.head.run_exit(np.stack([f.pixels for f in batch]))
        scores = exit_scores(exit_logits, self.score, self.head.temperature)
        exit_cls = exit_logits.argmax(1).tolist()
        head_ms = (time.perf_counter() - start) * 1000 / len(batch)
        threshold = self._threshold(scores)
        for _ in batch:
            self.m_head.observe(head_ms / 1000)
        now, unsure, exited = time.time(), [], []
        for i, f in enumerate(batch):
            if scores[i] >= threshold:
                self._finish(Outcome(f.frame_id, f.source, "exit", exit_cls[i], float(scores[i]),
                                     f.label, None, f.capture_ts, head_ms,
                                     (now - f.capture_ts) * 1000), f)
                exited.append(i)
            else:
                unsure.append(i)
        self._deliver()
        if exited:
            self.m_exit_confidence.inc(float(scores[exited].sum()))
        if self.shadows is not None and exited:
            picked = [exited[j] for j in self.shadows.pick(len(exited))]
            if picked:
                await self._shadow(hidden[picked], [exit_cls[i] for i in picked])
        if not unsure:
            if self.controller:
                self.controller.sent(len(batch), 0, 0, time.monotonic())
            return
        offloaded = [batch[i] for i in unsure]
        features = self.head.run_uplink(hidden[unsure])  # (frames sent, W_split)
        request = wire.encode_request(self.inflight.next_id(), self.model_tag, features,
                                      self.dtype, self.codec, self.head.code)
        sent = wire.wire_bytes(request)
        msg_id = self.inflight.open(offloaded, [exit_cls[i] for i in unsure],
                                    [float(scores[i]) for i in unsure], sent, time.monotonic(),
                                    note=head_ms)
        self._opened.set()
        try:
            await self.sock.send_multipart(request, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._resolve(self.inflight.fail(msg_id))
            self._deliver()
            sent = 0
        if self.controller:
            self.controller.sent(len(batch), len(unsure), sent, time.monotonic())
        if not sent:
            return
        self.m_uplink.inc(sent)
        self.m_feature.inc(len(unsure) * wire.row_bytes(self.dtype, features.shape[1]))
        self.m_payload.inc(len(request[0]) - wire.REQUEST_HEADER_BYTES)

    async def _shadow(self, hidden: np.ndarray, exit_classes: list[int]) -> None:
        """Send frames the exit answered, to see whether the tail agrees; unless the server
        is loaded (the controller backs off, or shadows wait unanswered), then they are the
        first thing dropped."""
        now = time.monotonic()
        if not self.shadows.room(now) or (self.controller
                                          and self.controller.state is not State.TRACKING):
            self.shadows.skip(len(exit_classes))
            self._export_shadows()
            return
        msg_id = self.inflight.take_id()
        request = wire.encode_request(msg_id, self.model_tag, self.head.run_uplink(hidden),
                                      self.dtype, self.codec, self.head.code, shadow=True)
        self.shadows.open(msg_id, exit_classes, now)
        try:
            await self.sock.send_multipart(request, flags=zmq.NOBLOCK)
            self.m_shadow_bytes.inc(wire.wire_bytes(request))
        except zmq.Again:
            self.shadows.drop(msg_id)
        self._export_shadows()

    def _export_shadows(self) -> None:
        """Copy the shadow counts into the metrics (deltas since the last copy)."""
        self._shadow_counts.export(vars(self.shadows.counts))   # every ShadowCounts field

    def _answered(self, reply: wire.Reply, late: bool = False) -> None:
        """Tell the controller the server answered, and the load the answer came with."""
        self.controller.answered(time.monotonic(), reply.queued, reply.free_credit,
                                 (reply.queue_us + reply.tail_us) / 1e6, late,
                                 len(reply.classes))

    def _threshold(self, scores: np.ndarray) -> float:
        """The trained threshold, or the controller's for this batch."""
        if not self.controller:
            return self.threshold
        threshold = self.controller.observe(scores, time.monotonic())
        exported = (threshold, self.controller.ratio, self.controller.state)
        if exported != self._controller_exported:   # a gauge write per change, not per batch
            self._controller_exported = exported
            self.m_threshold.set(threshold)
            self.m_ratio.set(self.controller.ratio)
            self.m_state.set(self.controller.state)
        return threshold

    async def _receive(self) -> None:
        while True:
            await self.sock.poll(None, zmq.POLLIN)
            for _ in range(RECEIVE_BURST):
                try:
                    parts = await self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    answer = wire.decode_answer(parts)
                except WireError as e:
                    self.m_bad.labels("edge", e.reason).inc()
                    continue
                refused = isinstance(answer, wire.Error)
                fault = None if refused else reply_fault(answer, self.classes)
                if fault:
                    self.m_bad_replies[fault].inc()   # its frames wait for their deadline
                    continue
                if self.shadows is not None and (
                        self.shadows.refuse(answer) if refused else self.shadows.answer(answer)):
                    self._export_shadows()
                    continue
                self._resolve(self.inflight.refuse(answer) if refused
                              else self.inflight.answer(answer))
            self._deliver()

    async def _expire(self) -> None:
        """Wake at the next deadline, not on a polling tick."""
        while True:
            deadline = self.inflight.next_deadline()
            if deadline is None:
                self._opened.clear()
                await self._opened.wait()
                continue
            delay_s = deadline - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
                continue
            expired = self.inflight.expire(time.monotonic())
            for r in expired:
                self._resolve(r)
            if expired and not self._linked and not self._told_unreachable:
                self._told_unreachable = True   # once: every later frame would say it again
                log.warning(f"edge {self.cfg.producer_id}: no broker has answered at "
                            f"{self.cfg.broker}: offloaded frames get the exit's answer at "
                            f"their deadline; is `splitexit workers` or `up` running there?")
            self._deliver()

    async def _watch(self) -> None:
        """Ready while the link to the broker is up; a rejected key looks like a silent
        broker (libzmq #2227), so say it once."""
        told = False
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._linked = True
                self.m_ready.set(1)
            elif event == zmq.EVENT_DISCONNECTED:
                self.m_ready.set(0)
            elif event & HANDSHAKE_FAILED and not told:
                told = self._told_unreachable = True   # this line says why, not the other
                self.m_handshake_failures.inc()
                log.error(f"edge {self.cfg.producer_id}: {HANDSHAKE_HINT}")


def run_producer(artifact_dir: str, cfg: EdgeConfig, spec: str, fps: float | None = None,
                 limit: int | None = None, data_dir: str | None = None,
                 shard: tuple[int, int] | None = None, loop: bool = False) -> Summary:
    """Process entry point for one producer: open the source, run it to its end or to
    SIGTERM / SIGINT (then the frames taken are answered, the summary logged as at the end).
    A results file that failed (disk full) is a user error, after the run: every frame was
    answered all the same."""
    from pipeline.edge.sources import Shard, open_source

    count = shard[1] if shard else 1
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main_thread else {}

    async def main():
        producer = AsyncEdge(artifact_dir, cfg)
        # frames are fitted to what the head reads
        source = open_source(spec, fps=fps * count if fps else None, limit=limit,
                             data_dir=data_dir, loop=loop, shape=producer.head.input_shape,
                             resize=producer.head.resize)
        if main_thread:   # only there can Python handle signals
            _stop_on_signals(asyncio.get_running_loop(), producer)
        try:
            gc.freeze()  # the head and the libraries live as long as the process: a full
                         # collection must not walk them mid-stream
            return await producer.run(Shard(source, *shard) if shard else source), \
                producer.results
        finally:
            source.close()

    try:
        summary, results = asyncio.run(main())
        log_summary(summary)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    results.check()
    return summary


def _stop_on_signals(loop: asyncio.AbstractEventLoop, producer: AsyncEdge) -> None:
    """SIGTERM and SIGINT stop the producer (signal.signal, not the loop's handlers: those
    go with the loop, and a signal between its close and the summary would kill us)."""
    def stop(*_):
        with contextlib.suppress(RuntimeError):   # the loop has closed: the run is over
            loop.call_soon_threadsafe(producer.stop)
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
