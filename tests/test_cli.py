"""The console script end to end, as a user runs it (a real subprocess)."""

import json
import re
import subprocess
import sys

import torch

from tests.conftest import ROOT


def splitexit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300)


def test_train_then_recalibrate_a_tiny_config(tiny_config_path, tmp_path):
    out = tmp_path / "run"
    r = splitexit("train", str(tiny_config_path), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "split+exit" in r.stdout and "MACs/frame" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["structure"]["edge_macs"] == 1600 + 400  # 800->40 fan-out 2, exit 40->10
    model_id = metrics["model_id"]

    r = splitexit("calibrate", str(out), "--target-offload", "0.5")
    assert r.returncode == 0, r.stderr
    recal = json.loads((out / "metrics.json").read_text())["calibration"]
    assert abs(recal["validation"]["offload_ratio"] - 0.5) <= 0.01
    edge = torch.load(out / "edge.pt", weights_only=True)
    assert edge["threshold"] == recal["threshold"] and edge["model_id"] == model_id


def one_line_failure(r):
    """Exit 2 and one error line, last on stderr (info lines, or argparse's usage, may
    precede it), no traceback."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    error = re.compile(r"splitexit( \w+)?: error: ")
    assert error.match(lines[-1]), r.stderr
    assert sum(bool(error.match(line)) for line in lines) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_user_errors_are_one_line(tmp_path, tiny_config_path):
    one_line_failure(splitexit("train", "no-such-config"))
    one_line_failure(splitexit("train", str(tiny_config_path), "--set", "train.epoch=2"))
    one_line_failure(splitexit("train", str(tiny_config_path), "--data", str(tmp_path)))
    one_line_failure(splitexit("train", "paper-sparse", "--set", "model.widths=[800, 30, 40, 10]"))
    (tmp_path / "edge.pt").write_bytes(b"\x00" * 10)
    one_line_failure(splitexit("calibrate", str(tmp_path)))


def test_runtime_commands_reject_bad_input_in_one_line(tmp_path, tiny_config_path):
    out = tmp_path / "run"
    assert splitexit("train", str(tiny_config_path), "--out", str(out), "--quiet").returncode == 0
    one_line_failure(splitexit("workers", "--artifacts", str(tmp_path / "nowhere")))
    one_line_failure(splitexit("edge", "--artifacts", str(out), "--dtype", "int4"))
    one_line_failure(splitexit("edge", "--artifacts", str(out), "--source", str(tmp_path /
                               "missing.avi"), "--broker", "tcp://127.0.0.1:9", "--insecure"))
    one_line_failure(splitexit("edge", "--artifacts", str(out)))  # no keys, no --insecure
    one_line_failure(splitexit("broker", "--insecure", "--frontend", "tcp://0.0.0.0:5555"))
    one_line_failure(splitexit("broker", "--curve-secret", str(tmp_path / "none.key_secret"),
                               "--allow-edges", str(tmp_path), "--allow-workers", str(tmp_path)))
    one_line_failure(splitexit("up", "--artifacts", str(out), "--workers", "0"))
    one_line_failure(splitexit("edge", "--artifacts", str(out), "--insecure",
                               "--target-offload", "1.5"))
    one_line_failure(splitexit("up", "--artifacts", str(out), "--uplink-budget", "0"))


def test_up_runs_the_whole_system_and_reports(tmp_path, tiny_config_path, idx_dir):
    from tests.conftest import free_port

    art = tmp_path / "art"
    assert splitexit("train", str(tiny_config_path), "--out", str(art), "--quiet").returncode == 0
    r = splitexit("up", "--artifacts", str(art), "--data", str(idx_dir), "--limit", "200",
                  "--fps", "0", "--run-dir", str(tmp_path / "up"), "--deadline-ms", "2000",
                  "--metrics-port", str(free_port()),
                  "--frontend", f"tcp://127.0.0.1:{free_port()}",
                  "--backend", f"tcp://127.0.0.1:{free_port()}")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "up" / "report.json").read_text())
    assert report["frames"] == report["unique_frames"] == 200
    assert report["paths"].get("fallback", 0) == 0 and report["paths"]["offload"] > 0
    assert "p99 ms" in r.stdout and "uplink per offloaded frame" in r.stdout
    # the report's rate is the log's last line's: the same frames over the same replay
    [reported] = re.findall(r"(\d+) frames/s", r.stdout)
    logged = re.findall(r"200 frames \((\d+)/s\)", r.stderr)
    assert logged and logged[-1] == reported


def test_endpoints_and_keys_come_from_the_environment_and_flags_mean_one_thing(monkeypatch):
    from pipeline.cli import build_parser

    monkeypatch.setenv("SPLITEXIT_FRONTEND", "tcp://broker.example:5555")
    monkeypatch.setenv("SPLITEXIT_CURVE_SECRET", "keys/cam7.key_secret")
    monkeypatch.setenv("SPLITEXIT_BROKER_SECRET", "keys/broker.key_secret")
    edge = build_parser().parse_args(["edge"])
    assert (edge.broker, edge.curve_secret) == ("tcp://broker.example:5555",
                                                "keys/cam7.key_secret")
    assert build_parser().parse_args(["edge", "--broker", "tcp://b:1"]).broker == "tcp://b:1"
    # --broker is the broker a client connects to, for workers too (--join: the old name)
    assert build_parser().parse_args(["workers", "--join", "tcp://b:2"]).broker == "tcp://b:2"
    assert build_parser().parse_args(["workers"]).broker is None      # starts its own broker
    monkeypatch.setenv("SPLITEXIT_BACKEND", "tcp://broker.example:5556")
    assert build_parser().parse_args(["workers"]).broker == "tcp://broker.example:5556"
    assert build_parser().parse_args(["broker"]).backend == "tcp://broker.example:5556"
    # --broker-secret is the broker's pair everywhere (`broker` still reads --curve-secret)
    assert build_parser().parse_args(["broker"]).broker_secret == "keys/broker.key_secret"
    assert build_parser().parse_args(
        ["broker", "--curve-secret", "b.key_secret"]).broker_secret == "b.key_secret"
    assert build_parser().parse_args(["workers"]).broker_secret == "keys/broker.key_secret"


def test_allow_lists_come_from_the_environment_one_folder_per_role(monkeypatch):
    from pipeline.cli import build_parser

    monkeypatch.setenv("SPLITEXIT_ALLOW_EDGES", "/allow/edges")
    monkeypatch.setenv("SPLITEXIT_ALLOW_WORKERS", "/allow/workers")
    for command in ("broker", "workers"):
        args = build_parser().parse_args([command])
        assert (args.allow_edges, args.allow_workers) == ("/allow/edges", "/allow/workers")


def test_the_brokers_byte_budget_must_be_positive():
    one_line_failure(splitexit("broker", "--insecure", "--max-held-mb", "0"))


def test_every_flag_and_argument_says_what_it_is_for():
    """`splitexit COMMAND --help` explains each option: a help that is missing or only states
    the default fails here, for any command added later too."""
    import argparse

    from pipeline.cli import build_parser

    def actions(parser, command="splitexit"):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from actions(sub, name)
            elif action.help != argparse.SUPPRESS:
                yield command, action

    seen = list(actions(build_parser()))
    assert {command for command, _ in seen} >= {"train", "calibrate", "export", "top", "up"}
    bare = [f"{command} {'/'.join(a.option_strings) or a.dest}" for command, a in seen
            if not re.sub(r"\(default: [^)]*\)", "", a.help or "").strip(" ;.")]
    assert not bare, f"options without help: {bare}"
    r = splitexit("export", "--help")   # the choices are in the usage and the help
    assert "--target {c,onnx}" in r.stdout and "--variant {float32,int8}" in r.stdout


def test_export_refuses_a_target_or_variant_it_does_not_have(tmp_path):
    one_line_failure(splitexit("export", str(tmp_path), "--variant", "int4"))
    r = splitexit("export", str(tmp_path), "--target", "onnx", "--variant", "int8")
    one_line_failure(r)
    assert "the ONNX export is float32" in r.stderr


def test_an_unknown_log_level_is_an_error_not_info(monkeypatch):
    one_line_failure(splitexit("--log-level", "verbose", "keys", "--help"))
    monkeypatch.setenv("SPLITEXIT_LOG_LEVEL", "verbose")   # children read it: same rule
    r = splitexit("top", "--count", "1")
    one_line_failure(r)
    assert "SPLITEXIT_LOG_LEVEL 'verbose': choose one of debug, info, warning, error" in r.stderr
    monkeypatch.setenv("SPLITEXIT_LOG_LEVEL", "WARNING")   # any case: taken, so top runs
    r = splitexit("top", "127.0.0.1:9", "--count", "1", "--interval", "0.01")
    assert "no endpoint answered" in r.stderr and "LOG_LEVEL" not in r.stderr


def test_a_training_logged_to_a_file_has_no_progress_bar_unless_asked(tiny_config_path,
                                                                      tmp_path):
    """tqdm rewrites its line ~10 times a second: on a terminal a bar, in a log file (stderr
    not a terminal, as here) dozens of updates. --progress asks for them anyway."""
    quiet = splitexit("train", str(tiny_config_path), "--out", str(tmp_path / "a"))
    assert quiet.returncode == 0, quiet.stderr
    assert "train tiny" not in quiet.stderr and "step/s" not in quiet.stderr
    assert "wrote" in quiet.stderr                          # the log lines still come
    shown = splitexit("train", str(tiny_config_path), "--out", str(tmp_path / "b"),
                      "--progress")
    assert shown.returncode == 0, shown.stderr
    assert "train tiny" in shown.stderr
    one_line_failure(splitexit("train", "--quiet", "--progress"))
