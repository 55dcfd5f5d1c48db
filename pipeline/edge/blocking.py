"""The edge for a plain loop (an OpenCV `while` loop, a thread pool, a web handler):
`pipeline.edge.async_edge.AsyncEdge` running in an asyncio loop of its own, in a thread.

    with Edge("runs/default") as edge:
        future = edge.submit(image)       # a concurrent.futures.Future of the final answer
        edge.classify(image)              # the exit alone, here and now
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry

from pipeline.edge.config import EdgeConfig
from pipeline.edge.async_edge import API_SOURCE, AsyncEdge, LocalAnswer
from pipeline.edge.results import Outcome, Summary
from pipeline.errors import UserError

__all__ = ["Edge"]


class Edge:
    """Takes the same arguments as AsyncEdge; every method may be called from any thread."""

    def __init__(self, artifacts: str | Path, cfg: EdgeConfig | None = None, *,
                 registry: CollectorRegistry = REGISTRY, **settings):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="splitexit-edge")
        self._thread.start()
        self._lock = threading.Lock()   # submit vs close: nothing queued after the end
        self._closed = False

        async def open_edge() -> AsyncEdge:   # its sockets belong to the loop's thread
            return await AsyncEdge(artifacts, cfg, registry=registry, **settings).start()

        try:
            self._edge = self._call(open_edge())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def summary(self) -> Summary:
        return self._edge.summary

    def classify(self, image: np.ndarray) -> LocalAnswer:
        """The exit's answer for one frame, in the caller's thread: no network."""
        return self._edge.classify(image)

    def submit(self, image: np.ndarray, label: int | None = None,
               source: str = API_SOURCE) -> concurrent.futures.Future[Outcome]:
        """Queue one frame; its future gets the final answer (exit, offload or fallback) by
        its deadline at the latest. Blocks only while the head is behind (a full queue)."""
        frame = self._edge.frame(image, label, source)   # a bad image fails here, in the caller
        answer: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise UserError("this edge is closed: submit before close() or inside `with`")
            self._edge.put_threadsafe(frame, answer)
        return answer

    def close(self) -> Summary:
        """Answer every frame submitted so far, then stop; returns the counts."""
        with self._lock:
            if self._closed:
                return self.summary
            self._closed = True
        try:
            return self._call(self._edge.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> "Edge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
