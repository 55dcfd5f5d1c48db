"""The server side: the broker and its pure scheduler, tail workers and their pure batching,
their settings, and the process groups that launch them."""
