"""FSS comparisons (mpc/protocols/fss.py): the dealer's key kind without a network, the
protocol plan, and (slow) the gates between real party processes.

The secure functions built on them are checked against plaintext, with their round
counts, in tests/test_secure_model.py (the ``fss`` plan next to the default one).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mpcvit.mpc.compat import import_crypten

import_crypten()
from mpcvit.models.plan import ModelPlan  # noqa: E402
from mpcvit.mpc.dealer import DealerState  # noqa: E402
from mpcvit.mpc.protocols import dcf, fss  # noqa: E402
from mpcvit.mpc.protocols.plan import PLANS, VARIANTS, ProtocolPlan  # noqa: E402
from mpcvit.proto.generated import dealer_pb2  # noqa: E402

U64 = np.uint64


def _open(state: DealerState, session: str, world: int = 2) -> None:
    for rank in range(world):
        state.open(session, rank, world)


def _gate_msg(session: str, n: int, seq: int, rank: int, degree: int = 1, bits: int = 32,
              shift: int = 0) -> dealer_pb2.CorrectionRequest:
    req = fss.gate_request(n, degree, bits, shift)
    return dealer_pb2.CorrectionRequest(session=session, kind=req.kind, size0=list(req.size0),
                                        op_kwargs_json=req.kwargs_json, seq=seq, rank=rank)


def _keys(state: DealerState, session: str, n: int, seq: int, **kw):
    """Both parties' (mask share, key) of request ``seq``, as each would fetch it."""
    out = []
    for rank in (0, 1):
        blob = state.correction(_gate_msg(session, n, seq, rank, **kw))
        out.append(fss.parse_key(blob, rank, fss.gate_request(n, kw.get("degree", 1),
                                                                kw.get("bits", 32),
                                                                kw.get("shift", 0))))
    return out


def _relu_of(keys, x: np.ndarray) -> np.ndarray:
    """relu(x) reconstructed from both keys, as the parties compute it after opening."""
    (m0, k0), (m1, k1) = keys
    y = x.view(U64) + m0.numpy().view(U64) + m1.numpy().view(U64)
    shares = [dcf.threshold_eval(r, k, y, [0]) for r, k in ((0, k0), (1, k1))]
    ind0, ind1 = shares[0] + shares[1]
    return (y * ind0[0] - ind1[0]).view(np.int64)


X = np.array([0, 1, -1, 2, -2, 5, -5, 2**20, -(2**20), 2**31 - 1, -(2**31), 12345, -12345],
             dtype=np.int64)


def test_dealer_keys_give_exact_gates_to_the_two_parties():
    state = DealerState()
    _open(state, "s")
    keys = _keys(state, "s", X.size, seq=0)
    assert np.array_equal(_relu_of(keys, X), np.maximum(X, 0))
    # each rank got its own half: the masks are shares of one r, the keys differ
    (m0, k0), (m1, k1) = keys
    assert k0.party == 0 and k1.party == 1
    assert not torch.equal(m0, m1)


def test_keys_are_a_function_of_the_session_secret_and_the_request_index():
    req = fss.gate_request(7, 1, 32)
    kind = fss.FssGate()
    a, b = DealerState(), DealerState()
    for st in (a, b):
        _open(st, "s")
    secret = a._sessions["s"].secret
    b._sessions["s"].secret = secret  # same secret: same keys, whoever asks first
    first = kind.keyed_share(b, "s", secret, 4, 1, req)
    assert torch.equal(kind.keyed_share(a, "s", secret, 4, 1, req), first)
    assert not torch.equal(kind.keyed_share(a, "s", secret, 5, 1, req), first)
    c = DealerState()
    _open(c, "s")  # another session secret
    assert not torch.equal(kind.keyed_share(c, "s", c._sessions["s"].secret, 4, 1, req), first)
    # pure function of the material: the blobs repeat exactly
    assert all(np.array_equal(p, q) for p, q in zip(fss.make_keys(b"m", 5, 0, 24, 0),
                                                    fss.make_keys(b"m", 5, 0, 24, 0),
                                                    strict=True))


