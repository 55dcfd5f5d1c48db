"""The deployment files agree with each other, with the CLI and with the schemas a cluster
applies: every manifest passes `kubernetes-validate --strict` for the oldest and the newest
Kubernetes version we state, the ScaledObject passes KEDA's own CRD schema (vendored in
tests/schemas), every container's command line parses with splitexit's own parser (in the
environment its manifest gives it), ports, probes, labels, volumes and secret keys line up,
every container is sized and locked down, the autoscaler reads a metric that exists, and
the image builds its wheel from what .dockerignore lets into the context. Nothing here needs
a cluster or a Docker daemon; the manifests are what `kubectl apply` would get."""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitoring.metrics import BrokerMetrics, EdgeMetrics, ProcessMetrics, WorkerMetrics
from pipeline.cli import build_parser
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
NAME = {"app.kubernetes.io/name": "splitexit"}
# The oldest Kubernetes still served by the major clouds when this was written, and the
# newest kubernetes-validate knows: the manifests use nothing outside both.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
KEDA_SCHEMA = ROOT / "tests" / "schemas" / "keda-scaledobject-v1alpha1.yaml"
WORKLOADS = ("StatefulSet", "Deployment")
# Peak memory measured with real processes and traffic (docs/deployment.md, "Sizes"):
# `splitexit broker` 46 MiB RSS; a worker pod's processes (launcher, tail worker, resource
# tracker) 529 MiB RSS summed, 392 MiB PSS.
MEASURED_MIB = {"broker": {"rss": 46, "pss": 29}, "worker": {"rss": 529, "pss": 392}}


def manifests() -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "splitexit.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def workloads() -> dict[str, dict]:
    """Each StatefulSet and Deployment, by its component label."""
    return {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d
            for (kind, _), d in manifests().items() if kind in WORKLOADS}


def secret_files() -> dict[str, set[str]]:
    """Each Secret make-secrets.sh creates, and the file names it holds."""
    script = (DEPLOY / "make-secrets.sh").read_text().replace("\\\n", " ")
    return {m.group(1): set(re.findall(r"--from-file=([^=\s]+)=", m.group(2)))
            for m in re.finditer(r"kubectl create secret generic (\S+)(.*)", script)}


def container(workload: dict) -> tuple[dict, dict]:
    pod = workload["spec"]["template"]["spec"]
    [c] = pod["containers"]
    return c, {v["name"]: v for v in pod["volumes"]}


def parse(c: dict, monkeypatch):
    """The container's command line, parsed as `splitexit` would in that container."""
    for var in c.get("env", []):
        monkeypatch.setenv(var["name"], var["value"])
    return build_parser().parse_args(c["args"])


def addresses(value: str | list[str]) -> list[str]:
    """A list of brokers as the CLI gives it: a list, or (before it splits them) the
    comma-separated string."""
    return list(value) if isinstance(value, list) else value.split(",")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def mount_of(c: dict, path: str) -> dict:
    """The volume mount `path` lies in."""
    for mount in c["volumeMounts"]:
        if path == mount["mountPath"] or path.startswith(mount["mountPath"] + "/"):
            return mount
    raise AssertionError(f"{path} is not in any volume mounted in {c['name']}")


def mounted_file(c: dict, volumes: dict, path: str, secrets: dict) -> None:
    """`path` is a file of a Secret mounted into the container."""
    mount = mount_of(c, path)
    secret = volumes[mount["name"]]["secret"]["secretName"]
    name = path[len(mount["mountPath"]):].strip("/")
    assert not name or name in secrets[secret], (path, secret, secrets[secret])


def mounted_secret(c: dict, volumes: dict, folder: str) -> set[str]:
    """The files of the Secret mounted exactly at `folder` (an allow-list folder)."""
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == folder]
    return secret_files()[volumes[mount["name"]]["secret"]["secretName"]]


def ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (500m, 2, 128Mi, 1Gi) as a number: cores or bytes."""
    units = {"m": 1e-3, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|)", str(text)).groups()
    return float(number) * units[unit]


# --- the schemas a cluster applies ------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_kubernetes_validate_strict(version):
    checked = []
    for (kind, name), doc in manifests().items():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue            # a CRD: KEDA's schema, in the next test
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(kind)
    assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget"} <= set(checked)


def test_the_validator_refuses_a_misspelled_or_misplaced_field():
    """The check above can fail: strict validation refuses an unknown field, a field on the
    wrong object, and a value of the wrong type."""
    broker = manifests()[("StatefulSet", "splitexit-broker")]
    bad = []
    for path, change in ((("containers", 0), {"startupProbes": {}}),
                         (("securityContext",), {"capabilities": {"drop": ["ALL"]}}),
                         (("containers", 0, "securityContext"), {"runAsUser": "10001"})):
        doc = copy.deepcopy(broker)
        node = doc["spec"]["template"]["spec"]
        for key in path:
            node = node[key]
        node.update(change)
        bad.append(doc)
    for doc in bad:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def strict_schema(schema: dict) -> dict:
    """The CRD's schema as the API server applies it with strict field validation: an
    object that lists its properties takes no other (the server would prune or refuse
    them); `x-kubernetes-*` and `format: int32` are Kubernetes' and mean nothing here."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


