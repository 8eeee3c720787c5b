"""Soak and fault run of the real service (``mpcvit bench soak``).

Starts dealer + party 0 + party 1 as separate processes with mutual TLS (a fresh PKI
from :func:`mpcvit.mpc.certs.generate_pki`), serving the shipped demo checkpoint, and
then, in order:

1. **sequential**: N requests one after another on Fashion-MNIST test images; counts
   failures and argmax mismatches against the plaintext model, and the resident memory
   (VmRSS) growth of each process after a warm-up;
2. **concurrent**: K clients x M requests at once; each client checks its logits against
   the plaintext logits of its own images; a *crossed* session is a client receiving
   logits that match another client's image;
3. **hostile inputs**: one-sided and mismatched halves next to a valid request, oversize
   and garbage requests, raw garbage bytes on the ports, a flood of calls; every one
   must get its documented status and leave both parties serving;
4. **kills**: party 1 (and then the dealer) SIGKILLed at a chosen phase of a request
   (idle, pairing, randomness fetch, online forward, result return), then restarted:
   time-to-error (kill -> a client sees an error) and time-to-recover (restart -> the
   first successful request);
5. **role probes** (:func:`hostile_role_probes`): connections mutual TLS and the role
   checks must refuse.

Progress goes to stderr; :func:`soak` returns the figures (the command prints them).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import grpc
    from mpcvit.party.client import ClientTls, PrivateInferenceClient
    from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc, peer_pb2

PARTY_PHASES = ("idle", "pairing", "fetch", "online", "return")
DEALER_PHASES = ("idle", "fetch", "online")
# The first log event of party 0 that marks each phase of a request (see kill_round).
_PHASE_EVENT = {"fetch": "event=offline_prepare_start", "online": "event=session_start",
                "return": "event=session_done"}
_DEADLINE_S = 120.0  # bound on any wait for an error or a recovery


@dataclass(frozen=True)
class SoakConfig:
    """What to run; the defaults are the figures docs/reliability.md reports."""

    sequential: int = 1000
    warmup: int = 50
    clients: int = 8
    per_client: int = 50
    party_kills: int = 10
    dealer_kills: int = 3
    model: str = "demo"
    data: str = "fashion-mnist"
    seed: int = 0
    atol: float = 0.1  # logits within this of an image's plaintext logits "match" it
    request_timeout: float = 60.0


def _mb(kb: int) -> float:
    return kb / 1024.0


def rss_kb(pid: int) -> int:
    """Resident memory of a process (VmRSS from /proc), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


class LogTail:
    """Waits for a line in a process's log that appears after this object was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                seen += f.read()
                self.offset = f.tell()
            if needle.encode() in seen:
                return True
            time.sleep(0.005)
        return False


class SoakCluster:
    """A LocalCluster with mutual TLS everywhere, its PKI, and client factories."""

    def __init__(self, workdir: Path, model: str) -> None:
        from mpcvit.mpc.certs import generate_pki
        from mpcvit.party.local import LocalCluster

        self.workdir = workdir
        self.pki = generate_pki(workdir / "pki", ["dealer", "party0", "party1", "client"])
        self.rogue = generate_pki(workdir / "rogue", ["client"], ca_name="rogue CA")

        def tls(node: str) -> dict[str, str]:
            cfg = self.pki[node]  # a party also trusts the client CA (clients have their own)
            return {k: getattr(cfg, k) for k in ("ca", "cert", "key", "client_ca")
                    if getattr(cfg, k)}

        self.cluster = LocalCluster(workdir / "cluster", model=model, log_format="text",
                                    per_party={0: {"tls": tls("party0")},
                                               1: {"tls": tls("party1")}},
                                    dealer_overrides={"tls": tls("dealer")})

    @property
    def client_tls(self) -> ClientTls:
        from mpcvit.party.client import ClientTls

        cfg = self.pki["client"]
        return ClientTls(ca=cfg.ca, cert=cfg.cert, key=cfg.key)

    def client(self, timeout: float = 60.0) -> PrivateInferenceClient:
        from mpcvit.party.client import PrivateInferenceClient

        return PrivateInferenceClient(self.cluster.party_addresses, tls=self.client_tls,
                                      timeout=timeout)

    def channel(self, who: Any, node: str = "client") -> grpc.Channel:
        """A gRPC channel to ``who`` (a rank or "dealer") with ``node``'s certificate,
        checking that ``who``'s role answers."""
        import grpc
        from mpcvit.mpc.roles import Role

        cfg = self.pki[node]
        role = Role.dealer() if who == "dealer" else Role.party(who)
        return grpc.secure_channel(self.cluster.address(who), cfg.channel_credentials(),
                                   cfg.channel_options(role))

    def stub(self, who: int, node: str = "client"
             ) -> inference_pb2_grpc.InferenceServiceStub:
        """A raw InferenceService stub to party ``who``."""
        from mpcvit.proto.generated import inference_pb2_grpc

        return inference_pb2_grpc.InferenceServiceStub(self.channel(who, node))

    def pid(self, who: Any) -> int:
        return self.cluster.procs[who].pid

    def log(self, who: Any) -> LogTail:
        name = "dealer" if who == "dealer" else f"party{who}"
        return LogTail(self.cluster.workdir / f"{name}.log")

    def wait_ready(self, timeout: float = 180.0) -> None:
        self.cluster.wait_ready(timeout, credentials=self.pki["client"].channel_credentials())

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.cluster.procs.values())


