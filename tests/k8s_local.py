"""Run what the rendered Kubernetes overlays say, as local processes on 127.0.0.1.

For each role (party0, party1, dealer) and replica ordinal k, :class:`ManifestCluster`
starts the StatefulSet's container as a process:

- the command and args of the container (``mpcvit`` is this environment's console
  script), the image's ``ENV`` lines from deploy/Dockerfile, and the container's env as
  the kubelet builds it for replica k (ConfigMap keys, the pod-index label);
- the config file from the rendered ConfigMap, at a local copy of its mount path;
- the Secret ``mpcvit-tls`` as a directory holding what that organisation gets (a demo
  PKI), the ``/tmp`` emptyDir as ``$TMPDIR``;
- every container port mapped to a free port on 127.0.0.1, and every cluster DNS name
  of a headless Service replica (``<sts>-<k>.<svc>.<ns>.svc.cluster.local:<port>``)
  mapped to that replica's local port.  Addresses in the env and the config are
  rewritten through that map after ``{ordinal}`` is expanded; nothing else changes.

The processes then talk real gRPC over mutual TLS, as in the clusters.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mpcvit.party.local import free_port, health_status
from mpcvit.party.ordinal import PLACEHOLDER
from test_k8s import REPO, config_file, container_env, one, render

ROLES = ("dealer", "party0", "party1")
DOCKERFILE = REPO / "deploy" / "Dockerfile"
CLUSTER_DOMAIN = "svc.cluster.local"


def image_env(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The ``ENV k=v ...`` settings of a Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for word in shlex.split(line.strip()[4:]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


@dataclass
class Replica:
    """One pod of a role's StatefulSet, as a local process."""

    role: str
    ordinal: int
    root: Path
    ports: dict[str, int]  # container port name -> local port
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.ordinal}"

    def address(self, port: str = "grpc") -> str:
        return f"127.0.0.1:{self.ports[port]}"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"


