"""Where the broker listens by default: edges on the frontend, workers on the backend; and
how several brokers are named in one setting (a comma-separated list)."""

__all__ = ["FRONTEND", "BACKEND", "split_endpoints", "shift_port"]

FRONTEND = "tcp://127.0.0.1:5555"   # edges connect here
BACKEND = "tcp://127.0.0.1:5556"    # workers connect here


def split_endpoints(text: str) -> list[str]:
    """`tcp://b0:5555,tcp://b1:5555` -> one endpoint per broker, in the order given; one
    endpoint is a list of one. ValueError for an empty entry or a broker named twice."""
    endpoints = [e.strip() for e in text.split(",")]
    if not all(endpoints):
        raise ValueError(f"{text!r}: an empty broker address in the list")
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"{text!r}: a broker is listed twice")
    return endpoints


def shift_port(endpoint: str, by: int) -> str:
    """`tcp://host:5555` -> `tcp://host:5557` for by=2 (where `up` puts its second broker).
    ValueError for an endpoint without a port number."""
    if by == 0:
        return endpoint
    head, _, port = endpoint.rpartition(":")
    if not head.startswith("tcp://") or not port.isdigit() or int(port) + by > 65535:
        raise ValueError(f"{endpoint}: several brokers need tcp://HOST:PORT addresses "
                         f"with room for {by} more ports")
    return f"{head}:{int(port) + by}"
