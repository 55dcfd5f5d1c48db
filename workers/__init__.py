"""Server side: tail workers with dynamic batching and the pool launcher (the offload
runtime issue builds them on pipeline.model.artifacts.load_server)."""
