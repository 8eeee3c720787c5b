from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PeerFrame(_message.Message):
    __slots__ = ("session", "seq", "src", "chunk", "chunks", "kind", "dtype", "shape", "payload", "cluster", "incarnation")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TENSOR: _ClassVar[PeerFrame.Kind]
        OBJECT: _ClassVar[PeerFrame.Kind]
        CONTROL: _ClassVar[PeerFrame.Kind]
        HELLO: _ClassVar[PeerFrame.Kind]
        ABORT: _ClassVar[PeerFrame.Kind]
    TENSOR: PeerFrame.Kind
    OBJECT: PeerFrame.Kind
    CONTROL: PeerFrame.Kind
    HELLO: PeerFrame.Kind
    ABORT: PeerFrame.Kind
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    session: str
    seq: int
    src: int
    chunk: int
    chunks: int
    kind: PeerFrame.Kind
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    cluster: str
    incarnation: str
    def __init__(self, session: _Optional[str] = ..., seq: _Optional[int] = ..., src: _Optional[int] = ..., chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., kind: _Optional[_Union[PeerFrame.Kind, str]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ..., cluster: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("init", "init_ack", "prepare", "prepared", "batch", "ready", "hello", "arrived", "dropped", "status")
    INIT_FIELD_NUMBER: _ClassVar[int]
    INIT_ACK_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    init: Init
    init_ack: InitAck
    prepare: Prepare
    prepared: Prepared
    batch: Batch
    ready: Ready
    hello: Hello
    arrived: Arrived
    dropped: Dropped
    status: LeaderStatus
    def __init__(self, init: _Optional[_Union[Init, _Mapping]] = ..., init_ack: _Optional[_Union[InitAck, _Mapping]] = ..., prepare: _Optional[_Union[Prepare, _Mapping]] = ..., prepared: _Optional[_Union[Prepared, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., ready: _Optional[_Union[Ready, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., arrived: _Optional[_Union[Arrived, _Mapping]] = ..., dropped: _Optional[_Union[Dropped, _Mapping]] = ..., status: _Optional[_Union[LeaderStatus, _Mapping]] = ...) -> None: ...

class Half(_message.Message):
    __slots__ = ("request_id", "model", "shape")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Init(_message.Message):
    __slots__ = ("session", "epoch", "model_json")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    session: str
    epoch: str
    model_json: str
    def __init__(self, session: _Optional[str] = ..., epoch: _Optional[str] = ..., model_json: _Optional[str] = ...) -> None: ...

class InitAck(_message.Message):
    __slots__ = ("session", "ok", "reason")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session: str
    ok: bool
    reason: str
    def __init__(self, session: _Optional[str] = ..., ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Prepare(_message.Message):
    __slots__ = ("session", "epoch", "batch")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    session: str
    epoch: str
    batch: int
    def __init__(self, session: _Optional[str] = ..., epoch: _Optional[str] = ..., batch: _Optional[int] = ...) -> None: ...

class Prepared(_message.Message):
    __slots__ = ("session", "ok", "reason")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session: str
    ok: bool
    reason: str
    def __init__(self, session: _Optional[str] = ..., ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("session", "epoch", "halves")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HALVES_FIELD_NUMBER: _ClassVar[int]
    session: str
    epoch: str
    halves: _containers.RepeatedCompositeFieldContainer[Half]
    def __init__(self, session: _Optional[str] = ..., epoch: _Optional[str] = ..., halves: _Optional[_Iterable[_Union[Half, _Mapping]]] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("session", "ok", "missing", "need_weights")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    NEED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    session: str
    ok: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    need_weights: bool
    def __init__(self, session: _Optional[str] = ..., ok: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., need_weights: _Optional[bool] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("epoch", "need_weights")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    need_weights: bool
    def __init__(self, epoch: _Optional[str] = ..., need_weights: _Optional[bool] = ...) -> None: ...

class Arrived(_message.Message):
    __slots__ = ("halves",)
    HALVES_FIELD_NUMBER: _ClassVar[int]
    halves: _containers.RepeatedCompositeFieldContainer[Half]
    def __init__(self, halves: _Optional[_Iterable[_Union[Half, _Mapping]]] = ...) -> None: ...

class Dropped(_message.Message):
    __slots__ = ("request_ids", "cause", "reason")
    class Cause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CANCELLED: _ClassVar[Dropped.Cause]
        EXPIRED: _ClassVar[Dropped.Cause]
        FAILED: _ClassVar[Dropped.Cause]
    CANCELLED: Dropped.Cause
    EXPIRED: Dropped.Cause
    FAILED: Dropped.Cause
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    cause: Dropped.Cause
    reason: str
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., cause: _Optional[_Union[Dropped.Cause, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaderStatus(_message.Message):
    __slots__ = ("ready", "reason")
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    reason: str
    def __init__(self, ready: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class PeerStreamSummary(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: int
    def __init__(self, frames: _Optional[int] = ...) -> None: ...
