"""CurveZMQ on the edge<->broker and worker<->broker links (Ironhouse: allow-lists of
client public keys, one per role), or plaintext -- only when asked for, and only on loopback.

    splitexit keys keys/ --name broker      # keys/broker.key (public), broker.key_secret
    splitexit keys keys/ --name cam1        # one pair per client; cam1.key to edges/,
    splitexit keys keys/ --name worker1     #   worker1.key to workers/
    splitexit broker --broker-secret keys/broker.key_secret \
        --allow-edges edges/ --allow-workers workers/
    splitexit edge --curve-secret keys/cam1.key_secret --curve-server keys/broker.key

A key has one role: the broker's frontend (edges) admits only the keys in the edges folder
and its backend (workers) only those in the workers folder (two ZAP domains), so a camera's
key cannot join as a worker, read other cameras' features and forge their answers. A key
in both folders is refused when the broker starts.

A client whose public key is not in its allow folder gets no service: the handshake fails
and ZeroMQ says nothing to it (libzmq #2227), which is why clients watch their socket's
handshake events (`watch_handshake`) and report a failure in one line.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
import zmq
import zmq.auth

from pipeline.errors import ConfigError

__all__ = ["Security", "create_keys", "is_loopback", "PLAINTEXT_LOOPBACK", "watch_handshake",
           "HANDSHAKE_FAILED", "HANDSHAKE_HINT", "EDGES", "WORKERS"]

log = logging.getLogger(__name__)

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
HANDSHAKE_HINT = ("CURVE handshake with the broker failed: is this key in the broker's "
                  "--allow-edges (edges) or --allow-workers (workers) folder, and "
                  "--curve-server the broker's public key?")
EDGES, WORKERS = "edges", "workers"   # the ZAP domains of the frontend and the backend


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// and inproc:// endpoints, and for a tcp:// endpoint whose every address
    is loopback (127.x, [::1], localhost). libzmq reads tcp://SOURCE;HOST:PORT (a source
    address to connect from) and resolves interface names, so both sides of a ';' count and
    anything that is not a plain address and port (a user@, an interface, a '*') is not
    loopback."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    return scheme == "tcp" and all(_loopback_address(a) for a in rest.split(";"))


def _loopback_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isdigit() or port == "*"):
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PUBLIC = """#   ZeroMQ CURVE Public Certificate (splitexit keys)
#   Give it to the broker's allow folder for this key's role, or to clients as --curve-server.

metadata
curve
    public-key = "{public}"
"""
_SECRET = """#   ZeroMQ CURVE **Secret** Certificate (splitexit keys)
#   Keep it on this host; never share it or loosen its permissions.

metadata
curve
    public-key = "{public}"
    secret-key = "{secret}"
"""


def create_keys(folder: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """A new CURVE key pair: NAME.key (public, share it) and NAME.key_secret (keep it). The
    secret file is created 0600 (never readable by others, not even for a moment) and
    exclusively; an existing pair is replaced only with `force` (the old public key then
    stops working wherever it was allowed)."""
    if not KEY_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (a file "
                          f"name, no folders)")
    folder = Path(folder)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{' and '.join(existing)} already exist: pass --force to replace "
                          f"them (clients and allow folders holding the old key need the "
                          f"new one)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path in existing:
            os.unlink(path)
        public_key, secret_key = (k.decode() for k in zmq.curve_keypair())
        _write_new(secret, _SECRET.format(public=public_key, secret=secret_key), 0o600)
        _write_new(public, _PUBLIC.format(public=public_key), 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write keys into {folder}: {e.strerror}") from None
    return public, secret


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create `path` with `mode` from the start (O_EXCL: never through an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _allowed_keys(folder: str | None, flag: str) -> dict[bytes, str]:
    """The public keys in an allow folder (*.key, as zmq.auth reads them) and their files;
    a missing folder or an unreadable key is one error here, not a silent deny-all later."""
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"{flag} DIR (a folder of public NAME.key files) is needed with "
                          f"--broker-secret" + (f"; {folder} is not a folder" if folder else ""))
    keys = {}
    for path in sorted(Path(folder).glob("*.key")):
        keys[_load(str(path), secret=False)[0]] = str(path)
    return keys


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
    allow_edges: str | None = None     # broker: folder of the edges' public keys (*.key)
    allow_workers: str | None = None   # broker: folder of the workers' public keys (*.key)
    insecure: bool = False         # plaintext; refused unless every address is loopback

    @property
    def curve(self) -> bool:
        return self.secret is not None

    def check(self, addresses: list[str], role: str) -> "Security":
        """Refuse a half-configured or a plaintext-beyond-loopback setup, in one line."""
        if self.curve:
            _load(self.secret, secret=True)
            if role == "broker":
                edges = _allowed_keys(self.allow_edges, "--allow-edges")
                workers = _allowed_keys(self.allow_workers, "--allow-workers")
                both = [(edges[k], workers[k]) for k in edges.keys() & workers.keys()]
                if both:
                    raise ConfigError(f"the same key is allowed as an edge ({both[0][0]}) and "
                                      f"as a worker ({both[0][1]}): a key has one role, give "
                                      f"the other its own pair (splitexit keys)")
            elif not self.server:
                raise ConfigError("--curve-server (the broker's public NAME.key) is needed "
                                  "with --curve-secret")
            else:
                _load(self.server, secret=False)
            return self
        if not self.insecure:
            raise ConfigError(f"the {role} has no CURVE keys: pass its key pair (and "
                              f"--allow-edges / --allow-workers, or --curve-server), or "
                              f"--insecure for plaintext on loopback")
        remote = [a for a in addresses if not is_loopback(a)]
        if remote:
            raise ConfigError(f"plaintext (--insecure) is for loopback only, not {remote[0]}; "
                              f"use CURVE keys (splitexit keys) for other hosts")
        return self

    def server_sockets(self, ctx: zmq.Context, frontend: zmq.Socket, backend: zmq.Socket):
        """Broker side: start the authenticator with one allow-list per ZAP domain, make the
        ROUTERs CURVE servers of the edges' and the workers' domain."""
        if not self.curve:
            return None
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain=EDGES, location=str(self.allow_edges))
        auth.configure_curve(domain=WORKERS, location=str(self.allow_workers))
        public, secret = _load(self.secret, secret=True)
        for sock, domain in ((frontend, EDGES), (backend, WORKERS)):
            sock.zap_domain = domain.encode()
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
