"""Long-lived gRPC links between parties, with per-session ordered mailboxes.

One :class:`PeerTransport` lives in each party process.  It serves ``PeerService`` (on
the party's own gRPC server, so peers and clients can share one port) and keeps ONE
client stream open to every peer: opening a stream per message would cost ~1 ms each,
and a ViT inference sends over a thousand messages.

Every message carries (session, seq, src).  The receiver files it under (session, src)
and hands it out strictly in sequence, so concurrent or aborted sessions never cross.
Every wait is bounded by a timeout, and a peer whose stream closes wakes every waiter
with :class:`PeerDisconnected` instead of letting it sit until the timeout.  A peer whose
own part of a session failed sends an ABORT frame (:meth:`PeerTransport.abort_session`),
which wakes a waiter in that session with :class:`PeerAborted` at once.

Each peer's link has a *generation* that changes whenever its inbound stream opens or
closes.  A caller that agreed on something with the peer over one generation (a session
to run, a reply to wait for) pins that generation: if the peer went away since, even
if it came back as a new process, the wait fails at once with
:class:`PeerDisconnected` instead of waiting for a message that can never come.
Control messages between the party servers are typed (``peer_pb2.Control``).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ..proto.generated import peer_pb2, peer_pb2_grpc
from .config import RECONNECT_OPTIONS, Timeouts, TlsConfig
from .errors import PeerAborted, PeerDisconnected, PeerError, PeerTimeout, ProtocolViolation
from .roles import Allowed, Role, RoleChecker

log = logging.getLogger("mpcvit.transport")

CONTROL_SESSION = "__control__"
_Kind = peer_pb2.PeerFrame.Kind
_CLOSED_SESSIONS_KEPT = 4096


def grpc_message_options(chunk_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options that admit one chunk plus headers and keep links alive."""
    limit = chunk_bytes + (1 << 20)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # server side: accept those pings instead of answering GOAWAY "too_many_pings"
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        # client side: retry a refused connection every quarter second (gRPC's default
        # backoff grows to minutes), so a restarted peer is found again at once
        *RECONNECT_OPTIONS,
    ]


@dataclass
class Message:
    """One reassembled message from a peer."""

    session: str
    seq: int
    src: int
    kind: int
    dtype: str
    shape: tuple[int, ...]
    payload: bytes | bytearray

    def tensor_array(self) -> np.ndarray:
        """The payload as a writable numpy array of the sent dtype and shape."""
        buf = self.payload if isinstance(self.payload, bytearray) else bytearray(self.payload)
        return np.frombuffer(buf, dtype=np.dtype(self.dtype)).reshape(self.shape)


class _PeerState:
    __slots__ = ("connected", "generation", "incarnation", "stream")

    def __init__(self) -> None:
        self.connected = False
        self.generation = 0
        self.incarnation = ""
        self.stream = 0  # which inbound stream is the current one


