"""The Kubernetes overlays (deploy/k8s), checked without a cluster.

Each overlay is rendered with ``kubectl kustomize`` (offline), validated against the
Kubernetes JSON schemas bundled in kubernetes-validate (offline, strict: unknown fields
fail), and its structure is checked against what the servers do: the config in the
ConfigMap loads, ``{ordinal}`` turns replica k's addresses into the other overlays'
replica k, the probes hit the health port the config opens, and the command line parses
with the real CLI.  Also the ``{ordinal}`` expansion itself.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml
from mpcvit.mpc.errors import ConfigError
from mpcvit.party.config import DealerConfig, MetricsConfig, PartyConfig, tls_from_dir
from mpcvit.party.ordinal import expand_ordinal, pod_ordinal

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s" / "overlays"
OVERLAYS = ("party0", "party1", "dealer")
SCHEMA_VERSIONS = ("1.28.0", "1.37.0")  # pod-index label (1.28) .. newest bundled


def kubectl_or_skip() -> str:
    """kubectl with a kustomize new enough for the overlays (``make`` installs it)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed and `make` could not install it (needs root "
                    "and apt: Debian's kubectl package)")
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True,
                         timeout=60).stdout
    match = re.search(r"Kustomize Version: v(\d+)", out)
    if match is None or int(match.group(1)) < 4:
        pytest.skip(f"this kubectl ({out.strip().splitlines()[0] if out else '?'}) embeds a "
                    "kustomize older than v4 (e.g. Debian bookworm's kubernetes-client 1.20), "
                    "which cannot read these overlays")
    return kubectl


def kustomize(path: Path) -> list[dict]:
    proc = subprocess.run([kubectl_or_skip(), "kustomize", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@cache
def _render(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / overlay))


def render(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_render(overlay)))


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def container_env(container: dict, configmap: dict, ordinal: int) -> dict[str, str]:
    """The environment the container gets, as the kubelet would build it for replica k."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            assert ref["name"] == configmap["metadata"]["name"]
            env[var["name"]] = configmap["data"][ref["key"]]
        elif source["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']":
            env[var["name"]] = str(ordinal)
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


def config_file(pod: dict, container: dict, configmap: dict, args_path: str) -> str:
    """The text of the file at ``args_path`` inside the container (a ConfigMap key)."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    directory, name = os.path.split(args_path)
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[directory])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = next(i["key"] for i in volume["configMap"]["items"] if i["path"] == name)
    return configmap["data"][key]


def dns_target(docs: list[dict], ordinal: int, port_name: str = "grpc") -> str:
    """``host:port`` of replica ``ordinal`` through an overlay's headless Service."""
    sts, svc = one(docs, "StatefulSet"), one(docs, "Service")
    assert svc["spec"]["clusterIP"] == "None"
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == port_name)
    ns = sts["metadata"]["namespace"]
    return (f"{sts['metadata']['name']}-{ordinal}.{svc['metadata']['name']}.{ns}"
            f".svc.cluster.local:{port}")


