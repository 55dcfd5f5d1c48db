"""An edge producer's settings, and their defaults: declared here once; the CLI and
`splitexit up` read their defaults from this dataclass."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from pipeline.edge.controller import ControllerConfig
from pipeline.errors import ConfigError
from pipeline.protocol import wire
from pipeline.protocol.endpoints import FRONTEND, split_endpoints
from pipeline.protocol.security import PLAINTEXT_LOOPBACK, Security
from pipeline.floor.static_code import StaticCode
from pipeline.protocol.wire import CODEC_NAMES, DTYPE_NAMES

__all__ = ["EdgeConfig", "AUTO", "wire_dtype", "wire_codec"]

AUTO = "auto"  # --dtype and --codec: follow what the model was trained for
HOLD_MIN_S = 0.25   # the controller's shortest hold after a cut


def wire_codec(name: str, dtype: wire.DType, code: StaticCode | None) -> wire.Codec:
    """The codec an edge asks for: `name`, or for auto the model's static code where it has
    one for this dtype, else lz4. Static without a code for the dtype is an error."""
    usable = (code is not None and dtype in wire.UNSIGNED_BITS
              and code.symbols == 1 << wire.UNSIGNED_BITS[dtype])
    if name == AUTO:
        return wire.Codec.STATIC if usable else wire.Codec.LZ4
    codec = CODEC_NAMES[name]
    if codec == wire.Codec.STATIC and not usable:
        raise ConfigError("--codec static needs a model trained for its uplink "
                          "(model.uplink_bits) and its --dtype; use auto, lz4 or none")
    return codec


def wire_dtype(name: str, uplink_bits: int) -> wire.DType:
    """The dtype an edge sends: `name`, or for auto the unsigned dtype the model's uplink was
    trained for (what is trained is what is sent), else int8."""
    if name != AUTO:
        return DTYPE_NAMES[name]
    return wire.DTYPE_FOR_BITS[uplink_bits] if uplink_bits else wire.DType.INT8


@dataclass
class EdgeConfig:
    broker: str = FRONTEND                 # the brokers' frontends, comma-separated
    deadline_ms: float = 100.0             # wait this long for the server, then answer locally
    # Features on the wire: auto (what the model's uplink was trained for, else int8) |
    # float32 | float16 | int8 | uint8 | uint4 | uint2
    dtype: str = AUTO
    # auto (the model's static code if it has one, else lz4) | static | lz4 | none; every
    # codec is used only when it shrinks the payload
    codec: str = AUTO
    producer_id: int = 0
    results: str | None = None             # append one JSON line per frame here
    send_queue: int = 1000                 # requests ZeroMQ may hold while the link is down
    max_pack: int = 64                     # frames per request when several are waiting
    security: Security = PLAINTEXT_LOOPBACK
    # The budget controller (pipeline.edge.controller) holds one of these by moving the
    # threshold; neither: the trained threshold stands.
    target_offload: float | None = None    # fraction of frames sent to the server
    uplink_budget: float | None = None     # bytes per second on the uplink
    shadow: float = 0.0                    # fraction of exited frames also sent, to measure
                                           # the exit (pipeline.edge.shadows)

    def controller(self) -> ControllerConfig | None:
        """The controller's settings, or None for a fixed threshold. A cut holds for two
        deadlines: every request sent before it has been answered or expired by then."""
        if self.target_offload is None and self.uplink_budget is None:
            return None
        return ControllerConfig(target_offload=self.target_offload,
                                uplink_budget=self.uplink_budget,
                                hold_s=max(HOLD_MIN_S, 2 * self.deadline_ms / 1000),
                                deadline_s=self.deadline_ms / 1000).check()

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any) -> "EdgeConfig":
        """The settings pipeline.options.add_edge_options parsed, and `given` for those a
        command decides itself (broker, producer_id, results, security); validated."""
        return cls(deadline_ms=args.deadline_ms, dtype=args.dtype, codec=args.codec,
                   max_pack=args.max_pack, target_offload=args.target_offload,
                   uplink_budget=args.uplink_budget, shadow=args.shadow, **given).validate()

    def validate(self) -> "EdgeConfig":
        """The one check of an edge's settings: a one-line ConfigError naming the flag."""
        if self.dtype != AUTO and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose {AUTO} or one of "
                              f"{', '.join(DTYPE_NAMES)}")
        if self.codec != AUTO and self.codec not in CODEC_NAMES:
            raise ConfigError(f"--codec {self.codec!r}: choose {AUTO} or one of "
                              f"{', '.join(CODEC_NAMES)}")
        if not self.deadline_ms > 0:
            raise ConfigError(f"--deadline-ms {self.deadline_ms} must be positive")
        try:
            brokers = split_endpoints(self.broker)
        except ValueError as e:
            raise ConfigError(f"--broker {e}") from None
        self.security.check(brokers, "edge")
        if not 0 <= self.shadow <= 1:
            raise ConfigError(f"--shadow {self.shadow}: a fraction of exited frames in [0, 1]")
        # The controller's targets, checked here under their flags' names (the pure
        # ControllerConfig names its own parameters); neither: the trained threshold stands.
        if self.target_offload is not None and self.uplink_budget is not None:
            raise ConfigError("--target-offload and --uplink-budget: give one target, not both")
        if self.target_offload is not None and not 0 < self.target_offload <= 1:
            raise ConfigError(f"--target-offload {self.target_offload}: a fraction of frames "
                              f"in (0, 1]")
        if self.uplink_budget is not None and not 0 < self.uplink_budget < math.inf:
            raise ConfigError(f"--uplink-budget {self.uplink_budget}: bytes per second, > 0")
        if not 1 <= self.max_pack <= wire.MAX_FRAMES_PER_REQUEST:
            raise ConfigError(f"--max-pack {self.max_pack} must be in "
                              f"1..{wire.MAX_FRAMES_PER_REQUEST}")
        return self
