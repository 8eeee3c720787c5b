"""``GrpcCommunicator``: CrypTen's Communicator interface over :class:`PeerTransport`.

CrypTen's protocols call ``crypten.communicator.get()`` for every exchange; this class
answers those calls for one session, sending tensors as messages tagged with the
session id and a sequence number.  Statistics use CrypTen's own ``_logging`` decorator,
so rounds and bytes are counted exactly as for CrypTen's gloo communicator.

Collectives are built from point-to-point messages: every party sends its part to the
parties that need it, then receives; sends never block, so no ordering can deadlock.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from crypten.common import serial
from crypten.communicator.communicator import Communicator, _logging
from torch.distributed import ReduceOp

from ..proto.generated.peer_pb2 import PeerFrame
from .errors import ProtocolViolation
from .transport import PeerTransport

_TENSOR = PeerFrame.Kind.TENSOR
_OBJECT = PeerFrame.Kind.OBJECT

Tensors = torch.Tensor | Sequence[torch.Tensor]  # one tensor, or several when batched


def _is(op: object, wanted: object) -> bool:
    try:
        return op == wanted
    except TypeError:  # pragma: no cover - ReduceOp comparison quirks
        return False


def _combine(values: Sequence[torch.Tensor], op: ReduceOp.RedOpType | None) -> torch.Tensor:
    """Reduce per-rank tensors in rank order (identical on every party)."""
    out = values[0].clone()
    for v in values[1:]:
        if op is None or _is(op, ReduceOp.SUM):
            out.add_(v)
        elif _is(op, ReduceOp.BXOR):
            out.bitwise_xor_(v)
        elif _is(op, ReduceOp.BAND):
            out.bitwise_and_(v)
        elif _is(op, ReduceOp.BOR):
            out.bitwise_or_(v)
        elif _is(op, ReduceOp.PRODUCT):
            out.mul_(v)
        elif _is(op, ReduceOp.MAX):
            out = torch.maximum(out, v)
        elif _is(op, ReduceOp.MIN):
            out = torch.minimum(out, v)
        else:
            raise ValueError(f"unsupported reduce op {op}")
    return out


class _Completed:
    """Request object of a send that was already handed to the transport."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class _PendingRecv:
    """Request object of ``irecv``: ``wait()`` receives into the caller's tensor."""

    def __init__(self, comm: GrpcCommunicator, tensor: torch.Tensor, src: int) -> None:
        self._comm, self._tensor, self._src, self._done = comm, tensor, src, False

    def wait(self) -> None:
        if not self._done:
            self._tensor.data.copy_(self._comm._recv_tensor(self._src, like=self._tensor))
            self._done = True

    def is_completed(self) -> bool:
        return self._done


