"""Each runtime config checks itself, once (`validate()`), with a one-line ConfigError that
names the setting; the CLI and `up` build the configs and call it, and check nothing of their
own."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.edge.config import EdgeConfig
from pipeline.errors import ConfigError
from pipeline.up import UpConfig
from workers.config import BrokerConfig, WorkerConfig


def test_the_defaults_are_valid():
    for cfg in (BrokerConfig(), WorkerConfig(), EdgeConfig(), UpConfig()):
        assert cfg.validate() is cfg


@pytest.mark.parametrize("cfg, says", [
    (BrokerConfig(max_queue=0), "--max-queue 0"),
    (BrokerConfig(queue_timeout_s=0), "--queue-timeout-ms 0"),
    (BrokerConfig(max_held_bytes=0), "--max-held-mb 0"),
    (BrokerConfig(heartbeat_liveness=0), "liveness at least 1"),
    (WorkerConfig(max_batch=0), "--max-batch 0"),
    (WorkerConfig(max_wait_ms=-1), "--max-wait-ms -1"),
    (WorkerConfig(threads=0), "--threads 0"),
    (WorkerConfig(heartbeat_interval_s=0), "interval must be positive"),
    (UpConfig(workers=0), "--workers"),
    (UpConfig(limit=0), "--limit"),
    (UpConfig(worker=WorkerConfig(max_batch=0)), "--max-batch 0"),   # its processes' too
    (UpConfig(broker=BrokerConfig(max_queue=0)), "--max-queue 0"),
    (UpConfig(edge=replace(EdgeConfig(), deadline_ms=0)), "--deadline-ms 0"),
])
def test_a_bad_setting_is_one_line_naming_it(cfg, says):
    with pytest.raises(ConfigError, match=r"^[^\n]+$") as e:
        cfg.validate()
    assert says in str(e.value)
