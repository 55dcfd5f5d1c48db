"""Metric definitions (one module, one place), exposition with readiness and metric folders,
`splitexit top` and the Grafana dashboard. Imports nothing of `pipeline`."""
