"""Client SDK: classify images privately with two non-colluding party servers.

The client encodes each image in fixed point, splits it into two additive shares with
the OS's secure random source, sends one share to each party under one request id, and
adds the two output shares it gets back.  Neither party alone learns the image or the
logits.  Dependencies: numpy, grpcio and protobuf only (no torch, no CrypTen), so the SDK
runs anywhere a client runs.

    with PrivateInferenceClient(["p0:50051", "p1:50052"]) as client:
        prediction = client.infer(image)          # image: float32 (C, H, W), normalised
        print(prediction.top_k(3))
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from mpcvit.party import shares
from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc

__all__ = [
    "ClientError",
    "ClientTls",
    "InvalidInput",
    "ModelInfo",
    "ModelNotFound",
    "PartiesDisagree",
    "PartyStats",
    "PartyUnavailable",
    "Prediction",
    "PrivateInferenceClient",
    "RequestAborted",
    "RequestTimeout",
    "RequestTooLarge",
    "error_from_rpc",
]


# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A private inference failed; ``code`` is the gRPC status, ``party`` who reported it."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 party: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.party = party


class InvalidInput(ClientError):
    """A party rejected the request's content (shape, size, id, encoding)."""


class RequestTooLarge(ClientError):
    """The request exceeds a party's configured size or batch limit."""


class ModelNotFound(ClientError):
    """The parties do not serve the requested model."""


class PartyUnavailable(ClientError):
    """A party is unreachable, not ready, or lost its peer during the request."""


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
}


def error_from_rpc(exc: grpc.RpcError, party: int) -> ClientError:
    """Map a gRPC failure of ``party`` to the matching ClientError subclass."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _ERRORS_BY_CODE.get(code, ClientError)
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"party {party}: {name}: {details}", code=code, party=party)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ClientTls:
    """Mutual TLS: the CA that signed the parties and this client's certificate pair.

    ``server_name`` overrides the host name checked in the parties' certificates.
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
    """Public encoding facts of a served model (see ``inference.proto``)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    precision_bits: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_request_bytes: int
    max_batch: int
    models: tuple[str, ...]

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
            max_batch=int(msg.max_batch),
            models=tuple(msg.models),
        )

    def preprocess(self, image_uint8: np.ndarray) -> np.ndarray:
        """uint8 pixels (HW, HWC or CHW) -> the normalised float32 (C, H, W) the model expects."""
        c, h, w = self.input_shape
        a = np.asarray(image_uint8)
        if a.shape == (h, w) and c == 1:
            a = a[None]
        elif a.shape == (h, w, c):
            a = a.transpose(2, 0, 1)
        elif a.shape != (c, h, w):
            raise ValueError(f"image shape {a.shape} does not fit model input {self.input_shape}")
        x = a.astype(np.float32) / np.float32(255.0)
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
    ) -> None:
        if len(parties) != 2:
            raise ValueError(f"need exactly two party addresses, got {len(parties)}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.model = model
        self.timeout = float(timeout)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls is not None and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        if tls is None:
            self._channels = [grpc.insecure_channel(a, options=options) for a in parties]
        else:
            creds = tls.credentials()
            self._channels = [grpc.secure_channel(a, creds, options=options) for a in parties]
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
        infos = [ModelInfo.from_proto(r) for r in replies]
        for msg, party in zip(replies, (0, 1), strict=True):
            if not msg.ready:
                raise PartyUnavailable(f"party {party}: model not ready yet", party=party)
        a, b = infos
        if (a.input_shape, a.num_classes, a.precision_bits) != (
            b.input_shape, b.num_classes, b.precision_bits
        ):
            raise PartiesDisagree(f"parties describe the model differently: {a} vs {b}")
        self._info[self.model] = a
        return a

    def infer(self, image: np.ndarray, *, preprocessed: bool | None = None) -> Prediction:
        """Classify one image: uint8 pixels, or a normalised float (C, H, W) array."""
        return self.infer_batch([image], preprocessed=preprocessed)[0]

    def infer_batch(
        self, images: Sequence[np.ndarray] | np.ndarray, *, preprocessed: bool | None = None
    ) -> list[Prediction]:
        """Classify several images in one round trip to each party.

        ``preprocessed=None`` treats uint8 arrays as raw pixels and floats as already
        normalised (C, H, W).
        """
        info = self.model_info()
        if len(images) == 0:
            return []
        xs = [self._prepare(img, info, preprocessed) for img in images]
        # Stay within the parties' advertised limits: split into several calls if needed.
        per_image = int(np.prod(info.input_shape)) * shares.RING_BYTES
        chunk = len(xs)
        if info.max_batch:
            chunk = min(chunk, info.max_batch)
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

    @staticmethod
    def _prepare(image: np.ndarray, info: ModelInfo, preprocessed: bool | None) -> np.ndarray:
        a = np.asarray(image)
        if preprocessed is None:
            preprocessed = a.dtype != np.uint8
        if not preprocessed:
            return info.preprocess(a)
        if a.shape != info.input_shape:
            raise ValueError(f"input shape {a.shape} != model input {info.input_shape}")
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
                    raise error_from_rpc(exc, party) from None
                raise ClientError(f"party {party}: {exc}", party=party) from exc
            results[party] = future.result()
        return results
