from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
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

class PeerStreamSummary(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: int
    def __init__(self, frames: _Optional[int] = ...) -> None: ...
