"""What an edge records for each frame: one JSON line, its counts, and its exit line."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

from pipeline.edge.shadows import ShadowCounts
from pipeline.errors import ConfigError

__all__ = ["Outcome", "Summary", "Results", "log_summary"]

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """The one final answer for a frame (a JSONL line)."""
    frame: int
    source: str
    path: str                    # exit | offload | fallback
    cls: int
    confidence: float
    label: int | None
    reason: str | None           # why a fallback happened
    capture_ts: float            # wall clock at capture (time.time())
    head_ms: float
    latency_ms: float            # capture -> final answer
    uplink_bytes: int = 0        # bytes this frame's request put on the wire
    worker: str | None = None
    queue_us: int | None = None
    tail_us: int | None = None
    batch: int | None = None


@dataclass
class Summary:
    frames: int = 0
    paths: Counter = field(default_factory=Counter)
    fallback_reasons: Counter = field(default_factory=Counter)
    duplicates: int = 0
    correct: int = 0
    labelled: int = 0
    shadows: ShadowCounts | None = None     # with --shadow: how the exit measured up


class Results:
    """Counts every outcome and appends it to a JSONL file, if one was asked for."""

    def __init__(self, path: str | None):
        self.summary = Summary()
        try:
            self._file: IO[str] | None = open(path, "a") if path else None
        except OSError as e:
            raise ConfigError(f"cannot write results to {path}: {e.strerror}") from None

    def add(self, o: Outcome) -> None:
        s = self.summary
        s.frames += 1
        s.paths[o.path] += 1
        if o.reason:
            s.fallback_reasons[o.reason] += 1
        if o.label is not None:
            s.labelled += 1
            s.correct += int(o.cls == o.label)
        if self._file:
            self._file.write(json.dumps(o.__dict__) + "\n")

    def close(self) -> None:
        if self._file:
            self._file.close()


def log_summary(s: Summary) -> None:
    acc = f", accuracy {100 * s.correct / s.labelled:.2f}%" if s.labelled else ""
    log.info(f"edge: {s.frames} frames: {dict(s.paths)}, fallbacks {dict(s.fallback_reasons)}, "
             f"duplicates {s.duplicates}{acc}")
    sh = s.shadows
    if sh is not None and sh.sent:
        measured = (f": exit-vs-tail agreement {100 * sh.agreement:.2f}%, exit accuracy "
                    f"{100 * sh.exit_accuracy:.2f}% with the tail judging" if sh.answered
                    else "")
        log.info(f"edge: shadows {sh.sent} sent, {sh.answered} answered, {sh.dropped} "
                 f"dropped{measured}")
