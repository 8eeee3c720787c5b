"""PeerTransport over real gRPC on loopback (two transports in one process)."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from mpcvit.mpc.config import Timeouts
from mpcvit.mpc.errors import PeerAborted, PeerDisconnected, PeerTimeout, ProtocolViolation
from mpcvit.mpc.transport import PeerTransport
from mpcvit.proto.generated.peer_pb2 import PeerFrame


def _start(rank: int, chunk_bytes: int) -> tuple[PeerTransport, grpc.Server, int]:
    t = PeerTransport(rank, 2, timeouts=Timeouts(connect=10, recv=5), chunk_bytes=chunk_bytes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=t.server_options())
    t.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return t, server, port


@pytest.fixture()
def pair():
    t0, s0, p0 = _start(0, chunk_bytes=1024)
    t1, s1, p1 = _start(1, chunk_bytes=1024)
    peers = {0: f"127.0.0.1:{p0}", 1: f"127.0.0.1:{p1}"}
    t0._addresses = {1: peers[1]}
    t1._addresses = {0: peers[0]}
    # connect concurrently: each waits for the other's inbound stream
    with futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda t: t.ensure_connected(10), (t0, t1)))
    yield t0, t1, s0, s1, p1
    t0.close()
    t1.close()
    s0.stop(0)
    s1.stop(0)


def test_large_array_is_chunked_and_reassembled(pair):
    t0, t1, *_ = pair
    data = np.arange(10_000, dtype=np.int64).reshape(100, 100) * -7
    t0.send_array("s", 1, data)  # 80 kB in 1 kB chunks
    got = t1.recv("s", 0).tensor_array()
    assert got.shape == (100, 100) and got.dtype == np.int64
    assert np.array_equal(got, data)
    got.flags.writeable = True  # the array is writable (torch can use it in place)


def test_zero_dim_and_empty_arrays_keep_their_shape(pair):
    t0, t1, *_ = pair
    t0.send_array("s", 1, np.array(5, dtype=np.int64))
    t0.send_array("s", 1, np.zeros((0, 3), dtype=np.int64))
    assert t1.recv("s", 0).tensor_array().shape == ()
    assert t1.recv("s", 0).tensor_array().shape == (0, 3)


def test_sessions_never_cross(pair):
    t0, t1, *_ = pair
    for i in range(5):
        t0.send_array("A", 1, np.array([i], dtype=np.int64))
        t0.send_array("B", 1, np.array([100 + i], dtype=np.int64))
    # Session B is read first, then A: each sees only its own messages, in order.
    assert [int(t1.recv("B", 0).tensor_array()[0]) for _ in range(5)] == [100, 101, 102, 103, 104]
    assert [int(t1.recv("A", 0).tensor_array()[0]) for _ in range(5)] == [0, 1, 2, 3, 4]


def test_messages_of_a_closed_session_are_dropped(pair):
    t0, t1, *_ = pair
    t1.end_session("old")
    t0.send_array("old", 1, np.array([1], dtype=np.int64))
    t0.send_array("new", 1, np.array([2], dtype=np.int64))
    assert int(t1.recv("new", 0).tensor_array()[0]) == 2
    with pytest.raises(PeerTimeout):
        t1.recv("old", 0, timeout=0.5)


def test_recv_times_out_with_a_clear_error(pair):
    _, t1, *_ = pair
    with pytest.raises(PeerTimeout, match="party 0 sent nothing for session 'quiet'"):
        t1.recv("quiet", 0, timeout=0.3)


def test_control_messages_round_trip(pair):
    from mpcvit.proto.generated import peer_pb2

    t0, t1, *_ = pair
    msg = peer_pb2.Control(arrived=peer_pb2.Arrived(halves=[
        peer_pb2.Half(request_id="a", model="m", shape=[1, 28, 28]),
        peer_pb2.Half(request_id="b", model="m", shape=[1, 28, 28])]))
    t0.send_control(1, msg)
    assert t1.recv_control(0, timeout=5) == msg
    t0.send_bytes("__control__", 1, b"\xff\xff not a message", PeerFrame.Kind.CONTROL)
    with pytest.raises(ProtocolViolation, match="malformed control message"):
        t1.recv_control(0, timeout=5)


def test_control_wait_pinned_to_a_link_fails_once_the_peer_reconnects(pair):
    """A reply awaited on one link generation can never come from a restarted peer: the
    wait fails at once with PeerDisconnected (not after its timeout)."""
    t0, t1, *_ = pair
    generation, connected = t1.link_state(0)
    assert connected
    t0.close()  # party 0 drops its link and comes back (a new stream)
    t0.ensure_connected(10)
    assert t1.wait_for_peer(0, 10)
    with pytest.raises(PeerDisconnected):
        t1.recv_control(0, timeout=30, generation=generation)
    with pytest.raises(PeerDisconnected):
        t1.check_link({0: generation})
    t1.check_link({0: t1.link_state(0)[0]})  # the new link is fine


def test_kind_mismatch_is_a_protocol_violation(pair):
    t0, t1, *_ = pair
    t0.send_bytes("s", 1, b"not a tensor", PeerFrame.Kind.OBJECT)
    with pytest.raises(ProtocolViolation, match="OBJECT message where a TENSOR"):
        t1.recv("s", 0, kind=PeerFrame.Kind.TENSOR)


def test_peer_shutdown_wakes_waiters(pair):
    t0, t1, s0, *_ = pair
    generation = t1.begin_session("s")[0]
    t0.close()
    s0.stop(0)
    with pytest.raises(PeerDisconnected, match="party 0 disconnected"):
        t1.recv("s", 0, timeout=10, generation=generation)


def test_hello_from_a_stranger_is_refused(pair):
    from mpcvit.mpc.transport import _OutboundLink

    *_, port1 = pair
    # A client claiming to be party 1 on party 1's own server is refused.
    impostor = PeerTransport(1, 2, timeouts=Timeouts(connect=5, recv=5))
    link = _OutboundLink(impostor, 1, f"127.0.0.1:{port1}")
    link.open(5)
    with pytest.raises(grpc.RpcError) as info:
        link._future.result(timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    link.close()


def test_abort_wakes_the_peer_waiting_in_that_session_only(pair):
    t0, t1, *_ = pair
    t0.send_array("s", 1, np.array([7], dtype=np.int64))
    t0.abort_session("s", "DealerError")
    # Messages sent before the abort are still handed out; then the wait fails at once
    # (well before the 10 s timeout) with the sender's reason.
    assert int(t1.recv("s", 0, timeout=10).tensor_array()[0]) == 7
    with pytest.raises(PeerAborted, match="party 0 aborted session 's': DealerError"):
        t1.recv("s", 0, timeout=10)
    # Another session is untouched, and closing the aborted one forgets the abort.
    t0.send_array("t", 1, np.array([8], dtype=np.int64))
    assert int(t1.recv("t", 0, timeout=10).tensor_array()[0]) == 8
    t1.end_session("s")
    with pytest.raises(PeerTimeout):
        t1.recv("s", 0, timeout=0.3)


def test_a_refused_control_send_leaves_the_new_streams_numbering_intact(pair):
    """A control message refused while the link is being reopened must not use up a
    sequence number of the new stream (the peer would then refuse every later one)."""
    from mpcvit.mpc.transport import _OutboundLink
    from mpcvit.proto.generated import peer_pb2

    t0, t1, s0, s1, port1 = pair
    t0.close()
    link = _OutboundLink(t0, 1, f"127.0.0.1:{port1}")
    t0._links[1] = link  # reopening: not up yet
    hello = peer_pb2.Control(hello=peer_pb2.Hello(need_weights=True))
    with pytest.raises(PeerDisconnected):
        t0.send_control(1, hello)
    link.open(10)
    generation = None
    for _ in range(100):
        generation, connected = t1.link_state(0)
        if connected:
            break
        time.sleep(0.05)
    t0.send_control(1, hello)
    assert t1.recv_control(0, timeout=10, generation=generation) == hello


def test_a_control_wait_never_returns_a_message_of_a_newer_link(pair):
    """What the peer sends after reconnecting belongs to the new link: a wait pinned to
    the old one fails (the caller then reads it on the new link) instead of taking it."""
    from mpcvit.proto.generated import peer_pb2

    t0, t1, *_ = pair
    old, _ = t1.link_state(0)
    t0.close()
    t0.ensure_connected(10)
    hello = peer_pb2.Control(hello=peer_pb2.Hello(need_weights=True))
    t0.send_control(1, hello)
    new = old
    for _ in range(100):
        new, connected = t1.link_state(0)
        if connected and new != old and t1.mailbox._queues.get(("__control__", 0)):
            break  # the hello is waiting in the new link's queue
        time.sleep(0.05)
    with pytest.raises(PeerDisconnected):
        t1.recv_control(0, timeout=5, generation=old)
    assert t1.recv_control(0, timeout=5, generation=new) == hello
