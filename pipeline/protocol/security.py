"""CurveZMQ on the edge<->broker and worker<->broker links (Ironhouse: an allow-list of
client public keys), or plaintext -- only when asked for, and only on loopback.

    splitexit keys keys/ --name broker      # keys/broker.key (public), broker.key_secret
    splitexit keys keys/ --name edge1       # one pair per client; copy edge1.key to allow/
    splitexit broker --broker-secret keys/broker.key_secret --allow allow/
    splitexit edge --curve-secret keys/edge1.key_secret --curve-server keys/broker.key

A client whose public key is not in the allow folder gets no service: the handshake fails
and ZeroMQ says nothing to it (libzmq #2227), which is why clients watch their socket's
handshake events (`watch_handshake`) and report a failure in one line.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth

from pipeline.errors import ConfigError

__all__ = ["Security", "create_keys", "is_loopback", "PLAINTEXT_LOOPBACK", "watch_handshake",
           "HANDSHAKE_FAILED", "HANDSHAKE_HINT"]

log = logging.getLogger(__name__)

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
HANDSHAKE_HINT = ("CURVE handshake with the broker failed: is this key in the broker's --allow "
                  "folder, and --curve-server the broker's public key?")


def is_loopback(address: str) -> bool:
    """True for tcp://127.x / [::1] / localhost and for ipc:// and inproc:// endpoints."""
    parts = urlsplit(address)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A new CURVE key pair: NAME.key (public, share it) and NAME.key_secret (keep it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def _load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE key {path}: {e}; make one with "
                          f"`splitexit keys DIR --name NAME`") from None
    if secret and secret_key is None:
        raise ConfigError(f"{path} holds no secret key: pass the NAME.key_secret file")
    return public, secret_key


@dataclass(frozen=True)
class Security:
    secret: str | None = None      # this process's key pair (NAME.key_secret)
    server: str | None = None      # clients: the broker's public key (NAME.key)
    allow: str | None = None       # broker: folder of allowed client public keys (*.key)
    insecure: bool = False         # plaintext; refused unless every address is loopback

    @property
    def curve(self) -> bool:
        return self.secret is not None

    def check(self, addresses: list[str], role: str) -> "Security":
        """Refuse a half-configured or a plaintext-beyond-loopback setup, in one line."""
        if self.curve:
            _load(self.secret, secret=True)
            if role == "broker":
                if not self.allow or not Path(self.allow).is_dir():
                    raise ConfigError("--allow DIR (a folder of client public keys) is needed "
                                      "with --curve-secret")
            elif not self.server:
                raise ConfigError("--curve-server (the broker's public NAME.key) is needed "
                                  "with --curve-secret")
            else:
                _load(self.server, secret=False)
            return self
        if not self.insecure:
            raise ConfigError(f"the {role} has no CURVE keys: pass --curve-secret (and "
                              f"--allow / --curve-server), or --insecure for plaintext on "
                              f"loopback")
        remote = [a for a in addresses if not is_loopback(a)]
        if remote:
            raise ConfigError(f"plaintext (--insecure) is for loopback only, not {remote[0]}; "
                              f"use CURVE keys (splitexit keys) for other hosts")
        return self

    def server_sockets(self, ctx: zmq.Context, sockets: list[zmq.Socket]):
        """Broker side: start the authenticator, make the ROUTERs CURVE servers."""
        if not self.curve:
            return None
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.allow))
        public, secret = _load(self.secret, secret=True)
        for sock in sockets:
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
        return auth

    def client_socket(self, sock: zmq.Socket) -> None:
        """Edge or worker side: be a CURVE client of the broker's key."""
        if not self.curve:
            return
        public, secret = _load(self.secret, secret=True)
        server_public, _ = _load(self.server, secret=False)
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_serverkey = server_public


PLAINTEXT_LOOPBACK = Security(insecure=True)


def watch_handshake(sock: zmq.Socket, who: str, on_failure=lambda: None) -> threading.Thread:
    """Report a failed CURVE handshake once (a wrong or unlisted key otherwise looks like a
    silent broker), and call `on_failure` (a metric). Runs in a daemon thread on the socket's
    monitor."""
    from zmq.utils.monitor import recv_monitor_message

    monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)

    def run():
        try:
            recv_monitor_message(monitor)
        except zmq.ZMQError:
            return  # the socket closed first
        on_failure()
        log.error(f"{who}: {HANDSHAKE_HINT}")

    thread = threading.Thread(target=run, daemon=True, name="handshake-monitor")
    thread.start()
    return thread
