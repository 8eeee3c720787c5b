"""Two pairs and their dealers, started as the rendered deploy/k8s overlays say.

``kubectl kustomize deploy/k8s/overlays/<role>`` for party0, party1 and dealer; replica
ordinals 0 and 1 of each StatefulSet run as local processes with the container's
command, args and env, the ConfigMap's config file and the Secret's certificates (mutual
TLS), cluster DNS names mapped to 127.0.0.1 ports (tests/k8s_local.py).  Then a client's
:class:`PairPool` spreads requests over both pairs; killing one pair's party moves the
requests to the other pair, and health and metrics say so.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from k8s_local import ManifestCluster
from mpcvit.party.client import ClientError, ClientTls
from mpcvit.party.pool import PairPool
from prometheus_client.parser import text_string_to_metric_families
from test_k8s import kubectl_or_skip

PAIRS = 2


def scrape(cluster: ManifestCluster, role: str, k: int) -> dict[tuple[str, tuple], float]:
    port = cluster.replicas[role, k].ports["metrics"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def infer_ok(page: dict) -> float:
    return page.get(("mpcvit_requests_total", (("method", "Infer"), ("status", "OK"))), 0.0)


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    kubectl_or_skip()
    c = ManifestCluster(tmp_path_factory.mktemp("k8s-pairs"), pairs=PAIRS)
    c.start()
    try:
        c.wait_ready(600)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def pool(cluster):
    tls = ClientTls(str(cluster.certs / "ca.pem"), str(cluster.certs / "client.pem"),
                    str(cluster.certs / "client.key"))
    pairs = [cluster.pair_addresses(k) for k in range(PAIRS)]
    with PairPool(pairs, tls=tls, timeout=300, recheck=2.0) as p:
        p.wait_ready(120)
        yield p


@pytest.mark.slow
def test_every_process_serves_health_and_metrics(cluster) -> None:
    for (role, k), replica in cluster.replicas.items():
        assert cluster.probe(role, k) == "SERVING", role
        assert cluster.probe(role, k, "liveness") == "SERVING", role
        page = scrape(cluster, role, k)
        assert page[("mpcvit_info", (("role", role),))] == 1
        if role.startswith("party"):
            assert page[("mpcvit_ready", ())] == 1
            # The mutual-TLS port answers health to a client certificate too.
            assert cluster.health_tls_status(replica.address()) == "SERVING"


@pytest.mark.slow
def test_requests_spread_over_both_pairs(cluster, pool) -> None:
    before = {(r, k): infer_ok(scrape(cluster, r, k)) for r in ("party0", "party1")
              for k in range(PAIRS)}
    with ThreadPoolExecutor(4) as workers:
        predictions = list(workers.map(lambda x: pool.infer(x), images(20)))
    served = Counter(p.pair for p in predictions)
    assert sum(served.values()) == 20 and set(served) == set(range(PAIRS)), served
    assert all(p.logits.shape == (10,) for p in predictions)
    # Both parties of a pair ran each of its requests; the sessions are the pair's own.
    for k in range(PAIRS):
        for rank in (0, 1):
            after = infer_ok(scrape(cluster, f"party{rank}", k))
            assert after - before[f"party{rank}", k] == served[k], (rank, k)


@pytest.mark.slow
def test_killing_a_party_moves_new_requests_to_the_other_pair(cluster, pool) -> None:
    victim, survivor = ("party1", 1), ("party0", 1)
    healthy_before = [infer_ok(scrape(cluster, f"party{r}", 0)) for r in (0, 1)]
    results: list[tuple[float, float, int | None, str]] = []  # start, end, pair, error
    lock = threading.Lock()
    stop = threading.Event()
    killed_at: list[float] = []
    xs = images(8)

    def load(worker: int) -> None:
        i = worker
        while not stop.is_set():
            start = time.monotonic()
            try:
                pair, error = pool.infer(xs[i % len(xs)]).pair, ""
            except ClientError as exc:
                pair, error = None, f"{type(exc).__name__}: {exc}"
            with lock:
                results.append((start, time.monotonic(), pair, error))
            i += 2

    threads = [threading.Thread(target=load, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(results) >= 4, 300)
        cluster.kill(*victim)
        killed_at.append(time.monotonic())
        # The survivor of the broken pair goes NOT_SERVING (readiness) but stays alive.
        assert wait_for(lambda: cluster.probe(*survivor) == "NOT_SERVING"), \
            cluster.logs(*survivor)
        survivor_ok = infer_ok(scrape(cluster, *survivor))
        assert wait_for(lambda: sum(r[0] > killed_at[0] for r in results) >= 8, 300)
    finally:
        stop.set()
        for t in threads:
            t.join(600)
    after_kill = [r for r in results if r[0] > killed_at[0]]
    assert after_kill and all(not r[3] and r[2] == 0 for r in after_kill), after_kill
    # Only requests already sent to the killed pair may have failed.
    assert all(r[2] is None and r[0] <= killed_at[0] for r in results if r[3]), results

    # The survivor still says NOT_SERVING, its metrics too, and it served nothing while
    # the requests went on.
    assert cluster.probe(*survivor) == "NOT_SERVING"
    assert cluster.probe(*survivor, "mpcvit.v1.InferenceService") == "NOT_SERVING"
    assert cluster.probe(*survivor, "liveness") == "SERVING"
    page = scrape(cluster, *survivor)
    assert page[("mpcvit_ready", ())] == 0
    assert infer_ok(page) == survivor_ok
    # The healthy pair's Infer counters rose by what it served in this run.
    served0 = sum(1 for r in results if r[2] == 0)
    for rank in (0, 1):
        assert infer_ok(scrape(cluster, f"party{rank}", 0)) - healthy_before[rank] == served0
    assert cluster.probe("party0", 0) == cluster.probe("party1", 0) == "SERVING"
    down = {p["index"]: p["down"] for p in pool.pairs()}
    assert down[1], "the pool marked the broken pair down"


@pytest.mark.slow
def test_infer_cli_spreads_over_the_serving_pairs(cluster) -> None:
    """`mpcvit infer --pairs` over both pairs: every image is classified, each by a pair
    whose parties are SERVING (after the previous test, pair 0 only)."""
    import os
    import re
    import subprocess
    import sys

    serving = {k for k in range(PAIRS)
               if cluster.probe("party0", k) == cluster.probe("party1", k) == "SERVING"}
    pairs = ";".join(",".join(cluster.pair_addresses(k)) for k in range(PAIRS))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MPCVIT_")},
           "MPCVIT_TLS_DIR": str(cluster.certs)}
    proc = subprocess.run([sys.executable, "-m", "mpcvit.commands", "infer", "--pairs", pairs,
                           "fashion-mnist:test:0-3"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    used = [int(k) for k in re.findall(r", pair (\d+)$", proc.stdout, flags=re.M)]
    assert len(used) == 4 and set(used) <= serving and serving, (proc.stdout, serving)
    assert "accuracy" in proc.stdout and "served" in proc.stderr
