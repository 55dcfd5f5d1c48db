"""An edge producer's settings, and their defaults: declared here once; the CLI and
`splitexit up` read their defaults from this dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.protocol import wire
from pipeline.protocol.endpoints import FRONTEND
from pipeline.protocol.security import PLAINTEXT_LOOPBACK, Security
from pipeline.protocol.wire import CODEC_NAMES, DTYPE_NAMES

__all__ = ["EdgeConfig"]


@dataclass
class EdgeConfig:
    broker: str = FRONTEND                 # the broker's frontend
    deadline_ms: float = 100.0             # wait this long for the server, then answer locally
    dtype: str = "int8"                    # features on the wire: float32 | float16 | int8
    codec: str = "lz4"                     # lz4 (only when it shrinks) | none
    producer_id: int = 0
    results: str | None = None             # append one JSON line per frame here
    send_queue: int = 1000                 # requests ZeroMQ may hold while the link is down
    max_pack: int = 64                     # frames per request when several are waiting
    security: Security = PLAINTEXT_LOOPBACK

    def validate(self) -> "EdgeConfig":
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
        if self.codec not in CODEC_NAMES:
            raise ConfigError(f"--codec {self.codec!r}: choose one of {', '.join(CODEC_NAMES)}")
        if self.deadline_ms <= 0:
            raise ConfigError(f"--deadline-ms {self.deadline_ms} must be positive")
        self.security.check([self.broker], "edge")
        if not 1 <= self.max_pack <= wire.MAX_FRAMES_PER_REQUEST:
            raise ConfigError(f"--max-pack {self.max_pack} must be in "
                              f"1..{wire.MAX_FRAMES_PER_REQUEST}")
        return self