# -- schemas ----------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_kubernetes_schemas(overlay) -> None:
    import kubernetes_validate

    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Namespace", "PodDisruptionBudget", "Service", "StatefulSet"]
    for version in SCHEMA_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    # The check is strict and has teeth: a misspelt field fails.
    bad = one(docs, "StatefulSet")
    bad["spec"]["replica"] = bad["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, SCHEMA_VERSIONS[0], strict=True)


# -- parties ----------------------------------------------------------------------------
def party_parts(rank: int) -> tuple[list[dict], dict, dict, dict]:
    docs = render(f"party{rank}")
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return docs, sts, container, one(docs, "ConfigMap")


def test_party_overlays_pair_replica_k_with_replica_k() -> None:
    dealer = render("dealer")
    replicas = {}
    for rank in (0, 1):
        docs, sts, container, configmap = party_parts(rank)
        other = render(f"party{1 - rank}")
        replicas[rank] = sts["spec"]["replicas"]
        args = container["args"]
        assert container["command"] == ["mpcvit"] and args[:2] == ["party", "--config"]
        text = config_file(sts["spec"]["template"]["spec"], container, configmap, args[2])
        for k in (0, 3):
            env = container_env(container, configmap, ordinal=k)
            config = PartyConfig.from_dict(yaml.safe_load(text), env=env)
            assert config.rank == rank
            assert config.peer == dns_target(other, k)
            assert config.provider.address == dns_target(dealer, k)
            assert config.tls is not None and config.tls.cert == f"/certs/party{rank}.pem"
        assert config.listen.endswith(":50051")
    assert replicas[0] == replicas[1] >= 2
    assert one(dealer, "StatefulSet")["spec"]["replicas"] >= replicas[0]


@pytest.mark.parametrize("rank", [0, 1])
def test_party_overlay_structure(rank) -> None:
    from mpcvit.commands import build_parser

    docs, sts, container, configmap = party_parts(rank)
    name = f"mpcvit-party{rank}"
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert sts["metadata"]["name"] == name and sts["metadata"]["namespace"] == name
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/instance"] == name  # one party never selects the other

    svc = one(docs, "Service")
    assert spec["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"] == spec["selector"]["matchLabels"]

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1

    args = build_parser("party").parse_args(container["args"])
    text = config_file(pod, container, configmap, args.config)
    config = PartyConfig.from_dict(yaml.safe_load(text),
                                   env=container_env(container, configmap, ordinal=0))
    check_probes_ports_and_resources(sts, container, config.health_port, config.metrics,
                                     config.listen)
    check_certs(pod, container, f"party{rank}")


def check_probes_ports_and_resources(sts: dict, container: dict, health_port: int,
                                     metrics: MetricsConfig, listen: str) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(listen.rsplit(":", 1)[1])
    assert health_port and ports["health"] == health_port
    assert metrics.enabled and ports["metrics"] == metrics.port
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics.port)
    # Native gRPC probes, on the plaintext health port: readiness is the server's overall
    # status, liveness and start-up the process's.
    for probe, service in (("readinessProbe", None), ("livenessProbe", "liveness"),
                           ("startupProbe", "liveness")):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == health_port, probe
        assert grpc_probe.get("service") == service, probe
    resources = container["resources"]
    for what in ("cpu", "memory"):
        assert what in resources["requests"] and what in resources["limits"]
    assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"])
    assert quantity(resources["requests"]["cpu"]) <= quantity(resources["limits"]["cpu"])


def quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units[unit]


def check_certs(pod: dict, container: dict, role: str) -> None:
    """The Secret holds ca.pem, <role>.pem, <role>.key and is mounted at MPCVIT_TLS_DIR."""
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == "mpcvit-tls"
    assert "items" not in volume["secret"]  # every file of the Secret: ca.pem, <role>.*
    mount = mounts[volume["name"]]
    assert mount["readOnly"] and mount["mountPath"] == env["MPCVIT_TLS_DIR"]
    files = tls_from_dir({"MPCVIT_TLS_DIR": mount["mountPath"]}, role)
    assert (files.ca, files.cert, files.key) == tuple(
        f"{mount['mountPath']}/{f}" for f in ("ca.pem", f"{role}.pem", f"{role}.key"))


def test_dealer_overlay_structure() -> None:
    from mpcvit.commands import build_parser

    docs = render("dealer")
    sts, svc, configmap = (one(docs, k) for k in ("StatefulSet", "Service", "ConfigMap"))
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert sts["metadata"]["namespace"] == "mpcvit-dealer"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert container["command"] == ["mpcvit"]
    args = build_parser("dealer").parse_args(container["args"])
    assert container["args"][0] == "dealer"
    text = config_file(pod, container, configmap, args.config)
    config = DealerConfig.from_dict(yaml.safe_load(text),
                                    env=container_env(container, configmap, ordinal=0))
    check_probes_ports_and_resources(sts, container, config.health_port, config.metrics,
                                     config.listen)
    check_certs(pod, container, "dealer")


