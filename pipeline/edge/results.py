"""What an edge records for each frame: one JSON line, its counts, and its exit line."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from pipeline.edge.shadows import ShadowCounts
from pipeline.errors import ConfigError, UserError
from pipeline.floor.unfamiliar import UNKNOWN

__all__ = ["Outcome", "Summary", "Results", "log_summary", "UNKNOWN", "UNKNOWN_NAME"]

log = logging.getLogger(__name__)

# The answer for a frame unlike anything the model was trained on (pipeline.floor.unfamiliar):
# the edge's score flagged it and the server could not answer, or the tail's score flagged it
UNKNOWN_NAME = "unknown"


@dataclass
class Outcome:
    """The one final answer for a frame (a JSONL line)."""
    frame: int
    source: str
    path: str                    # exit | offload | fallback
    cls: int                     # a class index, or UNKNOWN (-1)
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
    class_name: str | None = None  # cls's name in the model's classes, or "unknown"
    unfamiliar: bool = False     # the edge's score flagged the frame: never the exit's answer

    @property
    def unknown(self) -> bool:
        return self.cls == UNKNOWN


@dataclass
class Summary:
    frames: int = 0
    paths: Counter = field(default_factory=Counter)
    fallback_reasons: Counter = field(default_factory=Counter)
    duplicates: int = 0
    unfamiliar: int = 0                     # frames the edge's score flagged
    unknown: int = 0                        # answered `unknown` (wrong where labelled)
    correct: int = 0
    labelled: int = 0
    shadows: ShadowCounts | None = None     # with --shadow: how the exit measured up
    unwritten: int = 0                      # answers the results file lacks (it failed)


class Results:
    """Counts every outcome and appends it to a JSONL file, if one was asked for.

    A batch of answers is one write() of whole lines on an O_APPEND descriptor, no buffer of
    ours in between: once `add` returns its lines are the kernel's, and survive the process
    (kill -9 included), so whatever is counted after `add` is in the file. A write that
    fails (disk full) is cut back to its last whole line, said once, and ends the file: the
    answers go on being counted (and delivered by the caller); `summary.unwritten` says how
    many the file lacks."""

    def __init__(self, path: str | None):
        self.summary = Summary()
        self.path = path
        self.error: str | None = None      # why the file stopped, once it did
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) \
                if path else None
        except OSError as e:
            raise ConfigError(f"cannot write results to {path}: {e.strerror}") from None

    def add(self, outcomes: list[Outcome]) -> None:
        s = self.summary
        for o in outcomes:
            s.frames += 1
            s.paths[o.path] += 1
            if o.reason:
                s.fallback_reasons[o.reason] += 1
            s.unfamiliar += o.unfamiliar
            s.unknown += o.cls == UNKNOWN
            if o.label is not None:
                s.labelled += 1
                s.correct += int(o.cls == o.label)
        if self._fd is None:
            s.unwritten += len(outcomes) if self.error else 0
            return
        data = "".join(json.dumps(o.__dict__) + "\n" for o in outcomes).encode()
        kept, error = _append(self._fd, data)
        if error is not None:
            lost = data.count(b"\n", kept)
            s.unwritten += lost
            self.error = error.strerror or str(error)
            self.close()
            log.warning(f"results: cannot write {self.path}: {self.error}; answers from "
                        f"here on (the first: frame {outcomes[-lost].frame}) are counted and "
                        f"delivered but not written")

    def check(self) -> None:
        """After the run: a file that failed is the user's to fix, in one line."""
        if self.error:
            raise UserError(f"results file {self.path} lacks the last "
                            f"{self.summary.unwritten} of {self.summary.frames} answers: "
                            f"{self.error} (free space, or give --results another folder)")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _append(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Append `data` (whole lines): (bytes appended, None), or where a write fails (the
    disk filled mid-line) the file cut back to its last whole line and (bytes kept, why).
    A short write is retried: the retry says why it fell short."""
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError as e:   # the file ends `done` bytes into this batch: cut back to a line
        kept = data.rfind(b"\n", 0, done) + 1
        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - done + kept)
        return kept, e
    return done, None


def log_summary(s: Summary) -> None:
    acc = f", accuracy {100 * s.correct / s.labelled:.2f}%" if s.labelled else ""
    log.info(f"edge: {s.frames} frames: {dict(s.paths)}, fallbacks {dict(s.fallback_reasons)}, "
             f"duplicates {s.duplicates}, unfamiliar {s.unfamiliar} (answered unknown "
             f"{s.unknown}){acc}"
             + (f"; {s.unwritten} not in the results file" if s.unwritten else ""))
    sh = s.shadows
    if sh is not None and sh.sent:
        measured = (f": exit-vs-tail agreement {100 * sh.agreement:.2f}%, exit accuracy "
                    f"{100 * sh.exit_accuracy:.2f}% with the tail judging" if sh.answered
                    else "")
        log.info(f"edge: shadows {sh.sent} sent, {sh.answered} answered, {sh.dropped} "
                 f"dropped{measured}")