class Mailbox:
    """Messages received from peers, filed by (session, src), handed out in order."""

    def __init__(self, world_size: int) -> None:
        self._cond = threading.Condition()
        self._queues: dict[tuple[str, int], collections.deque[Message]] = {}
        self._next_seq: dict[tuple[str, int], int] = {}
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()
        # session -> (src, reason) of a peer that gave the session up
        self._aborted: collections.OrderedDict[str, tuple[int, str]] = collections.OrderedDict()
        self._peers = [_PeerState() for _ in range(world_size)]

    # -- peer connection state ---------------------------------------------------------
    def peer_connected(self, src: int, incarnation: str) -> int:
        """A new inbound stream from ``src``; returns its token for :meth:`peer_closed`."""
        with self._cond:
            state = self._peers[src]
            state.connected = True
            state.generation += 1
            state.incarnation = incarnation
            state.stream += 1
            # A new stream starts the peer's control channel afresh.
            self._queues.pop((CONTROL_SESSION, src), None)
            self._next_seq.pop((CONTROL_SESSION, src), None)
            self._cond.notify_all()
            return state.stream

    def peer_closed(self, src: int, stream: int) -> None:
        """Inbound stream ``stream`` of ``src`` ended (a newer one may have replaced it)."""
        with self._cond:
            state = self._peers[src]
            if state.stream == stream:
                state.connected = False
                state.generation += 1
            self._cond.notify_all()

    def peer_generation(self, src: int) -> tuple[int, bool]:
        with self._cond:
            state = self._peers[src]
            return state.generation, state.connected

    def wait_for_peer(self, src: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._peers[src].connected, timeout)

    # -- messages ----------------------------------------------------------------------
    def deliver(self, msg: Message) -> None:
        with self._cond:
            if msg.session in self._closed:
                return  # late message of an aborted session: drop it
            if msg.kind == _Kind.ABORT:
                reason = bytes(msg.payload[:200]).decode("utf-8", "replace")
                self._aborted.setdefault(msg.session, (msg.src, reason))
                while len(self._aborted) > _CLOSED_SESSIONS_KEPT:
                    self._aborted.popitem(last=False)
                self._cond.notify_all()
                return
            self._queues.setdefault((msg.session, msg.src), collections.deque()).append(msg)
            self._cond.notify_all()

    def take(
        self, session: str, src: int, timeout: float, generation: int | None = None
    ) -> Message:
        """Next message of ``session`` from ``src``; raise if the peer goes or time runs out.

        ``generation`` is the peer's connection generation when the session started: if
        the peer's stream closed (or it reconnected as a new process) since, messages of
        this session can never arrive, so waiting fails at once.
        """
        key = (session, src)
        with self._cond:

            def ready() -> bool:
                q = self._queues.get(key)
                if q or session in self._aborted:
                    return True
                state = self._peers[src]
                return generation is not None and (
                    state.generation != generation or not state.connected
                )

            if not self._cond.wait_for(ready, timeout):
                raise PeerTimeout(
                    f"party {src} sent nothing for session {session!r} in {timeout:.1f} s"
                )
            q = self._queues.get(key)
            if (session == CONTROL_SESSION and generation is not None
                    and self._peers[src].generation != generation):
                # The control queue belongs to one stream: what it holds now came on a
                # newer link than the caller's, so it is not the caller's to read.
                raise PeerDisconnected(f"party {src} disconnected (its control link changed)")
            if not q and session in self._aborted:
                who, reason = self._aborted[session]
                raise PeerAborted(f"party {who} aborted session {session!r}: {reason}")
            if not q:
                raise PeerDisconnected(
                    f"party {src} disconnected during session {session!r}"
                )
            msg = q.popleft()
            expected = self._next_seq.get(key, 0)
            if msg.seq != expected:
                raise ProtocolViolation(
                    f"party {src} sent message {msg.seq} of session {session!r}, "
                    f"expected {expected}"
                )
            self._next_seq[key] = expected + 1
            return msg

    def close_session(self, session: str) -> None:
        with self._cond:
            for key in [k for k in self._queues if k[0] == session]:
                del self._queues[key]
            for key in [k for k in self._next_seq if k[0] == session]:
                del self._next_seq[key]
            self._closed[session] = None
            self._aborted.pop(session, None)
            while len(self._closed) > _CLOSED_SESSIONS_KEPT:
                self._closed.popitem(last=False)


