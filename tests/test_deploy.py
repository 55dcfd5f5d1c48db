"""The deployment files agree with each other and with the CLI: every container's command
line parses with splitexit's own parser (in the environment its manifest gives it), ports,
probes, labels, volumes and secret keys line up, and the autoscaler reads a metric that
exists. Nothing here needs a cluster; the manifests are what `kubectl apply` would get."""

from __future__ import annotations

import re

import yaml
from prometheus_client import CollectorRegistry

from monitoring.metrics import BrokerMetrics, EdgeMetrics, ProcessMetrics, WorkerMetrics
from pipeline.cli import build_parser
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
NAME = {"app.kubernetes.io/name": "splitexit"}


def manifests() -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "splitexit.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def secret_files() -> dict[str, set[str]]:
    """Each Secret make-secrets.sh creates, and the file names it holds."""
    script = (DEPLOY / "make-secrets.sh").read_text().replace("\\\n", " ")
    return {m.group(1): set(re.findall(r"--from-file=([^=\s]+)=", m.group(2)))
            for m in re.finditer(r"kubectl create secret generic (\S+)(.*)", script)}


def container(deployment: dict) -> tuple[dict, dict]:
    pod = deployment["spec"]["template"]["spec"]
    [c] = pod["containers"]
    return c, {v["name"]: v for v in pod["volumes"]}


def parse(c: dict, monkeypatch):
    """The container's command line, parsed as `splitexit` would in that container."""
    for var in c.get("env", []):
        monkeypatch.setenv(var["name"], var["value"])
    return build_parser().parse_args(c["args"])


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def mounted_file(c: dict, volumes: dict, path: str, secrets: dict) -> None:
    """`path` is a file of a Secret mounted into the container."""
    for mount in c["volumeMounts"]:
        if path == mount["mountPath"] or path.startswith(mount["mountPath"] + "/"):
            secret = volumes[mount["name"]]["secret"]["secretName"]
            name = path[len(mount["mountPath"]):].strip("/")
            assert not name or name in secrets[secret], (path, secret, secrets[secret])
            return
    raise AssertionError(f"{path} is not in any volume mounted in {c['name']}")


def mounted_secret(c: dict, volumes: dict, folder: str) -> set[str]:
    """The files of the Secret mounted exactly at `folder` (an allow-list folder)."""
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == folder]
    return secret_files()[volumes[mount["name"]]["secret"]["secretName"]]


def ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def test_deployments_select_their_own_pods_and_probe_readiness():
    for (kind, name), d in manifests().items():
        if kind != "Deployment":
            continue
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"] == labels and NAME.items() <= labels.items()
        c, _ = container(d)
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/healthz")):
            assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, (name, probe)


def test_the_broker_binds_what_its_service_and_container_expose(monkeypatch):
    m, secrets = manifests(), secret_files()
    c, volumes = container(m[("Deployment", "splitexit-broker")])
    args = parse(c, monkeypatch)
    assert args.command == "broker"
    assert ports(c) == {"frontend": port_of(args.frontend), "backend": port_of(args.backend),
                        "metrics": args.metrics_port}
    assert args.metrics_addr == "0.0.0.0"        # probes and Prometheus come from outside
    mounted_file(c, volumes, args.broker_secret, secrets)
    # one allow-list per role, each a Secret of public keys of that role only
    assert mounted_secret(c, volumes, args.allow_edges) == {"edge.key"}
    assert mounted_secret(c, volumes, args.allow_workers) == {"worker.key"}
    assert args.allow is None
    service = m[("Service", "splitexit-broker")]
    pod_labels = m[("Deployment", "splitexit-broker")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports(c)


def test_workers_join_the_brokers_backend_with_keys_it_allows(monkeypatch):
    m, secrets = manifests(), secret_files()
    c, volumes = container(m[("Deployment", "splitexit-workers")])
    args = parse(c, monkeypatch)
    assert args.command == "workers" and args.n == 1
    service = m[("Service", "splitexit-broker")]
    backend = {p["name"]: p["port"] for p in service["spec"]["ports"]}["backend"]
    assert args.broker == f"tcp://{service['metadata']['name']}:{backend}"   # joins, no broker
    assert ports(c) == {"metrics": args.metrics_port} and args.metrics_addr == "0.0.0.0"
    mounted_file(c, volumes, args.curve_secret, secrets)
    mounted_file(c, volumes, args.curve_server, secrets)
    claim = volumes["artifacts"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in m
    assert any(v["mountPath"] == args.artifacts for v in c["volumeMounts"])


def test_workers_scale_on_a_metric_the_broker_exports():
    m = manifests()
    scaled = m[("ScaledObject", "splitexit-workers")]
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in m
    registry = CollectorRegistry()
    for cls in (ProcessMetrics, EdgeMetrics, WorkerMetrics, BrokerMetrics):
        cls(registry)
    exported = {s.name for metric in registry.collect() for s in metric.samples}
    [trigger] = scaled["spec"]["triggers"]
    used = set(re.findall(r"splitexit_\w+", trigger["metadata"]["query"]))
    assert used and used <= exported


def test_prometheus_keeps_the_ports_named_metrics_of_splitexit_pods():
    scrape = yaml.safe_load((DEPLOY / "prometheus-scrape.yml").read_text())
    [job] = scrape["scrape_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    assert keep == {"__meta_kubernetes_pod_label_app_kubernetes_io_name": "splitexit",
                    "__meta_kubernetes_pod_container_port_name": "metrics"}


def test_the_edge_image_has_no_torch_and_the_server_image_the_pinned_one():
    stages = re.split(r"^FROM ", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    by_name = {s.split()[2]: s for s in stages[1:]}
    assert "torch" not in by_name["edge"] and "[server]" not in by_name["edge"]
    assert "torch==2.13.0" in by_name["server"] and "[server]" in by_name["server"]