def keda_validator() -> jsonschema.Draft7Validator:
    schema = strict_schema(yaml.safe_load(KEDA_SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_the_scaled_object_passes_kedas_crd_schema():
    scaled = manifests()[("ScaledObject", "splitexit-workers")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"    # the version the schema is of
    errors = [e.message for e in keda_validator().iter_errors(scaled)]
    assert errors == []


@pytest.mark.parametrize("field, value", [
    (("spec", "minReplicas"), 2),                         # the HPA's name, not KEDA's
    (("spec", "triggers", 0, "metadata", "threshold"), 8),  # KEDA wants a string
    (("spec", "scaleTargetRef"), {"kind": "Deployment"}),   # no name
])
def test_kedas_schema_refuses_what_keda_would(field, value):
    doc = copy.deepcopy(manifests()[("ScaledObject", "splitexit-workers")])
    node = doc
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    assert list(keda_validator().iter_errors(doc))


# --- what the pods run -------------------------------------------------------------------

def test_workloads_select_their_own_pods_and_probe_start_readiness_and_liveness():
    for component, w in workloads().items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"] == labels and NAME.items() <= labels.items()
        c, _ = container(w)
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/healthz")):
            assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, (component, probe)
        start = c["startupProbe"]
        # a worker waits on brokers to be ready, so its startup probe (which restarts the
        # container when it runs out) asks only that the process serves; a broker's
        # readiness is its own (both sockets bound)
        path = "/ready" if component == "broker" else "/healthz"
        assert start["httpGet"] == {"path": path, "port": "metrics"}, component
        # up to a minute to start: `up` took 11.5 s to ready two workers on a busy machine
        assert start["periodSeconds"] * start["failureThreshold"] >= 60, component


def test_every_container_is_sized_from_what_it_was_measured_to_use():
    for component, w in workloads().items():
        c, _ = container(w)
        res = c["resources"]
        for kind in ("cpu", "memory"):
            assert quantity(res["requests"][kind]) <= quantity(res["limits"][kind]), component
        mib = {k: quantity(res[k]["memory"]) / 2 ** 20 for k in ("requests", "limits")}
        used = MEASURED_MIB[component]
        assert mib["requests"] >= used["pss"], component          # schedulable where it fits
        headroom = 64 if component == "broker" else 0             # --max-held-mb's default
        assert mib["limits"] >= 1.5 * (used["rss"] + headroom), component
    assert quantity(container(workloads()["worker"])[0]["resources"]["requests"]["cpu"]) >= 1


def dockerfile_user() -> int:
    users = re.findall(r"^USER (\d+)(?::(\d+))?$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert len(users) == 2                                       # edge and server
    assert len({u for u, _ in users}) == 1
    return int(users[0][0])


def test_every_pod_runs_restricted_as_the_images_user():
    uid = dockerfile_user()
    for component, w in workloads().items():
        pod = w["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, component
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid > 0, component
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, component
        c, volumes = container(w)
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
        assert csc["capabilities"] == {"drop": ["ALL"]}, component
        for v in volumes.values():          # key files: no one but the process' group
            if "secret" in v:
                assert v["secret"]["defaultMode"] & 0o077 == 0o040, (component, v["name"])


def test_what_a_worker_writes_is_on_a_writable_volume(monkeypatch):
    """A read-only root filesystem leaves the worker launcher its metric files
    (--metrics-dir), the native coder's cache ($SPLITEXIT_CACHE) and the compiler's
    temporaries (/tmp), all traced with strace on a real run (docs/deployment.md); the
    broker writes nothing and gets no writable volume."""
    c, volumes = container(workloads()["worker"])
    args = parse(c, monkeypatch)
    env = {v["name"]: v["value"] for v in c["env"]}
    for path in (args.metrics_dir, env["SPLITEXIT_CACHE"], "/tmp"):
        mount = mount_of(c, path)
        assert not mount.get("readOnly") and "emptyDir" in volumes[mount["name"]], path
    broker, _ = container(workloads()["broker"])
    assert all(m.get("readOnly") for m in broker["volumeMounts"])


def test_each_workload_has_a_disruption_budget_that_leaves_it_serving():
    m = manifests()
    budgets = [d for (kind, _), d in m.items() if kind == "PodDisruptionBudget"]
    minimum = {"broker": workloads()["broker"]["spec"]["replicas"],
               "worker": m[("ScaledObject", "splitexit-workers")]["spec"]["minReplicaCount"]}
    for component, w in workloads().items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        [pdb] = [b for b in budgets if b["spec"]["selector"]["matchLabels"] == labels]
        allowed = pdb["spec"]["maxUnavailable"]
        if isinstance(allowed, str):                   # a percentage: Kubernetes rounds up
            allowed = -(-int(allowed.rstrip("%")) * minimum[component] // 100)
        assert 1 <= allowed < minimum[component], component   # drains proceed, never to 0


def test_the_brokers_bind_what_their_headless_service_and_container_expose(monkeypatch):
    m, secrets = manifests(), secret_files()
    brokers = m[("StatefulSet", "splitexit-broker")]
    c, volumes = container(brokers)
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
    service = m[("Service", brokers["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None"     # a DNS name per broker, no balancing
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = brokers["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports(c)
    assert brokers["spec"]["replicas"] >= 2           # one broker is no failover


def broker_names(port_name: str) -> list[str]:
    """tcp://NAME:PORT of every broker pod the StatefulSet makes, by its stable DNS name."""
    m = manifests()
    brokers = m[("StatefulSet", "splitexit-broker")]
    service = m[("Service", brokers["spec"]["serviceName"])]
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}[port_name]
    return [f"tcp://{brokers['metadata']['name']}-{i}.{service['metadata']['name']}:{port}"
            for i in range(brokers["spec"]["replicas"])]


def test_workers_join_every_broker_with_keys_they_allow(monkeypatch):
    m, secrets = manifests(), secret_files()
    c, volumes = container(m[("Deployment", "splitexit-workers")])
    args = parse(c, monkeypatch)
    assert args.command == "workers" and args.n == 1
    assert addresses(args.broker) == broker_names("backend")     # all of them, no own broker
    assert ports(c) == {"metrics": args.metrics_port} and args.metrics_addr == "0.0.0.0"
    mounted_file(c, volumes, args.curve_secret, secrets)
    mounted_file(c, volumes, args.curve_server, secrets)
    broker, _ = container(m[("StatefulSet", "splitexit-broker")])
    # the key the workers trust is the public half of the pair every broker mounts
    assert Path(parse(broker, monkeypatch).broker_secret).name == \
        Path(args.curve_server).name + "_secret"
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


def test_prometheus_keeps_the_ports_named_metrics_of_splitexit_pods_and_alerts_on_them():
    scrape = yaml.safe_load((DEPLOY / "prometheus-scrape.yml").read_text())
    [job] = scrape["scrape_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    assert keep == {"__meta_kubernetes_pod_label_app_kubernetes_io_name": "splitexit",
                    "__meta_kubernetes_pod_container_port_name": "metrics"}
    # SplitexitTargetDown watches this job (and the local config's)
    rules = yaml.safe_load((ROOT / "pipeline" / "configs" / "alerts.yml").read_text())
    [down] = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "SplitexitTargetDown"]
    pattern = re.search(r'job=~"([^"]+)"', down["expr"]).group(1)
    local = yaml.safe_load((ROOT / "pipeline" / "configs" / "prometheus.yml").read_text())
    for name in [job["job_name"]] + [j["job_name"] for j in local["scrape_configs"]]:
        assert re.fullmatch(pattern, name), name


# --- the images ----------------------------------------------------------------------------

def stages() -> dict[str, str]:
    parts = re.split(r"^FROM ", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    return {s.split()[2]: s for s in parts[1:]}


def test_the_edge_image_has_no_torch_and_the_server_image_the_pinned_one():
    by_name = stages()
    assert "torch" not in by_name["edge"] and "[server]" not in by_name["edge"]
    assert "torch==2.13.0" in by_name["server"] and "[server]" in by_name["server"]
    assert "gcc" in by_name["server"]        # the native coder, built where the worker runs


def test_the_images_run_as_a_numeric_non_root_user_from_a_pinned_or_explained_base():
    text = (DEPLOY / "Dockerfile").read_text()
    by_name = stages()
    for name in ("edge", "server"):                     # the last USER of each image
        assert re.findall(r"^USER (\S+)", by_name[name], re.M)[-1] == "10001:10001", name
    assert dockerfile_user() == 10001
    # every stage starts from the one base (ARG PYTHON_IMAGE) or from an earlier stage
    bases = [s.split()[0] for s in by_name.values()]
    assert set(bases) <= {"${PYTHON_IMAGE}", *by_name}, bases
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    pinned = re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base)
    # no digest could be had offline: then the file says why, and how to pin it
    assert pinned or ("not by digest" in text and "imagetools inspect" in text)


def dockerignore() -> list[re.Pattern]:
    """.dockerignore's patterns as Docker reads them: paths from the context's root, `*`
    within one path segment, `**` across any number of them, a trailing / dropped."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not modelled here"
        segments = []
        for seg in line.rstrip("/").split("/"):
            if seg == "**":
                segments.append("(?:[^/]+/)*")
            else:
                body = fnmatch.translate(seg).removeprefix("(?s:").removesuffix(")\\Z")
                segments.append(body.replace(".*", "[^/]*") + "/")
        out.append(re.compile("".join(segments).removesuffix("/") + r"\Z"))
    return out


def ignored(rel: str, patterns: list[re.Pattern]) -> bool:
    """A path is left out when it, or a folder above it, matches."""
    parts = rel.split("/")
    return any(p.match("/".join(parts[:i])) for i in range(1, len(parts) + 1) for p in patterns)


def test_dockerignore_keeps_keys_history_runs_and_caches_out_of_the_context():
    patterns = dockerignore()
    for path in (".git/HEAD", "runs/default/server.pt", "deploy/keys/broker.key_secret",
                 "broker.key", "pipeline/__pycache__/cli.cpython-311.pyc", ".venv/bin/python",
                 ".pytest_cache/v/cache/lastfailed", ".hypothesis/examples/x",
                 "pipeline/floor/coder-0123.so", "splitexit.egg-info/PKG-INFO",
                 "tests/test_deploy.py", "build/lib/pipeline/cli.py"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "LICENSE", "pipeline/cli.py",
                 "pipeline/floor/coder.c", "pipeline/configs/default.toml", "workers/broker.py",
                 "monitoring/metrics.py"):
        assert not ignored(path, patterns), path


def test_the_wheel_builds_from_the_docker_context_with_every_module(tmp_path):
    """What `COPY . .` gets (the repository less .dockerignore) builds the wheel, and the
    wheel holds every module of the packages."""
    patterns = dockerignore()
    context = tmp_path / "context"
    for folder, dirs, files in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not ignored((base / d).as_posix(), patterns)]
        for name in files:
            rel = (base / name).as_posix()
            if ignored(rel, patterns) or (ROOT / rel).is_symlink():
                continue
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(ROOT / rel, context / rel)
            except FileNotFoundError:    # removed meanwhile (an editor's or a test's file)
                continue
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), "."],
                           cwd=context, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("splitexit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for package in ("pipeline", "workers", "monitoring")
               for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
    assert modules and modules <= names, sorted(modules - names)[:5]
    assert "pipeline/configs/alerts.yml" in names and "pipeline/floor/coder.c" in names
