"""An edge's connection to one broker: a DEALER socket (CURVE or plain), its handshake
events, and the answers read off it. Sends never block: a full send queue means the broker
has been unreachable a while, and the caller falls back at once."""

from __future__ import annotations

import logging
import os
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from pipeline.edge.telemetry import EdgeTelemetry
from pipeline.protocol import wire
from pipeline.protocol.security import HANDSHAKE_FAILED, HANDSHAKE_HINT, Security
from pipeline.protocol.wire import WireError

__all__ = ["BrokerLink", "RECEIVE_BURST"]

log = logging.getLogger(__name__)

RECEIVE_BURST = 1000   # answers read per wake-up before yielding to the other tasks
LINK_EVENTS = HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class BrokerLink:
    def __init__(self, ctx: zmq.asyncio.Context, broker: str, security: Security,
                 send_queue: int, producer_id: int, telemetry: EdgeTelemetry):
        self.broker, self.name, self.telemetry = broker, f"edge {producer_id}", telemetry
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = send_queue
        self.sock.identity = f"edge-{producer_id}-{os.getpid()}-{id(self):x}".encode()
        security.client_socket(self.sock)
        self.monitor = self.sock.get_monitor_socket(LINK_EVENTS)
        self.linked = False        # a broker ever completed the handshake
        self.up = False            # ... and the connection stands now
        self.key_rejected = False  # ... or refused ours (said once, in the log)
        self.sock.connect(broker)

    async def send(self, request: list) -> bool:
        """False when the send queue is full."""
        try:
            await self.sock.send_multipart(request, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    async def receive(self) -> list[wire.Reply | wire.Error]:
        """The answers waiting (at least one; poll, then read: never wait_for(recv), pyzmq
        #1925 loses the message). A message that does not decode is counted and dropped."""
        await self.sock.poll(None, zmq.POLLIN)
        answers = []
        for _ in range(RECEIVE_BURST):
            try:
                parts = await self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                answers.append(wire.decode_answer(parts))
            except WireError as e:
                self.telemetry.bad_messages.labels("edge", e.reason).inc()
        return answers

    async def watch(self, changed: Callable[[bool], None]) -> None:
        """`changed(up)` when the link comes up (the handshake succeeded) or goes down; a
        rejected key looks like a silent broker (libzmq #2227), so say it once."""
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.linked = self.up = True
                changed(True)
            elif event == zmq.EVENT_DISCONNECTED:
                self.up = False
                changed(False)
            elif event & HANDSHAKE_FAILED and not self.key_rejected:
                self.key_rejected = True
                self.telemetry.handshake_failures.inc()
                log.error(f"{self.name}: {HANDSHAKE_HINT}")

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()
