"""What edge, broker and workers agree on, and only that: the wire (wire.py frames every
message, payload.py a request's features), the protocol's timing, default endpoints and
security. What they share beyond the protocol -- frames, the edge-file format, quantization,
the entropy code -- is the floor's (pipeline/floor), below this package."""
