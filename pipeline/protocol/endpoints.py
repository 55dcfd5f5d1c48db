"""Where the broker listens by default: edges on the frontend, workers on the backend."""

__all__ = ["FRONTEND", "BACKEND"]

FRONTEND = "tcp://127.0.0.1:5555"   # edges connect here
BACKEND = "tcp://127.0.0.1:5556"    # workers connect here
