"""Run the dealer and both parties as local processes (the demo and the tests use it).

Each process is the real server command (``python -m mpcvit.commands party ...``) with
a config written from the shipped ``deploy/*.yaml`` plus overrides (127.0.0.1 and free
ports instead of the Compose host names).  Nothing is shared in memory: the processes
talk over gRPC exactly as on separate hosts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..mpc.ports import free_port

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def health_status(address: str, timeout: float = 2.0, credentials: Any = None) -> str:
    """The grpc.health.v1 status of a server ("SERVING", "NOT_SERVING", or an error name)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (grpc.secure_channel(address, credentials) if credentials is not None
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class LocalCluster:
    """Dealer + party 0 + party 1 as child processes on 127.0.0.1."""

    def __init__(self, workdir: str | Path, *, model: str = "demo", provider: str = "dealer",
                 party_overrides: dict[str, Any] | None = None,
                 per_party: dict[int, dict[str, Any]] | None = None,
                 dealer_overrides: dict[str, Any] | None = None,
                 log_format: str = "json", quiet: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {"dealer": free_port(), 0: free_port(), 1: free_port()}
        self.model = model
        self.provider = provider
        self.party_overrides = party_overrides or {}
        self.per_party = per_party or {}
        self.dealer_overrides = dealer_overrides or {}
        self.log_format = log_format
        self.quiet = quiet
        self.procs: dict[Any, subprocess.Popen] = {}
        self.configs: dict[Any, Path] = {}
        self._write_configs()

    # -- configuration -------------------------------------------------------------------
    def address(self, who: Any) -> str:
        return f"127.0.0.1:{self.ports[who]}"

    @property
    def party_addresses(self) -> list[str]:
        return [self.address(0), self.address(1)]

    def _write_configs(self) -> None:
        dealer = yaml.safe_load((DEPLOY_DIR / "dealer.yaml").read_text())
        dealer = _merge(dealer, {"listen": self.address("dealer"), "log_format": self.log_format,
                                 **self.dealer_overrides})
        self.configs["dealer"] = self._dump("dealer.yaml", dealer)
        for rank in (0, 1):
            cfg = yaml.safe_load((DEPLOY_DIR / f"party{rank}.yaml").read_text())
            over: dict[str, Any] = {"listen": self.address(rank), "peer": self.address(1 - rank),
                                    "dealer": self.address("dealer"), "provider": self.provider,
                                    "log_format": self.log_format}
            if rank == 0:
                over["model"] = self.model
            cfg = _merge(_merge(_merge(cfg, over), self.party_overrides),
                         self.per_party.get(rank, {}))
            self.configs[rank] = self._dump(f"party{rank}.yaml", cfg)

    def _dump(self, name: str, data: dict[str, Any]) -> Path:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def client_config(self, **extra: Any) -> Path:
        data = {"parties": self.party_addresses, "model": "", "timeout": 120, "wait_ready": 120,
                **extra}
        return self._dump("client.yaml", data)

    # -- processes ---------------------------------------------------------------------
    def _spawn(self, who: Any) -> subprocess.Popen:
        cmd = "dealer" if who == "dealer" else "party"
        log = open(self.workdir / f"{'dealer' if who == 'dealer' else f'party{who}'}.log", "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MPCVIT_")}
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            [sys.executable, "-m", "mpcvit.commands", cmd, "--config", str(self.configs[who])],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.procs[who] = proc
        return proc

    def start(self) -> LocalCluster:
        if self.provider == "dealer":
            self._spawn("dealer")
        self._spawn(0)
        self._spawn(1)
        return self

    def restart(self, who: Any) -> None:
        self.kill(who)
        self._spawn(who)

    def kill(self, who: Any, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(who)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop(self) -> dict[Any, int | None]:
        """SIGTERM everything (graceful), then SIGKILL what is left; return exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for who, proc in self.procs.items():
            try:
                codes[who] = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[who] = proc.wait(5)
        return codes

    def wait_ready(self, timeout: float = 120.0, credentials: Any = None) -> None:
        """Wait until both parties report SERVING (weights shared); raise with logs if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for who, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{who} exited with {proc.returncode}:\n{self.logs(who)}")
            if all(health_status(self.address(r), credentials=credentials) == "SERVING"
                   for r in (0, 1)):
                return
            time.sleep(0.3)
        raise TimeoutError(f"parties not ready in {timeout:g} s:\n{self.logs(0)}\n{self.logs(1)}")

    def logs(self, who: Any, tail: int = 40) -> str:
        name = "dealer" if who == "dealer" else f"party{who}"
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