def test_peer_address_is_a_parameter_of_the_overlay(tmp_path) -> None:
    """Across clusters: an organisation's own overlay on top of deploy/k8s/overlays/party0 sets the
    peer's published names (docs/deploy.md) with a ConfigMap merge."""
    base = os.path.relpath(K8S / "party0", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [base],
        "configMapGenerator": [{"name": "mpcvit-party", "behavior": "merge", "literals": [
            "peer=p1-{ordinal}.mpcvit.example.org:50051",
            "dealer=dealer-{ordinal}.mpcvit.example.net:50050"]}],
    }))
    docs = kustomize(tmp_path)
    sts, configmap = one(docs, "StatefulSet"), one(docs, "ConfigMap")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    text = config_file(sts["spec"]["template"]["spec"], container, configmap,
                       container["args"][2])
    config = PartyConfig.from_dict(yaml.safe_load(text),
                                   env=container_env(container, configmap, ordinal=5))
    assert config.peer == "p1-5.mpcvit.example.org:50051"
    assert config.provider.address == "dealer-5.mpcvit.example.net:50050"


# -- {ordinal} --------------------------------------------------------------------------
def test_ordinal_from_env_or_statefulset_host_name() -> None:
    assert pod_ordinal({"MPCVIT_ORDINAL": "7"}, hostname="whatever-2") == 7
    assert pod_ordinal({}, hostname="mpcvit-party1-12") == 12
    assert pod_ordinal({"MPCVIT_ORDINAL": ""}, hostname="mpcvit-party1-3.local") == 3
    assert pod_ordinal({"HOSTNAME": "mpcvit-dealer-4"}) == 4
    assert pod_ordinal({}, hostname="laptop") is None
    with pytest.raises(ConfigError):
        pod_ordinal({"MPCVIT_ORDINAL": "-1"})


def test_ordinal_placeholder_in_party_config() -> None:
    data = {"rank": 1, "listen": "0.0.0.0:50051", "peer": "p0-{ordinal}.example.org:50051",
            "dealer": "dealer-{ordinal}.example.org:50050"}
    config = PartyConfig.from_dict(data, env={"MPCVIT_ORDINAL": "2"})
    assert config.peer == "p0-2.example.org:50051"
    assert config.provider.address == "dealer-2.example.org:50050"
    # An environment override may carry the placeholder too.
    env = {"HOSTNAME": "mpcvit-party1-6", "MPCVIT_PEER": "x-{ordinal}:1"}
    assert PartyConfig.from_dict(data, env=env).peer == "x-6:1"
    # Without an ordinal the placeholder is an error, not a literal host name.
    with pytest.raises(ConfigError, match="ordinal"):
        PartyConfig.from_dict(data, env={"HOSTNAME": "laptop"})
    # No placeholder: no ordinal needed, nothing changes.
    plain = {"listen": "a:1", "peer": "b:2"}
    assert expand_ordinal(plain, env={}, hostname="laptop") is plain


def test_side_port_settings() -> None:
    data = {"rank": 0, "listen": "0.0.0.0:1", "peer": "p:2", "provider": "tfp"}
    config = PartyConfig.from_dict(data, env={})
    assert not config.metrics.enabled and config.health_port == 0  # off unless asked
    config = PartyConfig.from_dict({**data, "metrics": {"enabled": True, "port": 9100},
                                    "health_port": 8081}, env={})
    assert config.metrics == MetricsConfig(True, 9100) and config.health_port == 8081
    dealer = DealerConfig.from_dict({"metrics": {"port": 9091}, "health_port": 8082}, env={})
    assert dealer.metrics == MetricsConfig(True, 9091) and dealer.health_port == 8082
    for bad in ({"metrics": {"port": 0}}, {"metrics": {"prot": 1}}, {"health_port": 70000}):
        with pytest.raises(ConfigError):
            PartyConfig.from_dict({**data, **bad}, env={})