class GrpcCommunicator(Communicator):
    """CrypTen communicator for one session over a :class:`PeerTransport`."""

    BYTES_PER_ELEMENT = 8

    def __init__(self, transport: PeerTransport, session: str,
                 generations: dict[int, int] | None = None) -> None:
        self.transport = transport
        self.session = session
        self.rank = transport.rank
        self.world_size = transport.world_size
        self._name = f"rank{self.rank}"
        # The peers' link generations this session runs on (pinned by the caller, or now):
        # a peer that goes away, even if it comes back, fails every wait at once.
        self._generations = transport.begin_session(session, generations)
        self.reset_communication_stats()

    # -- CrypTen's class-level lifecycle (installation is done by mpc.runtime) -----------
    @classmethod
    def is_initialized(cls) -> bool:
        from . import runtime

        return isinstance(runtime.active_communicator(), cls)

    @classmethod
    def get(cls) -> GrpcCommunicator:
        from . import runtime

        return runtime.active_communicator()

    @classmethod
    def initialize(cls, **kwargs: object) -> NoReturn:
        raise RuntimeError("open a GrpcCommunicator with mpcvit.mpc.runtime.crypten_session")

    @classmethod
    def shutdown(cls) -> None:
        return None

    # -- point-to-point helpers ----------------------------------------------------------
    def _others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def _send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        self.transport.send_array(self.session, dst, tensor.detach().cpu().numpy())

    def _recv_tensor(self, src: int, like: torch.Tensor | None = None) -> torch.Tensor:
        msg = self.transport.recv(
            self.session, src, generation=self._generations.get(src), kind=_TENSOR
        )
        out = torch.from_numpy(msg.tensor_array())
        if like is not None:
            # Like gloo, only the element count and type must agree (CrypTen itself
            # sends a 0-d seed into a 1-element buffer).
            if out.nelement() != like.nelement() or out.dtype != like.dtype:
                raise ProtocolViolation(
                    f"party {src} sent a {tuple(out.shape)} {out.dtype} tensor where "
                    f"{tuple(like.shape)} {like.dtype} was expected (session {self.session!r})"
                )
            out = out.view(like.shape)
        return out

    def _send_many(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        """Send several same-dtype tensors as ONE message (fewer frames per round)."""
        if len(tensors) == 1:
            return self._send_tensor(tensors[0], dst)
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self._send_tensor(flat, dst)

    def _recv_many(self, likes: Sequence[torch.Tensor], src: int) -> list[torch.Tensor]:
        if len(likes) == 1:
            return [self._recv_tensor(src, like=likes[0])]
        total = sum(t.nelement() for t in likes)
        flat = self._recv_tensor(src)
        if flat.dim() != 1 or flat.nelement() != total or flat.dtype != likes[0].dtype:
            raise ProtocolViolation(f"party {src} sent a batch of the wrong size")
        out, offset = [], 0
        for t in likes:
            out.append(flat[offset : offset + t.nelement()].view(t.shape))
            offset += t.nelement()
        return out

    # -- Communicator interface ------------------------------------------------------------
    @_logging
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._send_tensor(tensor, dst)

    @_logging
    def recv(self, tensor: torch.Tensor, src: int | None = None) -> torch.Tensor:
        if src is None:
            raise ValueError("GrpcCommunicator.recv needs an explicit source party")
        return self._recv_tensor(src, like=tensor)

    @_logging
    def isend(self, tensor: torch.Tensor, dst: int) -> _Completed:
        self._send_tensor(tensor, dst)
        return _Completed()

    @_logging
    def irecv(self, tensor: torch.Tensor, src: int | None = None) -> _PendingRecv:
        if src is None:
            raise ValueError("GrpcCommunicator.irecv needs an explicit source party")
        return _PendingRecv(self, tensor, src)

    @_logging
    def scatter(self, scatter_list: Sequence[torch.Tensor], src: int,
                size: Sequence[int] | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
        if src == self.rank:
            for dst in self._others():
                self._send_tensor(scatter_list[dst], dst)
            return scatter_list[self.rank].data
        tensor = self._recv_tensor(src)
        if size is not None and tuple(tensor.shape) != tuple(size):
            raise ProtocolViolation(f"party {src} scattered a tensor of the wrong shape")
        return tensor

    def _receive_and_combine(self, tensors: list[torch.Tensor],
                             op: ReduceOp.RedOpType | None) -> list[torch.Tensor]:
        """Every other party's version of ``tensors``, reduced with ours in rank order."""
        received = {src: self._recv_many(tensors, src) for src in self._others()}
        received[self.rank] = tensors
        return [
            _combine([received[r][i] for r in range(self.world_size)], op)
            for i in range(len(tensors))
        ]

    @_logging
    def reduce(self, input: Tensors, dst: int, op: ReduceOp.RedOpType = ReduceOp.SUM,
               batched: bool = False) -> torch.Tensor | list[torch.Tensor] | None:
        tensors = list(input) if batched else [input]
        if self.rank != dst:
            self._send_many(tensors, dst)
            return None
        result = self._receive_and_combine(tensors, op)
        return result if batched else result[0]

    @_logging
    def all_reduce(self, input: Tensors, op: ReduceOp.RedOpType = ReduceOp.SUM,
                   batched: bool = False) -> torch.Tensor | list[torch.Tensor]:
        tensors = list(input) if batched else [input]
        for dst in self._others():
            self._send_many(tensors, dst)
        result = self._receive_and_combine(tensors, op)
        return result if batched else result[0]

    @_logging
    def gather(self, tensor: torch.Tensor, dst: int) -> list[torch.Tensor | None]:
        if self.rank != dst:
            self._send_tensor(tensor, dst)
            return [None]
        return [
            tensor.data.clone() if r == self.rank else self._recv_tensor(r, like=tensor)
            for r in range(self.world_size)
        ]

    @_logging
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        for dst in self._others():
            self._send_tensor(tensor, dst)
        return [
            tensor.data.clone() if r == self.rank else self._recv_tensor(r, like=tensor)
            for r in range(self.world_size)
        ]

    @_logging
    def broadcast(self, input: Tensors, src: int, group: object = None,
                  batched: bool = False) -> Tensors:
        tensors = list(input) if batched else [input]
        if self.rank == src:
            for dst in self._others():
                self._send_many(tensors, dst)
        else:
            for t, value in zip(tensors, self._recv_many(tensors, src), strict=True):
                t.data.copy_(value)
        return input

    @_logging
    def barrier(self) -> None:
        token = torch.zeros(1, dtype=torch.long)
        for dst in self._others():
            self._send_tensor(token, dst)
        for src in self._others():
            self._recv_tensor(src, like=token)

    @_logging
    def send_obj(self, obj: object, dst: int, group: object = None) -> None:
        self.transport.send_bytes(self.session, dst, pickle.dumps(obj), _OBJECT)

    @_logging
    def recv_obj(self, src: int, group: object = None) -> Any:
        return self._recv_obj(src)

    def _recv_obj(self, src: int) -> Any:
        msg = self.transport.recv(
            self.session, src, generation=self._generations.get(src), kind=_OBJECT
        )
        # CrypTen's restricted unpickler: a peer cannot make us run arbitrary code.
        return serial.restricted_loads(bytes(msg.payload))

    @_logging
    def broadcast_obj(self, obj: Any, src: int, group: object = None) -> Any:
        if self.rank == src:
            data = pickle.dumps(obj)
            for dst in self._others():
                self.transport.send_bytes(self.session, dst, data, _OBJECT)
            return obj
        return self._recv_obj(src)

    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_ttp_rank(self) -> int:
        return self.world_size

    def set_name(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError("party name must be a string")
        self._name = name

    def get_name(self) -> str:
        return self._name

