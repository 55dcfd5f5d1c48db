"""Frames on their way to the head: one bounded queue that the caller's coroutine (`submit`),
the caller's thread (`Edge`) or a capture thread reading a source fill, and the edge's
process coroutine empties a batch at a time. None in the queue ends it; `stop` ends it early
(what was taken is still answered). A frame a caller waits on comes with a future, which
`answer` resolves with its Outcome."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading

__all__ = ["Intake"]


class Intake:
    """Made inside the edge's loop; `put_threadsafe` and `capture` work from other threads."""

    def __init__(self, size: int, stopping: threading.Event):
        self._loop = asyncio.get_running_loop()
        self._queue: queue.Queue = queue.Queue(size)   # items: (frame, future | None), None
        self._arrived, self._room = asyncio.Event(), asyncio.Event()
        self.stopping = stopping                       # read by the capture thread
        self._waiting: dict = {}                       # frame id -> its caller's future

    async def put(self, item: tuple | None) -> None:
        """From the loop's thread: queue `item`, waiting for room."""
        while True:
            try:
                self._queue.put_nowait(item)
                break
            except queue.Full:
                self._room.clear()
                await self._room.wait()
        self._arrived.set()

    def put_threadsafe(self, item: tuple | None) -> None:
        """From another thread: queue `item`, blocking while the queue is full."""
        self._queue.put(item)
        self._loop.call_soon_threadsafe(self._arrived.set)

    def stop(self) -> None:
        """From the loop's thread: the queue ends once what is in it was taken."""
        self.stopping.set()
        self._arrived.set()

    async def take(self, most: int) -> tuple[list, bool]:
        """(frames, ended): every frame waiting now (up to `most`), or wait for one; the
        queue ends at None, or when empty after stop()."""
        batch = await self._take(most)
        for frame, future in filter(None, batch):
            if future is not None:
                self._waiting[frame.frame_id] = future
        return [item[0] for item in batch if item is not None], batch[-1] is None

    def answer(self, outcomes: list) -> None:
        """Give the callers waiting on these frames their Outcome."""
        for o in outcomes:
            future = self._waiting.pop(o.frame, None)
            if future is not None:
                # its caller may have cancelled it, from another thread at any moment
                with contextlib.suppress(asyncio.InvalidStateError,
                                         concurrent.futures.InvalidStateError):
                    future.set_result(o)

    def fail_waiting(self, why: str) -> None:
        """The edge stopped with frames unanswered (only if processing failed)."""
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(RuntimeError(why))

    async def _take(self, most: int) -> list:
        while True:
            self._arrived.clear()
            batch = []
            while len(batch) < most:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    if self.stopping.is_set():
                        batch.append(None)
                    break
            if batch:
                self._room.set()
                return batch
            await self._arrived.wait()

    def capture(self, source) -> None:
        """Read `source`'s frames in a thread of their own, which blocks only when the head
        falls behind; after stop() it hands over nothing more (the run may be over, its loop
        closed)."""
        threading.Thread(target=self._capture, args=(source,), daemon=True,
                         name="capture").start()

    def _capture(self, source) -> None:
        try:
            for frame in source.frames():
                if self.stopping.is_set():
                    return
                self.put_threadsafe((frame, None))
        except RuntimeError:
            if not self.stopping.is_set():   # else: stopped while handing over
                raise
        finally:
            if not self.stopping.is_set():
                self.put_threadsafe(None)
