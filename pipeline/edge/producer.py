"""An edge producer process (`splitexit edge`, `splitexit up`): a source's frames run
through an AsyncEdge (pipeline.edge.async_edge) to the source's end or to SIGTERM / SIGINT;
then the frames taken are answered and the summary logged."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading

from pipeline.edge.async_edge import AsyncEdge
from pipeline.edge.config import EdgeConfig
from pipeline.edge.results import Summary, log_summary

__all__ = ["run_producer"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)   # a producer process stops on these


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