def test_party_one_fetches_only_its_own_keys_once():
    state = DealerState()
    _open(state, "s")
    # party 1 may ask first, for any index, without disturbing party 0's sequence
    state.correction(_gate_msg("s", 4, seq=9, rank=1))
    with pytest.raises(PermissionError, match="already handed out"):
        state.correction(_gate_msg("s", 4, seq=9, rank=1))
    square = dealer_pb2.CorrectionRequest(session="s", kind="square", size0=[2], seq=0, rank=1)
    with pytest.raises(PermissionError, match="only party 0"):
        state.correction(square)
    with pytest.raises(ValueError, match="rank 2"):
        state.correction(_gate_msg("s", 4, seq=0, rank=2))
    square.rank = 0
    state.correction(square)  # party 0's stream is still at request 0
    state.correction(_gate_msg("s", 4, seq=1, rank=0))
    with pytest.raises(ValueError, match="out of order"):
        state.correction(_gate_msg("s", 4, seq=7, rank=0))
    for opts in ({"degree": 3}, {"bits": 65}, {"bits": 32, "shift": 40}):
        with pytest.raises(ValueError, match="bad FSS gate"):
            state.correction(_gate_msg("s", 4, seq=2, rank=0, **opts))
    bad = _gate_msg("s", 4, seq=2, rank=0)
    bad.op_kwargs_json = json.dumps({"degree": 1})
    with pytest.raises(ValueError, match="needs"):
        state.correction(bad)


