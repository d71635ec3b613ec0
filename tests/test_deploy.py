"""deploy/ against the Kubernetes API schema and against what the service really serves: its flags and
environment variables (server.flags.build_parser), its routes and metrics (the running service), the drain
on SIGTERM; the image's Dockerfile through hadolint, the HAProxy config through `haproxy -c`."""

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT
from loadtest.fleet_bench import HAPROXY_CFG, loopback_config
from server.flags import build_parser

DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are written for


def load(*paths: Path) -> list[dict]:
    return [doc for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]


def base_resources() -> list[dict]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return load(*(BASE / name for name in kustomization["resources"]))


def kustomized(directory: Path) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(resources: list[dict], kind: str, component: str | None = None) -> dict:
    """The one resource of this kind (and app.kubernetes.io/component label)."""
    found = [r for r in resources if r["kind"] == kind
             and component in (None, r["metadata"]["labels"].get("app.kubernetes.io/component"))]
    assert len(found) == 1, f"{len(found)} {kind} {component or ''}"
    return found[0]


def environment_options() -> dict:
    """LLM_LLAMA_SERVICE_* (and the others the service reads) -> its argparse action."""
    return {re.search(r"\[env (\S+)\]", a.help).group(1): a for a in build_parser()._actions
            if a.help and "[env " in a.help}


def served_settings(config: dict, monkeypatch) -> dict:
    """The serve settings a replica gets from this ConfigMap data: build_parser() reads the environment."""
    for key in list(os.environ):
        if key.startswith("LLM_LLAMA_SERVICE_"):
            monkeypatch.delenv(key)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    return vars(build_parser().parse_args([]))


