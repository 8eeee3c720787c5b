"""Client SDK: classify images privately with two non-colluding party servers.

The client encodes each image in fixed point, splits it into two additive shares with
the OS's secure random source, sends one share to each party under one request id, and
adds the two output shares it gets back.  Neither party alone learns the image or the
logits.  Dependencies: numpy, grpcio and protobuf only (no torch, no CrypTen), so the SDK
runs anywhere a client runs.

    with PrivateInferenceClient(["p0:50051", "p1:50052"]) as client:
        client.wait_ready(60)                     # fails fast on a wrong address
        prediction = client.infer("photo.jpg")    # a path, the file's bytes or a numpy array
        print(prediction.top_k(3))

An image may be a path or the bytes of a PNG, JPEG, WebP, BMP, GIF or TIFF (these need
Pillow: ``pip install 'mpcvit[image]'``), an NPY or a binary PGM/PPM file, or a numpy
array of pixels: HxW or HxWxC (C = 1, 3 or 4), uint8, uint16, or float in [0, 1].  The
client converts it to the model's input the way the training images were made
(:func:`mpcvit.party.images.to_model_input`: grey by luminance; a picture of another
size with a light background negated, trimmed, its longer side resized to the model's
side with an antialiased bilinear filter and centred), then normalises it with the
model's mean and std.  A float
array of exactly the model's (C, H, W) is taken as already normalised.

Errors are :class:`ClientError` subclasses.  :class:`InvalidInput` is raised locally for a
picture the client cannot read or convert (before anything is sent), and by a party for
a request it rejects; :class:`PartyUnreachable` and :class:`NotAParty` say which address
did not answer, or answered as something other than an mpcvit party.

Several party pairs: :class:`mpcvit.party.pool.PairPool` has the same calls and sends
each request to a healthy, least-loaded pair.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from mpcvit.mpc.roles import Role
from mpcvit.party import images as imaging
from mpcvit.party import shares
from mpcvit.party.images import ImageSource
from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc

__all__ = [
    "ClientError",
    "ClientTls",
    "InvalidInput",
    "ModelInfo",
    "ModelNotFound",
    "NotAParty",
    "PartiesDisagree",
    "PartyStats",
    "PartyUnavailable",
    "PartyUnreachable",
    "Prediction",
    "PrivateInferenceClient",
    "RequestAborted",
    "RequestTimeout",
    "RequestTooLarge",
    "error_from_rpc",
    "health_check",
]


# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A private inference failed; ``code`` is the gRPC status, ``party`` who reported it."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 party: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.party = party


class InvalidInput(ClientError, ValueError):
    """The input is unusable: a picture the client cannot read or convert (raised locally,
    ``party`` None), or request content a party rejected (shape, size, id, encoding)."""


class RequestTooLarge(ClientError):
    """The request exceeds a party's configured size or batch limit."""


class ModelNotFound(ClientError):
    """The parties do not serve the requested model."""


class PartyUnavailable(ClientError):
    """A party is unreachable, not ready, or lost its peer during the request."""


class PartyUnreachable(PartyUnavailable):
    """Nothing answered gRPC at a party's address (refused, unknown host, TLS failure)."""


class NotAParty(ClientError):
    """A gRPC server answered at a party's address, but it is not an mpcvit party."""


class RequestTimeout(ClientError):
    """The request did not finish in time (e.g. the other half never reached the peer)."""


class RequestAborted(ClientError):
    """A party abandoned the secure session (peer failure, shutdown, protocol error)."""


class PartiesDisagree(ClientError):
    """The two parties answered inconsistently (different model facts or request ids)."""


_ERRORS_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidInput,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RequestTooLarge,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.UNAVAILABLE: PartyUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: RequestTimeout,
    grpc.StatusCode.ABORTED: RequestAborted,
    grpc.StatusCode.CANCELLED: RequestAborted,
    grpc.StatusCode.UNIMPLEMENTED: NotAParty,
}


def _not_ready(msg: inference_pb2.ModelInfo) -> str:
    """Why a party is not ready, as it says (older parties say nothing)."""
    return msg.not_ready_reason or "weights not shared yet"