class ManifestCluster:
    """``pairs`` replicas of every role of deploy/k8s/overlays, started as processes."""

    def __init__(self, workdir: Path, pairs: int = 2) -> None:
        self.workdir = Path(workdir)
        self.pairs = pairs
        self.docs = {role: render(role) for role in ROLES}
        self.replicas: dict[tuple[str, int], Replica] = {}
        self.dns: dict[str, str] = {}
        self.certs = self.workdir / "pki"
        self._plan()

    # -- plan ------------------------------------------------------------------------
    def _plan(self) -> None:
        from mpcvit.mpc.certs import generate_pki

        generate_pki(self.certs, ["dealer", "party0", "party1", "client"])
        for role in ROLES:
            sts, svc = one(self.docs[role], "StatefulSet"), one(self.docs[role], "Service")
            assert sts["spec"]["replicas"] >= self.pairs, (role, sts["spec"]["replicas"])
            (container,) = sts["spec"]["template"]["spec"]["containers"]
            for k in range(self.pairs):
                root = self.workdir / f"{role}-{k}"
                ports = {p["name"]: free_port() for p in container["ports"]}
                self.replicas[role, k] = Replica(role, k, root, ports)
                host = (f"{sts['metadata']['name']}-{k}.{svc['metadata']['name']}."
                        f"{sts['metadata']['namespace']}.{CLUSTER_DOMAIN}")
                for port in svc["spec"]["ports"]:
                    self.dns[f"{host}:{port['port']}"] = f"127.0.0.1:{ports[port['targetPort']]}"
        for (role, _k), replica in self.replicas.items():
            self._prepare(role, replica)

    def local_address(self, address: str) -> str:
        """A cluster DNS address as the local ``127.0.0.1:port`` it stands for."""
        if address not in self.dns:
            raise KeyError(f"{address} names no replica of the rendered Services")
        return self.dns[address]

    def _prepare(self, role: str, replica: Replica) -> None:
        docs = self.docs[role]
        sts, configmap = one(docs, "StatefulSet"), one(docs, "ConfigMap")
        pod = sts["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        k = replica.ordinal
        mounts = self._mounts(role, replica, pod, container)
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container["volumeMounts"]:
            if "configMap" in volumes[mount["name"]]:
                self._write_config(replica, pod, container, configmap, mount["mountPath"],
                                   mounts[mount["mountPath"]])
        env = container_env(container, configmap, ordinal=k)
        for key, value in env.items():
            value = value.replace(PLACEHOLDER, str(k))
            if value in self.dns:
                value = self.local_address(value)
            env[key] = _localize(value, mounts)
        replica.env = {**image_env(), **env, "TMPDIR": str(mounts["/tmp"])}
        command = [sys.executable, "-m", "mpcvit.commands"] if container["command"] == [
            "mpcvit"] else container["command"]
        replica.argv = command + [_localize(a, mounts) for a in container["args"]]

    def _mounts(self, role: str, replica: Replica, pod: dict, container: dict
                ) -> dict[str, Path]:
        """Mount path -> local directory; the Secret's directory gets this role's files."""
        volumes = {v["name"]: v for v in pod["volumes"]}
        out = {}
        for mount in container["volumeMounts"]:
            local = replica.root / mount["mountPath"].strip("/")
            local.mkdir(parents=True, exist_ok=True)
            out[mount["mountPath"]] = local
            volume = volumes[mount["name"]]
            if "secret" in volume:
                assert volume["secret"]["secretName"] == "mpcvit-tls"
                files = ["ca.pem", f"{role}.pem", f"{role}.key"]
                if role.startswith("party"):
                    files.append("client-ca.pem")
                for name in files:
                    (local / name).write_bytes((self.certs / name).read_bytes())
        return out

    def _write_config(self, replica: Replica, pod: dict, container: dict, configmap: dict,
                      mount: str, local: Path) -> None:
        """The ConfigMap's file, with its own listening ports mapped to local ones."""
        args_path = next(a for a in container["args"] if a.startswith(mount + "/"))
        data = yaml.safe_load(config_file(pod, container, configmap, args_path))
        by_number = {p["containerPort"]: replica.ports[p["name"]] for p in container["ports"]}
        _host, port = data["listen"].rsplit(":", 1)
        data["listen"] = f"127.0.0.1:{by_number[int(port)]}"
        if data.get("health_port"):
            data["health_port"] = by_number[int(data["health_port"])]
        if (data.get("metrics") or {}).get("port"):
            data["metrics"]["port"] = by_number[int(data["metrics"]["port"])]
        (local / os.path.basename(args_path)).write_text(yaml.safe_dump(data, sort_keys=False))

    # -- processes ---------------------------------------------------------------------
    def start(self) -> ManifestCluster:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MPCVIT_")}
        for replica in self.replicas.values():
            self._spawn(replica, base)
        return self

    def _spawn(self, replica: Replica, base: dict[str, str]) -> None:
        with open(replica.log, "ab") as log:
            replica.proc = subprocess.Popen(
                replica.argv, env={**base, **replica.env}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=replica.root)

    def kill(self, role: str, ordinal: int) -> None:
        proc = self.replicas[role, ordinal].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(15)

    def stop(self) -> None:
        procs = [r.proc for r in self.replicas.values() if r.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def probe(self, role: str, ordinal: int, service: str = "") -> str:
        """Health on the plaintext probe port, as the kubelet's gRPC probe asks it."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        address = self.replicas[role, ordinal].address("health")
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5)
            except grpc.RpcError as exc:
                return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float) -> None:
        """Every replica SERVING on its probe port (parties: their pair is up)."""
        deadline = time.monotonic() + timeout
        waiting = list(self.replicas)
        while time.monotonic() < deadline:
            for key in waiting:
                proc = self.replicas[key].proc
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{key} exited with {proc.returncode}:\n{self.logs(*key)}")
            waiting = [key for key in waiting if self.probe(*key) != "SERVING"]
            if not waiting:
                return
            time.sleep(0.5)
        raise TimeoutError(f"not SERVING after {timeout:g} s: {waiting}\n" +
                           "\n".join(self.logs(*key) for key in waiting))

    def logs(self, role: str, ordinal: int, tail: int = 30) -> str:
        path = self.replicas[role, ordinal].log
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return f"--- {role}-{ordinal}\n" + "\n".join(lines[-tail:])

    def pair_addresses(self, k: int) -> tuple[str, str]:
        """Pair k's parties, by the cluster DNS names a client in the cluster would dial."""
        return tuple(self.local_address(_replica_dns(self.docs[f"party{r}"], k))
                     for r in (0, 1))  # type: ignore[return-value]

    def health_tls_status(self, address: str) -> str:
        """Health on the mutual-TLS port, as a client certificate holder sees it."""
        import grpc

        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.certs / "ca.pem").read_bytes(),
            private_key=(self.certs / "client.key").read_bytes(),
            certificate_chain=(self.certs / "client.pem").read_bytes())
        return health_status(address, credentials=creds)


def _replica_dns(docs: list[dict], k: int) -> str:
    sts, svc = one(docs, "StatefulSet"), one(docs, "Service")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    return (f"{sts['metadata']['name']}-{k}.{svc['metadata']['name']}."
            f"{sts['metadata']['namespace']}.{CLUSTER_DOMAIN}:{port}")


def _localize(value: str, mounts: dict[str, Any]) -> str:
    """A path inside the container as the local directory its mount stands for."""
    for mount, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if value == mount or value.startswith(mount + "/"):
            return str(local) + value[len(mount):]
    return value