class _PeerServicer(peer_pb2_grpc.PeerServiceServicer):
    """Receives one peer's stream and files its messages into the mailbox."""

    def __init__(self, transport: PeerTransport) -> None:
        self._t = transport

    def Stream(self, request_iterator: Iterator[peer_pb2.PeerFrame],  # noqa: N802 (gRPC name)
               context: grpc.ServicerContext) -> peer_pb2.PeerStreamSummary:
        t = self._t
        # Only another party may stream to us, and only as the rank its certificate states.
        role = t.roles.check(context, Allowed.parties(*(r for r in range(t.world_size)
                                                        if r != t.rank)))
        try:
            hello = next(request_iterator)
        except StopIteration:
            return peer_pb2.PeerStreamSummary(frames=0)
        if (
            hello.kind != _Kind.HELLO
            or hello.cluster != t.cluster
            or not (0 <= hello.src < t.world_size)
            or hello.src == t.rank
        ):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "bad peer hello")
        if role is not None and hello.src != role.rank:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"permission denied: HELLO claims party/{hello.src}, the caller's "
                          f"certificate is {role}")
        src, incarnation = hello.src, hello.incarnation
        stream = t.mailbox.peer_connected(src, incarnation)
        log.info("peer %d connected (incarnation %s)", src, incarnation[:8])
        frames = 0
        parts: list[bytes] = []
        head = None
        try:
            for frame in request_iterator:
                frames += 1
                if frame.src != src:
                    raise ProtocolViolation(f"frame claims src {frame.src} on party {src}'s stream")
                if frame.chunk == 0:
                    head, parts = frame, [frame.payload]
                elif head is None or frame.seq != head.seq or frame.session != head.session:
                    raise ProtocolViolation("frame out of order within a message")
                else:
                    parts.append(frame.payload)
                if len(parts) == head.chunks:
                    payload = parts[0] if len(parts) == 1 else bytearray().join(parts)
                    t.mailbox.deliver(
                        Message(head.session, head.seq, src, head.kind, head.dtype,
                                tuple(head.shape), payload)
                    )
                    head, parts = None, []
        except ProtocolViolation as exc:
            log.error("closing party %d's stream: %s", src, exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # stream broken: the peer went away
            log.info("party %d's stream ended: %s", src, type(exc).__name__)
        finally:
            t.mailbox.peer_closed(src, stream)
            log.info("peer %d disconnected", src)
        return peer_pb2.PeerStreamSummary(frames=frames)


class _OutboundLink:
    """One client stream to one peer, fed from a queue by a gRPC-owned thread."""

    def __init__(self, transport: PeerTransport, dst: int, address: str) -> None:
        self.dst = dst
        self.address = address
        t = transport
        options = grpc_message_options(t.chunk_bytes)
        if t.tls is not None:
            options += t.tls.channel_options(Role.party(dst))  # only party dst may answer
            self.channel = grpc.secure_channel(address, t.tls.channel_credentials(), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = peer_pb2_grpc.PeerServiceStub(self.channel)
        self._hello = peer_pb2.PeerFrame(
            kind=_Kind.HELLO, src=t.rank, cluster=t.cluster, incarnation=t.incarnation
        )
        self._queue: queue.SimpleQueue | None = None
        self._future = None
        self._control_seq = 0

    def next_control_seq(self) -> int:
        """Sequence number of the next control message on this stream (callers hold the
        transport's control lock)."""
        seq = self._control_seq
        self._control_seq += 1
        return seq

    def _frames(self, q: queue.SimpleQueue) -> Iterator[peer_pb2.PeerFrame]:
        yield self._hello
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    def open(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise PeerTimeout(
                f"cannot reach party {self.dst} at {self.address} within {timeout:.1f} s"
            ) from None
        self._queue = queue.SimpleQueue()
        self._future = self.stub.Stream.future(self._frames(self._queue))

    @property
    def alive(self) -> bool:
        return self._future is not None and not self._future.done()

    def error(self) -> str:
        if self._future is None:
            return "not connected"
        if not self._future.done():
            return ""
        try:
            self._future.result(timeout=0)
            return "stream closed"
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # pragma: no cover - defensive
            return repr(exc)

    def put(self, frame: peer_pb2.PeerFrame) -> None:
        if not self.alive:
            raise PeerDisconnected(f"link to party {self.dst} is down ({self.error()})")
        self._queue.put(frame)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
        if self._future is not None:
            try:
                self._future.result(timeout=2.0)
            except Exception:
                self._future.cancel()
        self.channel.close()


class PeerTransport:
    """This party's links to its peers (see module docstring)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        tls: TlsConfig | None = None,
        timeouts: Timeouts | None = None,
        chunk_bytes: int = 1 << 20,
        cluster: str = "mpcvit",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.tls = tls
        self.roles = RoleChecker.from_tls(tls)  # who may open a PeerService stream
        self.timeouts = timeouts or Timeouts()
        self.chunk_bytes = chunk_bytes
        self.cluster = cluster
        self.incarnation = uuid.uuid4().hex
        self.listen_port: int | None = None  # set by whoever binds the serving port
        self.mailbox = Mailbox(world_size)
        self._links: dict[int, _OutboundLink] = {}
        self._addresses: dict[int, str] = {}
        self._seq: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._control_lock = threading.Lock()  # control messages from many threads
        self._connect_lock = threading.Lock()

    # -- wiring --------------------------------------------------------------------
    def add_to_server(self, server: grpc.Server) -> None:
        """Serve PeerService on ``server`` (create it with :func:`server_options`)."""
        peer_pb2_grpc.add_PeerServiceServicer_to_server(_PeerServicer(self), server)

    def server_options(self) -> list[tuple[str, Any]]:
        return grpc_message_options(self.chunk_bytes)

    def connect(self, peers: dict[int, str], timeout: float | None = None) -> None:
        """Open streams to every peer and wait until every peer's stream reached us."""
        timeout = self.timeouts.connect if timeout is None else timeout
        missing = [r for r in range(self.world_size) if r != self.rank and r not in peers]
        if missing:
            raise ValueError(f"no address for parties {missing}")
        self._addresses = {int(r): a for r, a in peers.items() if int(r) != self.rank}
        self.ensure_connected(timeout)

    def ensure_connected(self, timeout: float | None = None) -> None:
        """(Re)open any link that is down; wait for every peer's inbound stream.

        Called at the start of each session, so a restarted peer is picked up again.
        """
        timeout = self.timeouts.connect if timeout is None else timeout
        with self._connect_lock:  # one thread (re)opens a link; others wait for it
            for dst, address in self._addresses.items():
                with self._lock:
                    link = self._links.get(dst)
                    if link is not None and link.alive:
                        continue
                    if link is not None:
                        link.close()
                    link = _OutboundLink(self, dst, address)
                    self._links[dst] = link
                link.open(timeout)
        for src in self._addresses:
            if not self.mailbox.wait_for_peer(src, timeout):
                raise PeerTimeout(f"party {src} did not connect back within {timeout:.1f} s")

    def peer_connected(self, peer: int) -> bool:
        """Whether both streams with ``peer`` are up now (ours to it, its to us)."""
        with self._lock:
            link = self._links.get(peer)
        return link is not None and link.alive and self.mailbox.peer_generation(peer)[1]

    def link_state(self, peer: int) -> tuple[int, bool]:
        """(generation, connected) of ``peer``'s inbound stream (see module docstring)."""
        return self.mailbox.peer_generation(peer)

    def wait_for_peer(self, peer: int, timeout: float) -> bool:
        """Wait until ``peer``'s inbound stream is up; False if ``timeout`` ran out."""
        return self.mailbox.wait_for_peer(peer, timeout)

    def check_link(self, generations: dict[int, int]) -> None:
        """Raise :class:`PeerDisconnected` unless every peer's link is still the one of
        ``generations`` (both streams up, no reconnect since)."""
        for peer, generation in generations.items():
            now, connected = self.mailbox.peer_generation(peer)
            with self._lock:
                link = self._links.get(peer)
            if now != generation or not connected or link is None or not link.alive:
                raise PeerDisconnected(f"party {peer} disconnected (its link was lost since "
                                       "the parties agreed on this step)")

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()

    # -- messages --------------------------------------------------------------------
    def begin_session(self, session: str,
                      generations: dict[int, int] | None = None) -> dict[int, int]:
        """Each peer's connection generation for :meth:`recv` checks: the current one,
        or ``generations`` (pinned by the caller, checked now)."""
        if generations is not None:
            self.check_link(generations)
            return dict(generations)
        return {src: self.mailbox.peer_generation(src)[0] for src in self._addresses}

    def end_session(self, session: str) -> None:
        self.mailbox.close_session(session)
        with self._lock:
            for key in [k for k in self._seq if k[0] == session]:
                del self._seq[key]

    def abort_session(self, session: str, reason: str) -> None:
        """Tell every connected peer that this party gave ``session`` up (best effort:
        a peer that is down learns it from its stream instead).  ``reason`` must not
        carry data: it is logged and shown by the peer."""
        frame_reason = reason.encode("utf-8")[:200]
        with self._lock:
            links = list(self._links.items())
        for dst, link in links:
            try:
                link.put(peer_pb2.PeerFrame(session=session, seq=0, src=self.rank, chunk=0,
                                            chunks=1, kind=_Kind.ABORT,
                                            payload=frame_reason))
            except PeerError:
                log.info("could not tell party %d that session %s was aborted", dst,
                         session[:16])

    def _next_seq(self, session: str, dst: int) -> int:
        with self._lock:
            seq = self._seq.get((session, dst), 0)
            self._seq[(session, dst)] = seq + 1
            return seq

    def _link(self, dst: int) -> _OutboundLink:
        link = self._links.get(dst)
        if link is None:
            raise PeerDisconnected(f"no link to party {dst} yet (not connected)")
        return link

    def send_array(self, session: str, dst: int, array: np.ndarray) -> None:
        """Send a numpy array (split into chunks of at most ``chunk_bytes``)."""
        link = self._link(dst)
        seq = self._next_seq(session, dst)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        flat = array.reshape(-1).view(np.uint8) if array.size else np.empty(0, np.uint8)
        n = max(1, -(-flat.nbytes // self.chunk_bytes))
        for i in range(n):
            part = flat[i * self.chunk_bytes : (i + 1) * self.chunk_bytes].tobytes()
            frame = peer_pb2.PeerFrame(
                session=session, seq=seq, src=self.rank, chunk=i, chunks=n,
                kind=_Kind.TENSOR, payload=part,
            )
            if i == 0:
                frame.dtype = array.dtype.str
                frame.shape.extend(array.shape)
            link.put(frame)

    def send_bytes(self, session: str, dst: int, data: bytes, kind: int) -> None:
        link = self._link(dst)
        if session == CONTROL_SESSION:
            # The control channel's numbering belongs to the stream: a new stream starts
            # it at 0 on both sides, and a send refused by a dead stream uses no number.
            if not link.alive:
                raise PeerDisconnected(f"link to party {dst} is down ({link.error()})")
            seq = link.next_control_seq()
        else:
            seq = self._next_seq(session, dst)
        n = max(1, -(-len(data) // self.chunk_bytes))
        for i in range(n):
            link.put(
                peer_pb2.PeerFrame(
                    session=session, seq=seq, src=self.rank, chunk=i, chunks=n, kind=kind,
                    payload=data[i * self.chunk_bytes : (i + 1) * self.chunk_bytes],
                )
            )

    def recv(
        self,
        session: str,
        src: int,
        *,
        timeout: float | None = None,
        generation: int | None = None,
        kind: int | None = None,
    ) -> Message:
        if src == self.rank or not 0 <= src < self.world_size:
            raise ValueError(f"cannot receive from party {src}")
        timeout = self.timeouts.recv if timeout is None else timeout
        if generation is None:
            generation, _ = self.mailbox.peer_generation(src)
        msg = self.mailbox.take(session, src, timeout, generation)
        if kind is not None and msg.kind != kind:
            raise ProtocolViolation(
                f"party {src} sent a {_Kind.Name(msg.kind)} message where a "
                f"{_Kind.Name(kind)} was expected (session {session!r}, seq {msg.seq})"
            )
        return msg

    # -- control messages (outside CrypTen sessions) -----------------------------------
    def send_control(self, dst: int, msg: peer_pb2.Control) -> None:
        """Send a control message to ``dst`` without blocking (ordered per pair of parties,
        from any thread); :class:`PeerDisconnected` if the link to ``dst`` is down."""
        data = msg.SerializeToString()
        with self._control_lock:  # sequence number and frames go out together
            self.send_bytes(CONTROL_SESSION, dst, data, _Kind.CONTROL)

    def recv_control(self, src: int, timeout: float,
                     generation: int | None = None) -> peer_pb2.Control:
        """The next control message from ``src``; with ``generation``, fail at once if the
        link changed since (see module docstring)."""
        msg = self.recv(CONTROL_SESSION, src, timeout=timeout, kind=_Kind.CONTROL,
                        generation=generation)
        control = peer_pb2.Control()
        try:
            control.ParseFromString(bytes(msg.payload))
        except DecodeError as exc:
            raise ProtocolViolation(f"party {src} sent a malformed control message") from exc
        if control.WhichOneof("body") is None:
            raise ProtocolViolation(f"party {src} sent an empty control message")
        return control