def error_from_rpc(exc: grpc.RpcError, party: int, address: str | None = None) -> ClientError:
    """Map a gRPC failure of ``party`` to the matching ClientError subclass."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _ERRORS_BY_CODE.get(code, ClientError)
    name = code.name if code is not None else "UNKNOWN"
    where = f"party {party}" + (f" at {address}" if address else "")
    if cls is NotAParty:
        details = f"not an mpcvit party ({details})"
    return cls(f"{where}: {name}: {details}", code=code, party=party)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ClientTls:
    """Mutual TLS: the CA that signed the parties and this client's certificate pair.

    Each party must present its role's name (``party0.role.mpcvit.invalid``, ...; see
    :mod:`mpcvit.mpc.roles`) whatever address is dialled; ``server_name`` replaces it, for
    certificates made without role names.
    """

    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        ca = Path(self.ca).read_bytes()
        key = Path(self.key).read_bytes() if self.key else None
        cert = Path(self.cert).read_bytes() if self.cert else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)


@dataclass(frozen=True)
class ModelInfo:
    """Public encoding facts of a served model (see ``inference.proto``).

    Two limits count images: ``max_inputs_per_request`` bounds one ``Infer`` call (the
    SDK splits a larger batch into several calls); ``max_session_batch`` is how many
    queued requests party 0 runs together in one secure session (a server setting; 0
    from a party that does not report it).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    precision_bits: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_request_bytes: int
    max_inputs_per_request: int
    models: tuple[str, ...]
    max_session_batch: int = 0

    @classmethod
    def from_proto(cls, msg: inference_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=msg.name,
            input_shape=tuple(int(d) for d in msg.input_shape),
            num_classes=int(msg.num_classes),
            class_names=tuple(msg.class_names),
            precision_bits=int(msg.precision_bits),
            mean=tuple(msg.mean),
            std=tuple(msg.std),
            max_request_bytes=int(msg.max_request_bytes),
            max_inputs_per_request=int(msg.max_inputs_per_request),
            models=tuple(msg.models),
            max_session_batch=int(msg.max_session_batch),
        )

    def preprocess(self, image: np.ndarray, *, invert: bool | None = None,
                   name: str = "image") -> np.ndarray:
        """Pixels of any size and colour -> the normalised float32 (C, H, W) of the model.

        Conversion as in :func:`mpcvit.party.images.to_model_input`, then
        ``(pixel / 255 - mean) / std``.  Raises :class:`InvalidInput`.
        """
        try:
            x = imaging.to_model_input(image, self.input_shape, invert=invert, name=name)
        except imaging.ImageError as exc:
            raise InvalidInput(str(exc)) from None
        c = int(self.input_shape[0])
        x = x / np.float32(255.0)
        mean = np.asarray(self.mean or (0.0,) * c, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std or (1.0,) * c, dtype=np.float32).reshape(-1, 1, 1)
        return np.ascontiguousarray((x - mean) / std)


@dataclass(frozen=True)
class PartyStats:
    """Cost of the secure session as one party measured it."""

    party: int
    seconds: float
    queue_seconds: float
    rounds: int
    bytes_sent: int
    batch_size: int
    session: str


@dataclass(frozen=True)
class Prediction:
    """Decoded logits of one image plus both parties' cost reports."""

    request_id: str
    logits: np.ndarray
    class_names: tuple[str, ...]
    stats: tuple[PartyStats, PartyStats]
    seconds: float  # client wall-clock, encode to decode
    pair: int | None = None  # which pair served it, when a PairPool sent it

    def probabilities(self) -> np.ndarray:
        z = self.logits - np.max(self.logits)
        e = np.exp(z)
        return e / e.sum()

    @property
    def label(self) -> int:
        return int(np.argmax(self.logits))

    def top_k(self, k: int = 3) -> list[tuple[int, str, float]]:
        """(class index, class name, probability), most probable first."""
        p = self.probabilities()
        order = np.argsort(-p, kind="stable")[:k]
        names = self.class_names
        return [(int(i), names[i] if i < len(names) else str(int(i)), float(p[i])) for i in order]

    @property
    def rounds(self) -> int:
        """Communication rounds of the session (the parties' rounds are the same protocol)."""
        return max(s.rounds for s in self.stats)

    @property
    def megabytes(self) -> float:
        """MB exchanged between the parties in the session, by party 0's CrypTen count.

        CrypTen counts a party's traffic both ways (an exchange of n elements counts 2n),
        so one party's count already covers the link; adding party 1's would double it.
        """
        return next(s for s in self.stats if s.party == 0).bytes_sent / 1e6

    @property
    def server_seconds(self) -> float:
        return max(s.seconds for s in self.stats)


