"""What edge, broker and workers agree on: the wire codec, the protocol's timing, security."""