def kubernetes_schema_errors(resources: list[dict]) -> list[str]:
    errors = []
    for r in resources:
        if r["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD (Prometheus Operator): no schema in the package; test_the_service_monitor checks it
        try:
            kubernetes_validate.validate(r, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{r['kind']}/{r['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    return errors


@pytest.mark.unit
def test_manifests_match_the_kubernetes_api_schema():
    assert kubernetes_schema_errors(base_resources()) == []


@pytest.mark.unit
@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (kustomize) is not installed")
def test_the_gpu_overlay_builds_and_matches_the_schema():
    resources = kustomized(DEPLOY / "kubernetes" / "gpu")
    assert kubernetes_schema_errors(resources) == []
    assert {r["metadata"]["name"] for r in resources} == {r["metadata"]["name"] for r in base_resources()}
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and container["image"].endswith(":cuda")
    assert one(resources, "ConfigMap")["data"]["LLM_LLAMA_SERVICE_GPU_LAYERS"] == "-1"


@pytest.mark.unit
def test_the_config_map_says_only_what_the_service_reads(monkeypatch):
    config = one(base_resources(), "ConfigMap")["data"]
    options = environment_options()
    unknown = sorted(set(config) - set(options) - {"ENV"})  # ENV=production: the gRPC door requires TLS
    assert unknown == [], f"the service reads no such variable: {unknown}"
    settings = served_settings(config, monkeypatch)
    for key, value in config.items():
        if key in options:
            action = options[key]
            want = value.lower() in ("1", "true", "yes", "on") if action.type is None else action.type(value)
            assert settings[action.dest] == want, key


@pytest.mark.service
def test_ports_probes_and_drain_match_the_service(monkeypatch, server):
    resources = base_resources()
    config = one(resources, "ConfigMap")["data"]
    settings = served_settings(config, monkeypatch)
    defaults = vars(build_parser().parse_args([]))
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings["port"], "grpc": settings["grpc_port"], "metrics": settings["metrics_port"]}
    assert (settings["port"], settings["grpc_port"]) == (defaults["port"], defaults["grpc_port"])
    assert re.search(rf"^EXPOSE {defaults['port']} {defaults['grpc_port']}$", DOCKERFILE, re.M)

    # every probe asks the HTTP door's /health, which answers 200 only when the replica serves
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http", probe
        status, body = server.get(container[probe]["httpGet"]["path"])
        assert status == 200 and b'"status":"healthy"' in body, probe
    assert "/health" in re.search(r"^HEALTHCHECK .*\n.*$", DOCKERFILE, re.M).group(0)

    # SIGTERM drains for the drain timeout; Kubernetes waits longer before it kills
    assert settings["drain_timeout"] > 0
    assert pod["terminationGracePeriodSeconds"] >= settings["drain_timeout"] + 15
    assert "STOPSIGNAL SIGTERM" in DOCKERFILE

    # threads: the service cannot see the container's CPU limit, so they follow the request
    assert settings["threads"] * settings["workers"] <= int(container["resources"]["requests"]["cpu"])


@pytest.mark.unit
def test_services_secret_and_volumes_fit_the_deployment(monkeypatch):
    resources = base_resources()
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for service in (one(resources, "Service", "api"), one(resources, "Service", "pods")):
        assert service["spec"]["selector"].items() <= labels.items()
        for p in service["spec"]["ports"]:
            assert ports[p["targetPort"]] == p["port"], p
    assert one(resources, "Service", "pods")["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in one(resources, "Service", "api")["spec"]["ports"]} == {"http", "grpc", "metrics"}
    assert one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(resources, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]

    # the TLS paths of the ConfigMap are the Secret's files where they are mounted; the API key comes from it
    secret = one(resources, "Secret")
    settings = served_settings(one(resources, "ConfigMap")["data"], monkeypatch)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    certs = next(name for name, v in volumes.items()
                 if v.get("secret", {}).get("secretName") == secret["metadata"]["name"])
    files = {f"{mounts[certs]['mountPath']}/{item['path']}": item["key"] for item in volumes[certs]["secret"]["items"]}
    for option in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_ca"):
        assert files[settings[option]] in secret["stringData"], option
    api_key = next(e for e in container["env"] if e["name"] == "LLM_LLAMA_SERVICE_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    assert "LLM_LLAMA_SERVICE_API_KEY" in environment_options()

    # the model volume is where the image keeps the model, and the init container's code runs
    cache = re.search(r"^\s+SENTIRIC_CACHE_DIR=(\S+)", DOCKERFILE, re.M).group(1)  # the runtime stage's ENV
    assert mounts["models"]["mountPath"] == cache
    fetch = pod["initContainers"][0]
    assert {m["mountPath"] for m in fetch["volumeMounts"]} >= {cache}
    module, function = re.match(r"from (\S+) import (\w+); \2\(\)$", fetch["command"][-1]).groups()
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.service
def test_the_service_monitor_and_the_autoscaler_read_metrics_the_service_exports(server):
    resources = load(*BASE.glob("*.yaml"))
    monitor = one(resources, "ServiceMonitor")
    api = one(resources, "Service", "api")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= api["metadata"]["labels"].items()
    headless = one(resources, "Service", "pods")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()
    endpoint, = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in api["spec"]["ports"]}
    status, body = server.get(endpoint["path"])
    exported = {line.split(" ")[0].split("{")[0] for line in body.decode().splitlines() if line and line[0] != "#"}
    assert status == 200
    metric = one(resources, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in exported
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter.yaml").read_text())
    assert [rule["name"]["as"] for rule in adapter["rules"]["custom"]] == [metric]


@pytest.mark.unit
def test_the_dockerfile_passes_hadolint():
    done = subprocess.run(["hadolint", str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.unit
@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy is not installed (.ci/setup.sh --test installs it)")
def test_the_haproxy_config_and_its_loopback_form_are_valid(tmp_path):
    env = {**os.environ, "LB_HTTP_BIND": "127.0.0.1:1", "LB_GRPC_BIND": "127.0.0.1:2", "LB_STATS_BIND": "127.0.0.1:3",
           "LLM_REPLICAS_DNS": "llm-llama-service-pods.default.svc.cluster.local"}
    defaults = vars(build_parser().parse_args([]))
    text = HAPROXY_CFG.read_text()
    assert {int(p) for p in re.findall(r'LLM_REPLICAS_DNS\}":(\d+)', text)} == {defaults["port"], defaults["grpc_port"]}
    backends = re.findall(r"^backend \S+\n(?:[ \t]+.*\n)+", text, re.M)
    assert len(backends) == 4 and all("option httpchk GET /health\n    http-check expect status 200" in b
                                      for b in backends)

    class Replica:
        def __init__(self, i):
            self.name, self.http_port, self.grpc_port = f"replica{i}", 20000 + i, 21000 + i
    loopback = tmp_path / "loopback.cfg"
    loopback.write_text(loopback_config(text, [Replica(1), Replica(2)], balance="roundrobin"))
    assert "server replica2 127.0.0.1:21002 proto h2 port 20002" in loopback.read_text()
    for cfg in (HAPROXY_CFG, loopback):
        done = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
