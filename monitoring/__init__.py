"""Metric definitions, exposition and `splitexit top` (the monitoring issue)."""
