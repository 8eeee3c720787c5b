"""The InferenceService: request validation and result collection (plain), plus the
thin gRPC servicer over it.

:class:`PartyService` is testable without a network: it turns an ``InferRequest`` into
queued halves (or a :class:`ServiceError` with the right status) and waits for their
results.  :class:`InferenceServicer` only maps between gRPC and that class.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, NoReturn, Protocol

import grpc
import numpy as np
from mpcvit.mpc.roles import Allowed, RoleChecker
from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc

from . import shares
from .config import ServiceLimits
from .pairing import (
    PendingRequest,
    RequestResult,
    ServiceError,
    check_request_id,
)

if TYPE_CHECKING:
    from .backend import ModelFacts

log = logging.getLogger("mpcvit.party")


class RequestSink(Protocol):
    """Where validated halves go (the coordinator: pairing table + announcements)."""

    def submit(self, items: list[PendingRequest]) -> None: ...

    def cancel(self, request_ids: list[str], status: str = ..., message: str = ...) -> None: ...


class PartyService:
    """Validates requests against the served model and the limits; hands their halves on.

    ``facts`` returns the public ``ModelFacts`` (or None while party 1 has not received
    the model yet); ``ready`` says whether the secure model is usable and ``reason`` why
    not (peer not connected, dealer unreachable, weights being shared...).
    """

    def __init__(self, rank: int, requests: RequestSink, limits: ServiceLimits,
                 facts: Callable[[], ModelFacts | None], ready: Callable[[], bool], *,
                 reason: Callable[[], str] | None = None,
                 precision_bits: int = shares.DEFAULT_PRECISION_BITS,
                 request_timeout: float = 300.0) -> None:
        self.rank = rank
        self.requests = requests
        self.limits = limits
        self._facts = facts
        self._ready = ready
        self._reason = reason or (lambda: "peer not connected yet")
        self.precision_bits = precision_bits
        self.request_timeout = request_timeout

    def _model(self, name: str) -> ModelFacts:
        facts = self._facts()
        if facts is None:
            raise ServiceError("UNAVAILABLE", "party has not received the model from party 0 "
                                              f"yet ({self._reason()})")
        if name and name != facts.name:
            raise ServiceError("NOT_FOUND", f"unknown model {name!r}; this party serves "
                                            f"{facts.name!r}")
        return facts

    def model_info(self, request: inference_pb2.ModelInfoRequest) -> inference_pb2.ModelInfo:
        facts = self._model(request.model)
        ready = bool(self._ready())
        return inference_pb2.ModelInfo(
            name=facts.name, input_shape=list(facts.input_shape),
            num_classes=facts.num_classes, class_names=list(facts.class_names),
            precision_bits=self.precision_bits, mean=list(facts.mean), std=list(facts.std),
            max_request_bytes=self.limits.max_request_bytes,
            max_inputs_per_request=self.limits.max_inputs_per_request,
            max_session_batch=self.limits.max_batch, party=self.rank,
            ready=ready, not_ready_reason="" if ready else self._reason(),
            models=[facts.name],
        )

    def validate(self, request: inference_pb2.InferRequest) -> list[PendingRequest]:
        """Check everything about a request before any of it is queued."""
        facts = self._model(request.model)
        if not self._ready():
            raise ServiceError("UNAVAILABLE", f"secure model not ready: {self._reason()}")
        inputs = request.inputs
        if not inputs:
            raise ServiceError("INVALID_ARGUMENT", "request has no inputs")
        if len(inputs) > self.limits.max_inputs_per_request:
            raise ServiceError("RESOURCE_EXHAUSTED", f"{len(inputs)} inputs in one request; "
                               f"the limit is {self.limits.max_inputs_per_request}")
        total = sum(len(it.share) for it in inputs)
        if total > self.limits.max_request_bytes:
            raise ServiceError("RESOURCE_EXHAUSTED", f"request carries {total} share bytes; "
                               f"the limit is {self.limits.max_request_bytes}")
        expected = tuple(facts.input_shape)
        items = []
        for it in inputs:
            check_request_id(it.request_id)
            shape = tuple(int(d) for d in it.shape)
            if shape != expected:
                raise ServiceError("INVALID_ARGUMENT", f"input {it.request_id!r} has shape "
                                   f"{shape}; model {facts.name!r} takes {expected}")
            try:
                share = shares.from_bytes(it.share, shape)
            except ValueError as exc:
                raise ServiceError("INVALID_ARGUMENT", f"input {it.request_id!r}: {exc}") from None
            items.append(PendingRequest(it.request_id, facts.name, share))
        return items

    def infer(self, request: inference_pb2.InferRequest, time_remaining: float | None,
              on_done: Callable[[Callable[[], None]], object] | None = None,
              ) -> inference_pb2.InferResponse:
        """Hand the request's halves on and wait for their output shares."""
        items = self.validate(request)
        self.requests.submit(items)
        ids = [it.request_id for it in items]
        if on_done is not None:
            # The RPC ended (answered, cancelled or timed out): drop halves still held.
            on_done(lambda: self.requests.cancel(ids))
        budget = self.request_timeout + 60.0
        if time_remaining is not None and math.isfinite(time_remaining):
            budget = min(budget, max(0.0, time_remaining))
        deadline = time.monotonic() + budget
        results: list[RequestResult] = []
        try:
            for it in items:
                results.append(it.future.result(timeout=max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            self.requests.cancel(ids, "DEADLINE_EXCEEDED", "deadline exceeded")
            raise ServiceError("DEADLINE_EXCEEDED",
                               "request did not complete before its deadline") from None
        except ServiceError:
            self.requests.cancel(ids)
            raise
        return inference_pb2.InferResponse(party=self.rank, outputs=[
            inference_pb2.OutputShare(
                request_id=r.request_id, shape=list(r.share.shape),
                share=shares.to_bytes(np.asarray(r.share, dtype=np.int64)),
                precision_bits=r.precision_bits,
                stats=inference_pb2.RequestStats(
                    seconds=r.stats.seconds, queue_seconds=r.queue_seconds,
                    rounds=r.stats.rounds, bytes_sent=r.stats.bytes_sent,
                    batch_size=r.stats.batch_size, session=r.stats.session),
            )
            for r in results
        ])


def _abort(context: grpc.ServicerContext, err: ServiceError) -> NoReturn:
    code = getattr(grpc.StatusCode, err.status, grpc.StatusCode.UNKNOWN)
    context.abort(code, err.message)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """gRPC face of :class:`PartyService` (maps ServiceError to status codes).

    Only clients may call it (``mpcvit://client/*``, or the names in ``allowed``): a party
    or the dealer has no business sending images, and a party that could would see both
    halves of what it sent."""

    def __init__(self, service: PartyService, roles: RoleChecker | None = None,
                 allowed: Allowed | None = None) -> None:
        self.service = service
        self.roles = roles or RoleChecker(None)
        self.allowed = allowed or Allowed.clients()

    def Infer(self, request: inference_pb2.InferRequest,  # noqa: N802 (gRPC method name)
              context: grpc.ServicerContext) -> inference_pb2.InferResponse:
        self.roles.check(context, self.allowed)
        started = time.monotonic()
        n = len(request.inputs)
        try:
            response = self.service.infer(request, context.time_remaining(),
                                          context.add_callback)
        except ServiceError as err:
            log.info("event=infer_rejected party=%d inputs=%d status=%s reason=%s",
                     self.service.rank, n, err.status, err.message)
            _abort(context, err)
        log.info("event=infer_done party=%d inputs=%d seconds=%.3f", self.service.rank, n,
                 time.monotonic() - started)
        return response

    def GetModelInfo(self, request: inference_pb2.ModelInfoRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> inference_pb2.ModelInfo:
        self.roles.check(context, self.allowed)
        try:
            return self.service.model_info(request)
        except ServiceError as err:
            _abort(context, err)