class Reference:
    """Test images (normalised) and the plaintext model's logits for them."""

    def __init__(self, checkpoint: str, data: str, count: int) -> None:
        import torch
        from mpcvit.models.checkpoint import load_checkpoint
        from mpcvit.models.data import load_dataset

        model, _ = load_checkpoint(checkpoint)
        model.eval()
        images = load_dataset(data).test.images
        self.images = images[:max(1, min(count, len(images)))]
        with torch.no_grad():
            self.logits = np.concatenate([
                model(torch.from_numpy(self.images[i:i + 256])).numpy()
                for i in range(0, len(self.images), 256)])

    def __len__(self) -> int:
        return len(self.images)


def _check(ref: Reference, index: int, logits: np.ndarray) -> tuple[bool, float]:
    """(argmax agrees, max abs error) of secure logits against image ``index``'s."""
    want = ref.logits[index]
    return int(np.argmax(logits)) == int(np.argmax(want)), float(np.abs(logits - want).max())


def _mismatch(ref: Reference, index: int, logits: np.ndarray) -> dict[str, Any]:
    """What a disagreeing argmax looks like: a *near tie* is an image whose two best
    plaintext logits are closer than twice the secure run's error on it (fixed-point
    arithmetic may then pick either); anything else would be a wrong result."""
    want = ref.logits[index]
    top2 = np.sort(want)[-2:]
    margin, error = float(top2[1] - top2[0]), float(np.abs(logits - want).max())
    return {"image": index, "plaintext_label": int(np.argmax(want)),
            "secure_label": int(np.argmax(logits)), "plaintext_margin": margin,
            "abs_error": error, "near_tie": margin <= 2 * error}