# --------------------------------------------------------------------------- client


class PrivateInferenceClient:
    """Talks to party 0 and party 1; every call has a deadline (``timeout`` seconds)."""

    def __init__(
        self,
        parties: Sequence[str],
        *,
        model: str = "",
        timeout: float = 120.0,
        tls: ClientTls | None = None,
        max_message_bytes: int = 64 << 20,
        max_pixels: int = imaging.MAX_PIXELS,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if len(parties) != 2:
            raise ValueError(f"need exactly two party addresses, got {len(parties)}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.model = model
        self.timeout = float(timeout)
        self.addresses = (str(parties[0]), str(parties[1]))
        self.max_pixels = int(max_pixels)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *channel_options,
        ]
        if tls is None:
            self._channels = [grpc.insecure_channel(a, options=options) for a in parties]
        else:
            # Each party must answer with its own role's certificate: were party 1 able to
            # pose as party 0, it would receive both shares of the image.
            creds = tls.credentials()
            self._channels = [
                grpc.secure_channel(a, creds, options=[
                    *options, ("grpc.ssl_target_name_override",
                               tls.server_name or Role.party(rank).server_name)])
                for rank, a in enumerate(parties)]
        self._stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in self._channels]
        self._info: dict[str, ModelInfo] = {}

    # -- lifecycle

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> PrivateInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """Ask both parties for the model's public facts; they must agree."""
        if self.model in self._info and not refresh:
            return self._info[self.model]
        request = inference_pb2.ModelInfoRequest(model=self.model)
        replies = self._call_both("GetModelInfo", [request, request])
        for msg, party in zip(replies, (0, 1), strict=True):
            if not msg.ready:
                raise PartyUnavailable(f"party {party} at {self.addresses[party]}: model not "
                                       f"ready yet ({_not_ready(msg)})", party=party)
        return self._agree([ModelInfo.from_proto(r) for r in replies])

    def _agree(self, infos: list[ModelInfo]) -> ModelInfo:
        a, b = infos
        if (a.input_shape, a.num_classes, a.precision_bits) != (
            b.input_shape, b.num_classes, b.precision_bits
        ):
            raise PartiesDisagree(f"parties describe the model differently: {a} vs {b}")
        self._info[self.model] = a
        return a

    def wait_ready(self, timeout: float = 60.0, *, connect_timeout: float = 5.0,
                   progress: Callable[[str], None] | None = None) -> ModelInfo:
        """Wait until both parties serve the model; fail fast on a wrong address.

        Raises :class:`PartyUnreachable` when no gRPC connection to a party is made within
        ``connect_timeout`` seconds (refused, unknown host, TLS handshake failure: grpc's
        reason is in the message), :class:`NotAParty` at once when the server there does
        not serve ``mpcvit.v1.InferenceService`` (the dealer's port, say), and
        :class:`PartyUnavailable` when the parties are still starting after ``timeout``.
        ``progress`` gets a line each time a starting party's state changes.
        """
        deadline = time.monotonic() + timeout
        shown: list[str | None] = [None, None]
        while True:
            probes = [self._probe(party, connect_timeout) for party in (0, 1)]
            infos = [p for p in probes if isinstance(p, ModelInfo)]
            if len(infos) == 2:
                return self._agree(infos)
            waiting = [(party, p) for party, p in enumerate(probes) if isinstance(p, str)]
            for party, why in waiting:
                if progress is not None and shown[party] != why:
                    progress(f"waiting for party {party} at {self.addresses[party]}: "
                             f"starting ({why})...")
                shown[party] = why
            if time.monotonic() >= deadline:
                party, why = waiting[0]
                raise PartyUnavailable(f"parties not ready after {timeout:g} s: party {party} "
                                       f"at {self.addresses[party]}: {why}", party=party)
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def check_ready(self, connect_timeout: float = 5.0) -> ModelInfo | str:
        """One round of :meth:`wait_ready`: the agreed ModelInfo when both parties serve
        the model, else why one is still starting.  Raises as :meth:`wait_ready` does for
        an address where nothing answers or something else answers."""
        probes = [self._probe(party, connect_timeout) for party in (0, 1)]
        for party, probe in enumerate(probes):
            if isinstance(probe, str):
                return f"party {party} at {self.addresses[party]}: {probe}"
        return self._agree(probes)  # type: ignore[arg-type]

    def health(self, timeout: float = 5.0) -> tuple[str, str]:
        """Both parties' grpc.health.v1 status (``SERVING``, ``NOT_SERVING``, or the gRPC
        error's code name such as ``UNAVAILABLE``), asked at once."""
        calls = [health_check_future(channel, timeout=timeout) for channel in self._channels]
        return (health_result(calls[0]), health_result(calls[1]))

    def _probe(self, party: int, connect_timeout: float) -> ModelInfo | str:
        """This party's ModelInfo when it is ready, else why it is still starting."""
        address = self.addresses[party]
        ready = grpc.channel_ready_future(self._channels[party])
        try:
            ready.result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            raise PartyUnreachable(
                f"party {party} at {address}: no gRPC connection within {connect_timeout:g} s "
                f"({self._transport_error(party)})", party=party,
                code=grpc.StatusCode.UNAVAILABLE) from None
        finally:
            ready.cancel()
        request = inference_pb2.ModelInfoRequest(model=self.model)
        try:
            msg = self._stubs[party].GetModelInfo(request, timeout=min(self.timeout, 30.0))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise NotAParty(self._wrong_service(party), code=code, party=party) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return exc.details() or code.name
            raise error_from_rpc(exc, party, address) from None
        if not msg.ready:
            return _not_ready(msg)
        return ModelInfo.from_proto(msg)

    def _transport_error(self, party: int) -> str:
        """grpc's own words for why the channel does not connect ("Connection refused")."""
        request = inference_pb2.ModelInfoRequest(model=self.model)
        try:
            self._stubs[party].GetModelInfo(request, timeout=1.0)
        except grpc.RpcError as exc:
            details = exc.details() or exc.code().name
            return details.rsplit("last error: ", 1)[-1]
        return "it connected just now"

    def _wrong_service(self, party: int) -> str:
        address = self.addresses[party]
        services = list_services(self._channels[party], timeout=min(self.timeout, 5.0))
        if services is None:
            what = "(is this the dealer's port, or another gRPC service?)"
        else:
            dealer = " (this is the dealer's port)" if "mpcvit.v1.DealerService" in services else ""
            what = f"it serves {', '.join(services) or 'no listed service'}{dealer}"
        return (f"party {party} at {address} is not an mpcvit party: the gRPC server there "
                f"answered UNIMPLEMENTED for mpcvit.v1.InferenceService; {what}")

    def infer(self, image: ImageSource, *, preprocessed: bool | None = None,
              invert: bool | None = None) -> Prediction:
        """Classify one image: a path, a file's bytes, or a numpy array (see the module doc)."""
        return self.infer_batch([image], preprocessed=preprocessed, invert=invert)[0]

    def infer_batch(
        self, images: Sequence[ImageSource] | np.ndarray, *, preprocessed: bool | None = None,
        invert: bool | None = None,
    ) -> list[Prediction]:
        """Classify several images in one round trip to each party.

        ``preprocessed=None`` treats a float array of exactly the model's (C, H, W) as
        already normalised and everything else as a picture to convert; True/False forces
        it.  Raises :class:`InvalidInput` (locally) for a picture it cannot read or convert.
        """
        info = self.model_info()
        if len(images) == 0:
            return []
        xs = [self._prepare(img, info, preprocessed, invert) for img in images]
        # Stay within the parties' advertised limits: split into several calls if needed.
        per_image = int(np.prod(info.input_shape)) * shares.RING_BYTES
        chunk = len(xs)
        if info.max_inputs_per_request:
            chunk = min(chunk, info.max_inputs_per_request)
        if info.max_request_bytes:
            chunk = min(chunk, max(1, info.max_request_bytes // per_image))
        if chunk < len(xs):
            out: list[Prediction] = []
            for i in range(0, len(xs), chunk):
                out += self._infer_prepared(xs[i:i + chunk], info)
            return out
        return self._infer_prepared(xs, info)

    def _infer_prepared(self, xs: list[np.ndarray], info: ModelInfo) -> list[Prediction]:
        ids = [uuid.uuid4().hex for _ in xs]
        halves: list[list[inference_pb2.InputShare]] = [[], []]
        for rid, x in zip(ids, xs, strict=True):
            share0, share1 = shares.split(shares.encode(x, info.precision_bits))
            for party, share in ((0, share0), (1, share1)):
                halves[party].append(inference_pb2.InputShare(
                    request_id=rid, shape=list(x.shape), share=shares.to_bytes(share)))
        requests = [inference_pb2.InferRequest(model=self.model, inputs=h) for h in halves]
        start = time.perf_counter()
        replies = self._call_both("Infer", requests)
        elapsed = time.perf_counter() - start
        return self._combine(ids, replies, info, elapsed)

    # -- internals

    def _prepare(self, image: ImageSource, info: ModelInfo, preprocessed: bool | None,
                 invert: bool | None) -> np.ndarray:
        name = imaging.source_name(image)
        if not isinstance(image, np.ndarray):
            c, h, w = info.input_shape
            try:
                image = imaging.read_pixels(image, max_pixels=self.max_pixels,
                                           draft=(WORK_DRAFT * h, WORK_DRAFT * w))
            except imaging.ImageError as exc:
                raise InvalidInput(str(exc)) from None
            preprocessed = False
        a = np.asarray(image)
        if preprocessed is None:
            preprocessed = a.shape == info.input_shape and np.issubdtype(a.dtype, np.floating)
        if not preprocessed:
            return info.preprocess(a, invert=invert, name=name)
        if a.shape != info.input_shape:
            raise InvalidInput(f"{name}: preprocessed input has shape {a.shape}; the model "
                               f"takes {info.input_shape}")
        return a.astype(np.float64)

    def _combine(self, ids: list[str], replies: list[inference_pb2.InferResponse],
                 info: ModelInfo, elapsed: float) -> list[Prediction]:
        out0, out1 = (list(r.outputs) for r in replies)
        if not (len(out0) == len(out1) == len(ids)):
            raise PartiesDisagree("parties returned different numbers of outputs")
        predictions = []
        for rid, a, b in zip(ids, out0, out1, strict=True):
            if a.request_id != rid or b.request_id != rid:
                raise PartiesDisagree(f"output ids {a.request_id!r}/{b.request_id!r} != {rid!r}")
            if tuple(a.shape) != tuple(b.shape) or a.precision_bits != b.precision_bits:
                raise PartiesDisagree("output shares differ in shape or precision")
            try:
                s0 = shares.from_bytes(a.share, tuple(a.shape))
                s1 = shares.from_bytes(b.share, tuple(b.shape))
            except ValueError as exc:
                raise PartiesDisagree(f"malformed output share: {exc}") from exc
            logits = shares.decode(shares.reconstruct([s0, s1]), a.precision_bits)
            stats = tuple(
                PartyStats(party=p, seconds=o.stats.seconds, queue_seconds=o.stats.queue_seconds,
                           rounds=o.stats.rounds, bytes_sent=o.stats.bytes_sent,
                           batch_size=o.stats.batch_size, session=o.stats.session)
                for p, o in ((0, a), (1, b))
            )
            predictions.append(Prediction(rid, logits.reshape(-1), info.class_names,
                                          stats, elapsed))  # type: ignore[arg-type]
        return predictions

    def _call_both(self, method: str, requests: list) -> list:
        """Call ``method`` on both parties at once; on the first failure cancel the other."""
        done: queue.Queue[int] = queue.Queue()
        futures = []
        for party, (stub, request) in enumerate(zip(self._stubs, requests, strict=True)):
            future = getattr(stub, method).future(request, timeout=self.timeout)
            future.add_done_callback(lambda _f, p=party: done.put(p))
            futures.append(future)
        results: list = [None, None]
        for _ in range(2):
            # grpc enforces the deadline, so this wait ends; the margin covers callbacks.
            try:
                party = done.get(timeout=self.timeout + 30.0)
            except queue.Empty:
                for other in futures:
                    other.cancel()
                raise RequestTimeout(f"no answer within {self.timeout:.0f} s") from None
            future = futures[party]
            exc = future.exception()
            if exc is not None:
                for other in futures:
                    other.cancel()
                if isinstance(exc, grpc.RpcError):
                    raise error_from_rpc(exc, party, self.addresses[party]) from None
                raise ClientError(f"party {party}: {exc}", party=party) from exc
            results[party] = future.result()
        return results


#: JPEGs decode at a reduced scale still at least this many times the model's side.
WORK_DRAFT = imaging.WORK_FACTOR


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
#: grpc.health.v1.HealthCheckResponse.ServingStatus by number.
HEALTH_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def health_check_future(channel: grpc.Channel, service: str = "",
                        timeout: float = 5.0) -> grpc.Future:
    """Start a grpc.health.v1 ``Check`` of ``service`` (``""``: the whole server).

    Hand-encoded, like :func:`list_services`: the request is one string field and the
    answer one enum, so the SDK needs neither grpcio-health-checking nor a generated
    stub (whose descriptors would clash with that package's in a server process)."""
    name = service.encode()
    request = (b"\x0a" + _varint(len(name)) + name) if name else b""
    call = channel.unary_unary(HEALTH_CHECK, request_serializer=None,
                               response_deserializer=None)
    return call.future(request, timeout=timeout)


def health_result(call: grpc.Future) -> str:
    """The status name a :func:`health_check_future` call ended with, or its error code."""
    try:
        reply = call.result()
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        return code.name if code is not None else "UNKNOWN"
    try:
        status = _varint_fields(reply).get(1, 0)
    except (IndexError, ValueError):
        return "UNKNOWN"
    return HEALTH_STATUSES[status] if 0 <= status < len(HEALTH_STATUSES) else "UNKNOWN"


def health_check(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """grpc.health.v1 status of the server behind ``channel`` (see :func:`health_result`)."""
    return health_result(health_check_future(channel, service, timeout))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def list_services(channel: grpc.Channel, timeout: float = 5.0) -> list[str] | None:
    """The services a gRPC server lists by server reflection, or None if it does not say.

    Hand-encoded (the request is one empty field, the answer a list of names), so the
    SDK needs no reflection package: it only serves to say what answered at an address.
    """
    request = b"\x3a\x00"  # ServerReflectionRequest{list_services: ""}
    for version in ("v1", "v1alpha"):
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=None, response_deserializer=None)
        try:
            for reply in call(iter([request]), timeout=timeout):
                listing = _fields(reply).get(6, [])
                return [_fields(svc)[1][0].decode() for svc in
                        (_fields(listing[0]).get(1, []) if listing else [])]
        except (grpc.RpcError, KeyError, IndexError, ValueError, UnicodeDecodeError):
            continue
    return None


def _fields(data: bytes) -> dict[int, list[bytes]]:
    """Length-delimited fields of a protobuf message (others skipped): number -> values."""
    return _parse(data)[0]


def _varint_fields(data: bytes) -> dict[int, int]:
    """Varint fields of a protobuf message (the last value of each): number -> value."""
    return _parse(data)[1]


def _parse(data: bytes) -> tuple[dict[int, list[bytes]], dict[int, int]]:
    out: dict[int, list[bytes]] = {}
    ints: dict[int, int] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        key = varint()
        kind = key & 7
        if kind == 2:
            n = varint()
            out.setdefault(key >> 3, []).append(data[pos:pos + n])
            pos += n
        elif kind == 0:
            ints[key >> 3] = varint()
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise ValueError(f"unexpected wire type {kind}")
    return out, ints