def test_key_cache_is_bounded_regenerates_and_drops_closed_sessions():
    n = 64
    per_half = 8 * -(-fss.key_bytes(n, 1, 32) // 8)
    state = DealerState(keys=fss.KeyCache(max_bytes=3 * per_half))
    _open(state, "s")
    halves = [state.correction(_gate_msg("s", n, seq, 0)) for seq in range(6)]
    # party 0 took six keys; only three of party 1's halves fit, the oldest went first
    assert len(state.keys) == 3 and state.keys.held == 3 * per_half
    x = np.arange(-n // 2, n // 2, dtype=np.int64) * 997
    for seq in (0, 5):  # evicted (regenerated) and kept: both match party 0's half
        key1 = state.correction(_gate_msg("s", n, seq, 1))
        keys = [fss.parse_key(h, r, fss.gate_request(n, 1, 32))
                for r, h in ((0, halves[seq]), (1, key1))]
        assert np.array_equal(_relu_of(keys, x), np.maximum(x, 0))
    assert len(state.keys) == 2  # seq 5's half left the cache when handed out
    state.close("s", 0)
    assert len(state.keys) == 2  # party 1 has not closed yet
    state.close("s", 1)
    assert len(state.keys) == 0 and state.keys.held == 0
    # an idle session expires with its keys
    now = [0.0]
    state = DealerState(idle_ttl=10.0, clock=lambda: now[0])
    _open(state, "t")
    state.correction(_gate_msg("t", n, 0, 0))
    assert len(state.keys) == 1
    now[0] = 11.0
    _open(state, "u")
    assert len(state.keys) == 0


@pytest.mark.parametrize("degree,bits", [(0, 64), (1, 32), (1, 24), (2, 40)])
def test_key_bytes_are_what_the_dealer_sends(degree, bits):
    state = DealerState()
    _open(state, "s")
    n = 33
    blob = state.correction(_gate_msg("s", n, 0, 0, degree=degree, bits=bits))
    want = fss.key_bytes(n, degree, bits)
    assert want == n * (dcf.gate_key_bytes(degree, bits) + (8 if degree == 0 else 0))
    assert blob.numel() * 8 == want + (-want % 8)
    assert fss.FssGate().result_elements(fss.gate_request(n, degree, bits)) == blob.numel()


# ----------------------------------------------------------------------------- the plan


def test_protocol_plan_is_plain_validated_data():
    default = ProtocolPlan()
    assert default == PLANS["default"] and default.describe() == "default"
    assert all(getattr(default, block) == options[0] for block, options in VARIANTS.items())
    plan = ProtocolPlan.parse("comparison=fss,gelu=spline,fss_bits=28")
    assert plan.fss and plan.gelu == "spline" and plan.fss_bits == 28
    assert ProtocolPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert ProtocolPlan.from_dict(None) == ProtocolPlan.from_dict({}) == default
    assert ProtocolPlan.parse("fss").describe() == (
        "comparison=fss,gelu=spline,exp=spline,reciprocal=spline,rsqrt=spline")
    assert ProtocolPlan.variants()["gelu"] == ("poly", "spline")
    for bad in ({"gelu": "erf"}, {"fss_bits": 8}, {"fss_bits": True}, {"nope": 1}):
        with pytest.raises(ValueError, match="protocol plan"):
            ProtocolPlan.from_dict(bad)
    with pytest.raises(ValueError, match="protocol plan"):
        ProtocolPlan.parse("fast")


def test_the_model_carries_its_plan_to_every_secure_block():
    from mpcvit.models.configs import CONFIGS
    from mpcvit.models.secure import prepare_for_mpc
    from mpcvit.models.vit import ViT

    model = ViT(CONFIGS["demo"], protocol=PLANS["fss"])
    carriers = [m for m in prepare_for_mpc(model).modules() if hasattr(m, "plan_block")]
    assert len(carriers) >= 3 * CONFIGS["demo"].depth
    assert all(m.protocol == PLANS["fss"] for m in carriers)
    x = torch.randn(1, 1, 28, 28)
    plain = ViT(CONFIGS["demo"])
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():  # plaintext outputs do not depend on the plan
        assert torch.equal(model(x), plain(x))


def test_model_facts_carry_the_plan_to_party_one():
    from mpcvit.models.configs import CONFIGS
    from mpcvit.models.vit import ViT
    from mpcvit.party.backend import ModelFacts, describe_model

    plan = ProtocolPlan.parse("comparison=fss,exp=spline")
    facts = describe_model(ViT(CONFIGS["demo"], protocol=plan), "demo", None)
    received = ModelFacts.from_dict(json.loads(json.dumps(facts.to_dict())))
    assert ModelPlan.from_dict(received.protocol) == ModelPlan.uniform(plan)
    assert ModelFacts.from_dict(describe_model(ViT(CONFIGS["demo"]), "d", None)
                                .to_dict()).protocol == ModelPlan().to_dict() == {}
    bad = facts.to_dict() | {"protocol": {"gelu": "erf"}}
    with pytest.raises(ValueError, match="malformed"):
        ModelFacts.from_dict(bad)


# ----------------------------------------------------------------------------- two parties

EDGE_VALUES = [0, 1, -1, 2, -2, 2**62, -(2**62), 2**63 - 1, -(2**63), 2**63 - 2,
               -(2**63) + 1, 12345, -12345, 2**31, -(2**31), 2**16, -(2**16)]
WINDOW_VALUES = [0, 1, -1, 2, -2, 2**31 - 1, -(2**31), 2**31 - 2, -(2**31) + 1, 2**30,
                 -(2**30), 2**16, -(2**16)]
RING = (-(2**63), 2**63 - 1)


def _unsigned_less(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    top = -(2**63)
    return (a ^ top) < (b ^ top)


def _gates_party(many: int) -> dict:
    """The FSS sign (64-bit keys) and ReLU (32-bit keys) on raw ring values, each value
    split into shares at random, as (0, x) and as (x, 0); then ``many`` random values of
    the 32-bit window through the sign, in chunks."""
    from crypten.mpc import MPCTensor
    from mpcvit.mpc.protocols import fused

    crypten = import_crypten()
    comm = crypten.communicator.get()
    rank = comm.get_rank()
    g = torch.Generator().manual_seed(11)

    def shared(values: torch.Tensor) -> MPCTensor:
        a = torch.randint(*RING, values.shape, generator=g)
        e = len(EDGE_VALUES)
        a[:e] = 0
        a[e: 2 * e] = values[e: 2 * e]
        return MPCTensor.from_shares(a if rank == 0 else values - a, precision=0)

    def one_round(part, values):
        comm.reset_communication_stats()
        opens, finish = part
        vals, _ = fused.open_round(opens)
        result = finish(vals)
        stats = comm.get_communication_stats()
        return {"got": result.reveal(), "rounds": stats["rounds"], "bytes": stats["bytes"],
                # x + r wrapped the ring (as unsigned words) for these elements
                "wrapped": int(_unsigned_less(vals[0], values).sum())}

    full = torch.cat([torch.tensor(EDGE_VALUES * 3, dtype=torch.long),
                      torch.randint(*RING, (64,), generator=g)])
    window = torch.cat([torch.tensor(WINDOW_VALUES * 3 + [0] * 12, dtype=torch.long),
                        torch.randint(-(2**31), 2**31, (64,), generator=g)])
    out = {"full": full, "window": window,
           "sign": one_round(fss.sign_part(shared(full)), full),
           "relu": one_round(fss.relu_part(shared(window), 32), window)}
    wrong, wrapped, chunk = 0, 0, 1 << 17
    for start in range(0, many, chunk):
        values = torch.randint(-(2**31), 2**31, (min(chunk, many - start),), generator=g)
        res = one_round(fss.sign_part(shared(values), 32), values)
        wrong += int((res["got"] != (values < 0).long()).sum())
        wrapped += res["wrapped"]
    out["many"] = {"wrong": wrong, "wrapped": wrapped}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("provider,many", [("dealer", 10**6), ("tfp", 0)])
def test_fss_gates_are_exact_through_two_parties(provider, many):
    from mpcvit.mpc.launcher import run_parties

    res = run_parties(_gates_party, many, provider=provider, timeout=1200)[0]
    full, window = res["full"], res["window"]
    assert torch.equal(res["sign"]["got"], (full < 0).long())
    assert torch.equal(res["relu"]["got"], full.new_zeros(()).maximum(window))
    for name, values in (("sign", full), ("relu", window)):
        # one opening of one word per element each way (CrypTen counts both directions)
        assert res[name]["rounds"] == 1
        assert res[name]["bytes"] == 2 * 8 * values.numel()
        # the random masks made x + r wrap for some elements and not for others
        assert 0 < res[name]["wrapped"] < values.numel()
    if many:
        assert res["many"]["wrong"] == 0
        assert 0.4 * many < res["many"]["wrapped"] < 0.6 * many


def _offline_party(n: int) -> dict:
    """A program of one square and one FSS ReLU: prepared offline, then run online."""
    from mpcvit.models import ops
    from mpcvit.models.profiler import open_dealer, prepare_offline, record_trace
    from mpcvit.models.secure import reveal_float

    crypten = import_crypten()
    plan = PLANS["fss"]
    x = torch.linspace(-50, 50, n)
    ex = crypten.cryptensor(x, src=0)
    provider = open_dealer()

    def program():
        return ops.relu(ex.square() - 100.0, plan)

    online = provider.stats()["bytes"]
    trace = record_trace(provider, program)
    online = provider.stats()["bytes"] - online
    prepare_offline(provider, trace)
    before = provider.stats()
    got = reveal_float(program())
    after = provider.stats()
    return {"trace": [r.kind for r in trace], "online_bytes": online,
            "offline_bytes": before["offline_bytes"], "bytes": before["bytes"],
            "online_requests": after["requests"] - before["requests"],
            "err": (got - torch.relu(x * x - 100)).abs().max().item()}


@pytest.mark.slow
def test_fss_keys_are_fetched_by_both_parties_and_reported_as_offline_bytes():
    from mpcvit.mpc.launcher import run_parties

    n = 1000
    r0, r1 = run_parties(_offline_party, n, provider="dealer", timeout=600)
    assert r0["trace"] == r1["trace"] == ["square", fss.KIND]
    key = 8 * -(-fss.key_bytes(n, 1, PLANS["fss"].fss_bits) // 8)
    # party 0 receives r² shares and its key, party 1 only its key: online as offline
    assert r0["offline_bytes"] == r0["bytes"] == r0["online_bytes"] == key + 8 * n
    assert r1["offline_bytes"] == r1["bytes"] == r1["online_bytes"] == key
    # prepared: no dealer call during the run, at either party
    assert r0["online_requests"] == r1["online_requests"] == 0
    assert r0["err"] < 1e-2 and r1["err"] < 1e-2