# ----------------------------------------------------------------------------- phases
def run_sequential(sc: SoakCluster, ref: Reference, cfg: SoakConfig,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    from mpcvit.party.client import ClientError

    failures, mismatches, errors, max_err = 0, [], [], 0.0
    rss_warm: dict[str, int] = {}
    trend: list[dict[str, float]] = []
    tic = time.perf_counter()
    with sc.client(cfg.request_timeout) as client:
        for i in range(cfg.sequential):
            if i == min(cfg.warmup, cfg.sequential - 1):
                rss_warm = _rss_settled(sc)
            if i % 100 == 0:
                trend.append({str(w): _mb(rss_kb(sc.pid(w))) for w in ("dealer", 0, 1)})
            k = i % len(ref)
            try:
                pred = client.infer(ref.images[k], preprocessed=True)
            except ClientError as exc:
                failures += 1
                errors.append(str(exc)[:200])
                continue
            agree, err = _check(ref, k, pred.logits)
            if not agree:
                mismatches.append(_mismatch(ref, k, pred.logits))
            max_err = max(max_err, err)
            if (i + 1) % 50 == 0:
                progress(f"sequential {i + 1}/{cfg.sequential}: {failures} failures, "
                         f"{len(mismatches)} mismatches, {time.perf_counter() - tic:.0f} s")
    seconds = time.perf_counter() - tic
    rss_end = _rss_settled(sc)
    growth = {w: _mb(rss_end[w] - rss_warm.get(w, rss_end[w])) for w in rss_end}
    progress("RSS growth after warm-up: " + ", ".join(
        f"{'party ' + w if w != 'dealer' else w} {g:+.1f} MB" for w, g in growth.items()))
    return {"requests": cfg.sequential, "failures": failures, "mismatches": len(mismatches),
            "mismatch_details": mismatches, "max_abs_error": max_err, "errors": errors[:5],
            "rss_mb_after_warmup": {w: _mb(v) for w, v in rss_warm.items()},
            "rss_mb_end": {w: _mb(v) for w, v in rss_end.items()},
            "rss_growth_mb": growth, "rss_mb_every_100": trend, "seconds": seconds}


def _rss_settled(sc: SoakCluster) -> dict[str, int]:
    """VmRSS of every process once the service is idle (the offline phase of the next
    session done), so that two readings compare the same state."""
    time.sleep(1.5)
    return {str(w): rss_kb(sc.pid(w)) for w in ("dealer", 0, 1)}


def run_concurrent(sc: SoakCluster, ref: Reference, cfg: SoakConfig,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    from mpcvit.party.client import ClientError

    n_images = min(len(ref), cfg.clients * cfg.per_client)
    got: dict[int, list[tuple[int, np.ndarray | None, str]]] = {}
    gate = threading.Barrier(cfg.clients)

    def client_loop(k: int) -> None:
        out = got.setdefault(k, [])
        with sc.client(cfg.request_timeout) as client:
            gate.wait()
            for j in range(cfg.per_client):
                idx = (k * cfg.per_client + j) % n_images
                try:
                    out.append((idx, client.infer(ref.images[idx], preprocessed=True).logits,
                                ""))
                except ClientError as exc:
                    out.append((idx, None, str(exc)[:200]))

    tic = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failures = crossed = 0
    errors, mismatches = [], []
    used = ref.logits[:n_images]
    for rows in got.values():
        for idx, logits, error in rows:
            if logits is None:
                failures += 1
                errors.append(error)
                continue
            agree, err = _check(ref, idx, logits)
            if not agree:
                mismatches.append(_mismatch(ref, idx, logits))
            if err > cfg.atol:
                others = np.abs(used - logits).max(axis=1)
                others[idx] = np.inf
                crossed += bool((others <= cfg.atol).any())
    seconds = time.perf_counter() - tic
    progress(f"concurrent {cfg.clients} x {cfg.per_client}: {failures} failures, "
             f"{len(mismatches)} mismatches, {crossed} crossed, {seconds:.0f} s")
    return {"requests": cfg.clients * cfg.per_client, "failures": failures,
            "mismatches": len(mismatches), "mismatch_details": mismatches,
            "crossed": crossed, "errors": errors[:5],
            "seconds": seconds}


# ----------------------------------------------------------------------------- kills
def _infer_once(sc: SoakCluster, image: np.ndarray, timeout: float) -> str:
    """One request with a fresh client (a fresh connection); "" on success, else why."""
    from mpcvit.party.client import ClientError

    try:
        with sc.client(timeout) as client:
            client.infer(image, preprocessed=True)
        return ""
    except ClientError as exc:
        return str(exc) or type(exc).__name__


def _first_success(sc: SoakCluster, image: np.ndarray, since: float) -> float | None:
    """Seconds from ``since`` until a request succeeds (None: not within the bound)."""
    while time.monotonic() - since < _DEADLINE_S:
        if not _infer_once(sc, image, 30.0):
            return time.monotonic() - since
        time.sleep(0.05)
    return None


def _first_error(sc: SoakCluster, image: np.ndarray, since: float,
                 in_flight: dict[str, Any]) -> tuple[float | None, str]:
    """Seconds from ``since`` (the kill) until a client sees an error, and the error."""
    for worker in in_flight.get("threads", []):
        worker.join(_DEADLINE_S)
    if in_flight.get("error"):
        return max(0.0, in_flight["at"] - since), in_flight["error"]
    while time.monotonic() - since < _DEADLINE_S:
        error = _infer_once(sc, image, 30.0)
        if error:
            return time.monotonic() - since, error
    return None, ""


def _start_requests(sc: SoakCluster, image: np.ndarray, count: int) -> dict[str, Any]:
    """``count`` concurrent requests in the background; the first error and its time."""
    state: dict[str, Any] = {}

    def one() -> None:
        error = _infer_once(sc, image, 60.0)
        if error and "error" not in state:
            state["at"], state["error"] = time.monotonic(), error

    state["threads"] = [threading.Thread(target=one) for _ in range(count)]
    for t in state["threads"]:
        t.start()
    return state


def kill_round(sc: SoakCluster, who: Any, phase: str, image: np.ndarray,
               rng: random.Random) -> dict[str, Any]:
    """Kill ``who`` at ``phase`` of a request, restart it, time the error and recovery."""
    sc.wait_ready()
    _first_success(sc, image, time.monotonic())  # warm, and prepared sessions refilled
    time.sleep(0.3)
    tail = sc.log(0)
    in_flight: dict[str, Any] = {}
    reached = phase
    if phase != "idle":
        # Two requests make party 0 busy, so the second fetches its randomness in bulk.
        in_flight = _start_requests(sc, image, 2 if phase == "fetch" else 1)
        if phase == "pairing":
            time.sleep(rng.uniform(0.0, 0.01))
        elif not tail.wait_for(_PHASE_EVENT[phase], 30.0):
            reached = "late"
        if phase == "online":
            time.sleep(rng.uniform(0.0, 0.2))
    killed = time.monotonic()
    sc.cluster.kill(who)
    error_s, error = _first_error(sc, image, killed, in_flight)
    up = _ProcessUp(sc.log(who))
    restarted = time.monotonic()
    sc.cluster.restart(who)
    recover_s = _first_success(sc, image, restarted)
    startup_s = up.seconds_since(restarted)
    rejoin_s = (recover_s - startup_s if recover_s is not None and startup_s is not None
                else None)
    return {"who": str(who), "phase": reached, "error_s": error_s, "error": error[:160],
            "recover_s": recover_s, "startup_s": startup_s, "rejoin_s": rejoin_s}


class _ProcessUp:
    """When a restarted process writes its first log line: its start-up (imports, TLS,
    listening) is over, and what follows until a request succeeds is the service's own
    recovery (the survivor pairing again, the weights shared again)."""

    def __init__(self, tail: LogTail) -> None:
        self.at: float | None = None
        self._thread = threading.Thread(target=self._watch, args=(tail,), daemon=True)
        self._thread.start()

    def _watch(self, tail: LogTail) -> None:
        if tail.wait_for("\n", _DEADLINE_S):
            self.at = time.monotonic()

    def seconds_since(self, since: float) -> float | None:
        self._thread.join(_DEADLINE_S)
        return None if self.at is None else max(0.0, self.at - since)


def run_kills(sc: SoakCluster, ref: Reference, who: Any, count: int, phases: tuple[str, ...],
              rng: random.Random, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    order = [phases[i % len(phases)] for i in range(count)]
    rng.shuffle(order)
    rounds = []
    for i, phase in enumerate(order):
        try:
            row = kill_round(sc, who, phase, ref.images[i % len(ref)], rng)
        except (TimeoutError, RuntimeError) as exc:  # the cluster did not come back
            row = {"who": str(who), "phase": phase, "error_s": None, "recover_s": None,
                   "startup_s": None, "rejoin_s": None,
                   "error": f"not ready before the kill: {str(exc)[:120]}"}
            sc.cluster.restart(who)
        rounds.append(row)
        progress(f"kill {who} #{i + 1}/{count} at {row['phase']}: error after "
                 f"{_fmt(row['error_s'])} ({row['error'][:70]}), recovered "
                 f"{_fmt(row['recover_s'])} after restart (process up after "
                 f"{_fmt(row['startup_s'])}, serving {_fmt(row['rejoin_s'])} later)")
    return rounds


def _fmt(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f} s"


# ----------------------------------------------------------------------------- hostile
def _raw_request(rid: str, nbytes: int = 28 * 28 * 8, inputs: int = 1,
                 shape: Sequence[int] = (1, 28, 28)) -> inference_pb2.InferRequest:
    from mpcvit.proto.generated import inference_pb2

    return inference_pb2.InferRequest(inputs=[
        inference_pb2.InputShare(request_id=f"{rid}-{i}" if inputs > 1 else rid,
                                 shape=list(shape), share=os.urandom(nbytes))
        for i in range(inputs)])


def _code(call: Callable[[], Any]) -> str:
    import grpc

    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def _garbage_on_port(address: str, nbytes: int = 4096) -> None:
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 5) as s:
        s.sendall(os.urandom(nbytes))
        s.settimeout(2)
        with contextlib.suppress(OSError):
            s.recv(1024)


def _one_sided_next_to_a_valid_request(sc: SoakCluster, ref: Reference) -> dict[str, Any]:
    p0, p1 = sc.stub(0), sc.stub(1)
    tag = uuid.uuid4().hex[:8]
    halves = [p0.Infer.future(_raw_request(f"lonely0-{tag}-{i}"), timeout=60) for i in range(4)]
    halves += [p1.Infer.future(_raw_request(f"lonely1-{tag}-{i}"), timeout=60) for i in range(4)]
    halves += [p0.Infer.future(_raw_request(f"id-a-{tag}"), timeout=60),
               p1.Infer.future(_raw_request(f"id-b-{tag}"), timeout=60)]
    with sc.client(60) as client:
        client.infer(ref.images[0], preprocessed=True)
        overtaken = sum(not f.done() for f in halves)
    codes = [_code(f.result) for f in halves]
    return {"halves": len(halves), "still_waiting_when_valid_done": overtaken,
            "codes": sorted(set(codes)),
            "unexpected": (overtaken != len(halves))
            + sum(c != "DEADLINE_EXCEEDED" for c in codes)}


def _flood(sc: SoakCluster, ref: Reference, calls: int = 300) -> dict[str, Any]:
    """Hundreds of one-sided calls at once: those over the limits are refused at once,
    and once the flood is gone a valid request is served."""
    p0 = sc.stub(0)
    tag = uuid.uuid4().hex[:8]
    flood = [p0.Infer.future(_raw_request(f"flood-{tag}-{i}"), timeout=60) for i in range(calls)]
    time.sleep(1.0)
    refused = sum(f.done() and _code(f.result) == "RESOURCE_EXHAUSTED" for f in flood)
    for f in flood:
        f.cancel()
    ok = not _infer_once(sc, ref.images[1], 60.0)
    return {"calls": calls, "refused_at_once": refused, "valid_after_flood": ok,
            "unexpected": (refused == 0) + (not ok)}


def run_hostile(sc: SoakCluster, ref: Reference,
                progress: Callable[[str], None]) -> dict[str, Any]:
    """Hostile inputs (no credentials beyond a client certificate)."""
    from mpcvit.proto.generated import inference_pb2

    p0 = sc.stub(0)
    out: dict[str, Any] = {"one_sided": _one_sided_next_to_a_valid_request(sc, ref)}
    expected = {
        "oversize_share": ("RESOURCE_EXHAUSTED",
                           lambda: p0.Infer(_raw_request("big", nbytes=5 << 20), timeout=10)),
        "too_many_inputs": ("RESOURCE_EXHAUSTED",
                            lambda: p0.Infer(_raw_request("many", inputs=65), timeout=10)),
        "share_not_int64": ("INVALID_ARGUMENT",
                            lambda: p0.Infer(_raw_request("odd", nbytes=28 * 28 * 8 + 3),
                                             timeout=10)),
        "wrong_shape": ("INVALID_ARGUMENT",
                        lambda: p0.Infer(_raw_request("shape", shape=(1, 27, 28)), timeout=10)),
        "bad_request_id": ("INVALID_ARGUMENT",
                           lambda: p0.Infer(_raw_request("no spaces allowed"), timeout=10)),
        "unknown_model": ("NOT_FOUND", lambda: p0.Infer(inference_pb2.InferRequest(
            model="resnet", inputs=_raw_request("m").inputs), timeout=10)),
        "garbage_protobuf": (None, lambda: _garbage_call(sc)),
    }
    for name, (want, call) in expected.items():
        code = _code(call)
        bad = code == "OK" or (want is not None and code != want)
        out[name] = {"code": code, "unexpected": int(bad)}
    for who in (0, 1, "dealer"):
        _garbage_on_port(sc.cluster.address(who))
    out["flood"] = _flood(sc, ref)
    out["parties_alive"] = sc.alive()
    unexpected = sum(v["unexpected"] for v in out.values() if isinstance(v, dict))
    unexpected += not out["parties_alive"]
    out["unexpected"] = unexpected
    codes = ", ".join(f"{k}={v['code']}" for k, v in out.items()
                      if isinstance(v, dict) and "code" in v)
    progress(f"hostile inputs: {unexpected} unexpected outcomes ({codes})")
    return out


def _garbage_call(sc: SoakCluster) -> Any:
    """Random bytes where an InferRequest should be (not a protobuf)."""
    with sc.channel(0) as channel:
        call = channel.unary_unary("/mpcvit.v1.InferenceService/Infer")
        return call(os.urandom(512), timeout=10)


# ------------------------------------------------------------------------ role probes
def _refused(call: Callable[[], Any]) -> bool:
    return _code(call) in ("UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED")


def _ca_probes(sc: SoakCluster) -> list[bool]:
    """A certificate from another CA, no client certificate, plaintext: at both parties
    and the dealer.  True for each connection that was accepted."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from mpcvit.mpc.config import TlsConfig

    good, rogue = sc.pki["client"], sc.rogue["client"]
    wrong_ca = TlsConfig(ca=good.ca, cert=rogue.cert, key=rogue.key)
    accepted = []
    for who in (0, 1, "dealer"):
        address = sc.cluster.address(who)
        for channel in (grpc.secure_channel(address, wrong_ca.channel_credentials()),
                        grpc.secure_channel(address, grpc.ssl_channel_credentials(
                            Path(good.ca).read_bytes())),
                        grpc.insecure_channel(address)):
            with channel:
                stub = health_pb2_grpc.HealthStub(channel)
                accepted.append(not _refused(lambda s=stub: s.Check(
                    health_pb2.HealthCheckRequest(), timeout=5)))
    return accepted


def _peer_stream_accepted(sc: SoakCluster, node: str, claim: int) -> bool:
    """Whether party 0 lets ``node``'s certificate open the peer channel as party
    ``claim`` (only party 1's may)."""
    from mpcvit.proto.generated import peer_pb2, peer_pb2_grpc

    hello = peer_pb2.PeerFrame(kind=peer_pb2.PeerFrame.Kind.HELLO, src=claim,
                               cluster="mpcvit", incarnation=uuid.uuid4().hex)

    def frames() -> Iterator[peer_pb2.PeerFrame]:
        yield hello
        time.sleep(0.5)

    with sc.channel(0, node) as channel:
        return not _refused(lambda: peer_pb2_grpc.PeerServiceStub(channel).Stream(
            frames(), timeout=5))


def _dealer_session_accepted(sc: SoakCluster, node: str, rank: int) -> bool:
    """Whether the dealer hands ``node``'s certificate the seed of ``rank``."""
    from mpcvit.proto.generated import dealer_pb2, dealer_pb2_grpc

    with sc.channel("dealer", node) as channel:
        return not _refused(lambda: dealer_pb2_grpc.DealerServiceStub(channel).OpenSession(
            dealer_pb2.OpenSessionRequest(session=f"probe-{uuid.uuid4().hex}", rank=rank,
                                          world_size=2), timeout=5))


def _infer_service_accepted(sc: SoakCluster, node: str) -> bool:
    """Whether party 0's InferenceService answers ``node``'s (non-client) certificate."""
    from mpcvit.proto.generated import inference_pb2

    return not _refused(lambda: sc.stub(0, node).GetModelInfo(
        inference_pb2.ModelInfoRequest(), timeout=5))


def hostile_role_probes(sc: SoakCluster) -> tuple[int, int]:
    """Connections mutual TLS with role checks must refuse: (attempts, accepted).

    Certificates of the right CA used by the wrong role (TLS itself accepts them, only
    the role check can refuse): a client or the dealer opening the peer channel, a
    client or party 1 asking the dealer for a seed that is not theirs, a party or the
    dealer calling the InferenceService; plus a certificate from another CA, no client
    certificate and plaintext at both parties and the dealer.
    """
    accepted = _ca_probes(sc)
    accepted += [
        _peer_stream_accepted(sc, "client", 1),     # a client posing as party 1
        _peer_stream_accepted(sc, "dealer", 1),     # the dealer posing as party 1
        _dealer_session_accepted(sc, "client", 0),  # a client asking for a party's seed
        _dealer_session_accepted(sc, "client", 1),
        _dealer_session_accepted(sc, "party1", 0),  # party 1 asking for party 0's seed
        _infer_service_accepted(sc, "party1"),      # a party sending images
        _infer_service_accepted(sc, "dealer"),
    ]
    return len(accepted), sum(accepted)


# ----------------------------------------------------------------------------- driver
def soak(cfg: SoakConfig, progress: Callable[[str], None] = print,
         workdir: str | Path | None = None) -> dict[str, Any]:
    """Run every phase against a fresh TLS cluster; return the figures (see module doc)."""
    from mpcvit.models.checkpoint import resolve_checkpoint

    checkpoint = str(resolve_checkpoint(cfg.model))
    rng = random.Random(cfg.seed)
    ref = Reference(checkpoint, cfg.data, max(cfg.sequential, cfg.clients * cfg.per_client))
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="mpcvit-soak-")))
        sc = SoakCluster(root, checkpoint)
        sc.cluster.start()
        stack.callback(sc.cluster.stop)
        sc.wait_ready()
        progress(f"cluster up (mutual TLS, model {checkpoint}, logs in {root / 'cluster'})")
        tic = time.perf_counter()
        partial: dict[str, Any] = {}

        def keep(name: str, value: Any) -> Any:
            """Write each phase's figures to the work directory as they come."""
            partial[name] = value
            (root / "soak.json").write_text(json.dumps(partial, indent=1, default=str))
            return value

        seq = keep("sequential", run_sequential(sc, ref, cfg, progress))
        conc = keep("concurrent", run_concurrent(sc, ref, cfg, progress))
        hostile = keep("hostile", run_hostile(sc, ref, progress))
        kills = run_kills(sc, ref, 1, cfg.party_kills, PARTY_PHASES, rng, progress)
        kills += run_kills(sc, ref, "dealer", cfg.dealer_kills, DEALER_PHASES, rng, progress)
        keep("kills", kills)
        sc.wait_ready()
        attempts, accepted = hostile_role_probes(sc)
        progress(f"role probes: {accepted} of {attempts} accepted")
        seconds = time.perf_counter() - tic
    errors = [k["error_s"] for k in kills if k["error_s"] is not None]
    recovers = [k["recover_s"] for k in kills if k["recover_s"] is not None]
    startups = [k["startup_s"] for k in kills if k.get("startup_s") is not None]
    rejoins = [k["rejoin_s"] for k in kills if k.get("rejoin_s") is not None]
    summary = {
        "requests": seq["requests"] + conc["requests"],
        "failures": seq["failures"] + conc["failures"],
        "mismatches": seq["mismatches"] + conc["mismatches"],
        # argmax disagreements that are not near ties of the plaintext logits (see
        # _mismatch): a wrong result, where a near tie is fixed-point rounding
        "mismatches_beyond_error": sum(not m["near_tie"] for m in seq["mismatch_details"]
                                       + conc["mismatch_details"]),
        "crossed": conc["crossed"],
        "rss_growth_mb": round(max(seq["rss_growth_mb"].values()), 1),
        "kills": len(kills),
        "recovered": len(recovers),
        "max_error_s": round(max(errors), 2) if len(errors) == len(kills) and errors else None,
        "max_recover_s": round(max(recovers), 2) if recovers else None,
        # max_recover_s split: the restarted process's own start-up (mostly importing
        # torch, which grows with the machine's load) and the service's recovery after it
        "max_startup_s": round(max(startups), 2) if startups else None,
        "max_rejoin_s": round(max(rejoins), 2) if rejoins else None,
        "unauthorized_accepted": accepted,
        "hostile_unexpected": hostile["unexpected"],
        "role_probes": attempts,
        "seconds": round(seconds, 1),
    }
    return {"summary": summary, "sequential": seq, "concurrent": conc, "hostile": hostile,
            "kills": kills}

