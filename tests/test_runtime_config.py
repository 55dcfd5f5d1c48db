"""Each runtime config checks itself, once (`validate()`), with a one-line ConfigError that
names the setting; the CLI and `up` build the configs and call it, and check nothing of their
own."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.edge.config import EdgeConfig
from pipeline.edge.controller import ControllerConfig
from pipeline.edge.inflight import InFlight
from pipeline.edge.shadows import Shadows
from pipeline.errors import ConfigError
from pipeline.up import UpConfig
from workers.batching import Batcher
from workers.config import BrokerConfig, WorkerConfig
from workers.scheduler import Scheduler


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
    (UpConfig(brokers=0), "--brokers"),
    (UpConfig(brokers=2, broker=BrokerConfig(frontend="ipc:///tmp/x")), "--brokers 2"),
    (UpConfig(worker=WorkerConfig(max_batch=0)), "--max-batch 0"),   # its processes' too
    (UpConfig(broker=BrokerConfig(max_queue=0)), "--max-queue 0"),
    (UpConfig(edge=replace(EdgeConfig(), deadline_ms=0)), "--deadline-ms 0"),
    (UpConfig(fps=-1.0), "--fps -1.0"),
    (BrokerConfig(frontend="tcp://0.0.0.0:5555"), "--insecure) is for loopback only"),
    (WorkerConfig(broker="tcp://10.1.2.3:5556"), "--insecure) is for loopback only"),
    (EdgeConfig(deadline_ms=math.nan), "--deadline-ms nan"),
    (EdgeConfig(dtype="int4"), "--dtype 'int4'"),
    (EdgeConfig(codec="zip"), "--codec 'zip'"),
    (EdgeConfig(max_pack=0), "--max-pack 0"),
    (EdgeConfig(shadow=1.5), "--shadow 1.5"),
    (EdgeConfig(broker="tcp://10.1.2.3:5555"), "--insecure) is for loopback only"),
    # the controller's targets, under their flags' names (the pure core names parameters)
    (EdgeConfig(target_offload=0.0), "--target-offload 0.0"),
    (EdgeConfig(target_offload=1.5), "--target-offload 1.5"),
    (EdgeConfig(target_offload=math.nan), "--target-offload nan"),
    (EdgeConfig(uplink_budget=0.0), "--uplink-budget 0.0"),
    (EdgeConfig(uplink_budget=math.inf), "--uplink-budget inf"),
    (EdgeConfig(target_offload=0.3, uplink_budget=1e4), "--target-offload and --uplink-budget"),
])
def test_a_bad_setting_is_one_line_naming_it(cfg, says):
    with pytest.raises(ConfigError, match=r"^[^\n]+$") as e:
        cfg.validate()
    assert says in str(e.value)


def parsed(*argv: str):
    from pipeline.cli import build_parser

    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, says", [
    (["up", "--target-offload", "1.5"], "--target-offload 1.5"),
    (["up", "--uplink-budget", "0"], "--uplink-budget 0.0"),
    (["up", "--shadow", "-0.1"], "--shadow -0.1"),
    (["up", "--deadline-ms", "0"], "--deadline-ms 0.0"),
    (["up", "--max-pack", "0"], "--max-pack 0"),
    (["up", "--max-batch", "0"], "--max-batch 0"),
    (["up", "--max-wait-ms", "-1"], "--max-wait-ms -1"),
    (["up", "--threads", "0"], "--threads 0"),
    (["up", "--max-queue", "0"], "--max-queue 0"),
    (["up", "--max-held-mb", "0"], "--max-held-mb 0"),
    (["up", "--queue-timeout-ms", "0"], "--queue-timeout-ms 0"),
    (["up", "--workers", "0"], "--workers"),
    (["up", "--producers", "0"], "--producers"),
    (["up", "--limit", "0"], "--limit"),
    (["up", "--fps", "-5"], "--fps -5.0"),
    (["up", "--frontend", "tcp://0.0.0.0:5555"], "loopback only, not tcp://0.0.0.0:5555"),
])
def test_each_bad_flag_is_one_line_from_its_config(argv, says):
    """The command line reaches the configs through their from_args(), and each bad value
    comes back from the owning validate() as one line naming the flag."""
    with pytest.raises(ConfigError, match=r"^[^\n]+$") as e:
        UpConfig.from_args(parsed(*argv))
    assert says in str(e.value)


@pytest.mark.parametrize("argv, says", [
    (["edge", "-n", "0"], "argument -n: 0 must be at least 1"),
    (["workers", "-n", "x"], "argument -n: 'x' is not a whole number"),
    (["top", "--interval", "0"], "argument --interval: 0 must be positive"),
    (["top", "--interval", "nan"], "argument --interval: nan must be positive"),
    (["top", "--count", "0"], "argument --count: 0 must be at least 1"),
])
def test_a_value_no_config_holds_is_refused_by_its_argparse_type(argv, says, capsys):
    """A launcher's -n and `top`'s --interval and --count belong to no config: argparse's
    type refuses them, with argparse's usage line and one error line, exit 2."""
    with pytest.raises(SystemExit) as e:
        parsed(*argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(says)


def test_from_args_carries_every_flag_into_its_config():
    args = parsed("up", "--workers", "3", "--producers", "4", "--fps", "0", "--limit", "7",
                  "--data", "d", "--run-dir", "r", "--hold", "2", "--metrics-port", "0",
                  "--max-queue", "9", "--max-held-mb", "2", "--max-batch", "5",
                  "--max-wait-ms", "3", "--threads", "2", "--deadline-ms", "250",
                  "--dtype", "uint4", "--codec", "lz4", "--max-pack", "6",
                  "--uplink-budget", "1000", "--shadow", "0.25")
    cfg = UpConfig.from_args(args)
    assert (cfg.workers, cfg.producers, cfg.fps, cfg.limit, cfg.data_dir, cfg.run_dir,
            cfg.hold_s, cfg.metrics_port) == (3, 4, 0.0, 7, "d", "r", 2.0, 0)
    # `up`'s broker drops a request once the edges' deadline has passed, unless told
    assert cfg.broker == BrokerConfig(max_queue=9, max_held_bytes=2 << 20,
                                      queue_timeout_s=0.25)
    assert cfg.worker == WorkerConfig(max_batch=5, max_wait_ms=3.0, threads=2)
    assert cfg.edge == EdgeConfig(deadline_ms=250.0, dtype="uint4", codec="lz4", max_pack=6,
                                  uplink_budget=1000.0, shadow=0.25)
    assert UpConfig.from_args(parsed("up", "--queue-timeout-ms", "900")
                              ).broker.queue_timeout_s == 0.9
    # the defaults the parser shows are the dataclasses' own
    assert UpConfig.from_args(parsed("up")) == replace(
        UpConfig(), broker=BrokerConfig(queue_timeout_s=EdgeConfig.deadline_ms / 1000))
    edge = EdgeConfig.from_args(parsed("edge", "--broker", "tcp://127.0.0.1:7000"),
                                broker="tcp://127.0.0.1:7000", producer_id=3)
    assert edge == EdgeConfig(broker="tcp://127.0.0.1:7000", producer_id=3)
    assert BrokerConfig.from_args(parsed("broker")) == BrokerConfig()


@pytest.mark.parametrize("build, says", [
    (lambda: ControllerConfig(target_offload=1.5).check(), "target_offload 1.5"),
    (lambda: ControllerConfig(uplink_budget=0.0).check(), "uplink_budget 0.0"),
    (lambda: ControllerConfig().check(), "target_offload or uplink_budget"),
    (lambda: Shadows(1.5), "fraction 1.5"),
    (lambda: InFlight(0.0), "deadline_s"),
    (lambda: Batcher(0, 0.0), "max_batch"),
    (lambda: Scheduler(0, 1.0, 1.0), "max_queue 0"),
    (lambda: Scheduler(8, 0.0, 1.0), "queue_timeout_s 0"),
])
def test_pure_cores_name_their_own_parameters_not_flags(build, says):
    """A pure core is a library object: a plain ValueError naming its parameter; the flags'
    names belong to the configs that the command line fills."""
    with pytest.raises(ValueError) as e:
        build()
    assert not isinstance(e.value, ConfigError)
    assert says in str(e.value) and "--" not in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_checks_nothing_of_its_own():
    """Every range check lives in a config's validate(): the CLI modules raise no
    ConfigError and compare no option against a bound (argparse types and choices aside)."""
    root = Path(__file__).resolve().parent.parent / "pipeline"
    for name in ("cli.py", "build_commands.py", "options.py"):
        text = (root / name).read_text()
        assert "raise ConfigError" not in text and "parser.error" not in text, name
        assert not re.search(r"args\.\w+ *(<|<=|>|>=) *\d", text), name
