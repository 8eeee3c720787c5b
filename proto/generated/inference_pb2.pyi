from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputShare(_message.Message):
    __slots__ = ("request_id", "shape", "share")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    share: bytes
    def __init__(self, request_id: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., share: _Optional[bytes] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[InputShare]
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[InputShare, _Mapping]]] = ...) -> None: ...

class RequestStats(_message.Message):
    __slots__ = ("seconds", "queue_seconds", "rounds", "bytes_sent", "batch_size", "session")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    queue_seconds: float
    rounds: int
    bytes_sent: int
    batch_size: int
    session: str
    def __init__(self, seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., rounds: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., batch_size: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class OutputShare(_message.Message):
    __slots__ = ("request_id", "shape", "share", "precision_bits", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_BITS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    share: bytes
    precision_bits: int
    stats: RequestStats
    def __init__(self, request_id: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., share: _Optional[bytes] = ..., precision_bits: _Optional[int] = ..., stats: _Optional[_Union[RequestStats, _Mapping]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("party", "outputs")
    PARTY_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    party: int
    outputs: _containers.RepeatedCompositeFieldContainer[OutputShare]
    def __init__(self, party: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[OutputShare, _Mapping]]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "input_shape", "num_classes", "class_names", "precision_bits", "mean", "std", "max_request_bytes", "max_inputs_per_request", "party", "ready", "models", "max_session_batch", "not_ready_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_BITS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_BATCH_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    precision_bits: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    max_request_bytes: int
    max_inputs_per_request: int
    party: int
    ready: bool
    models: _containers.RepeatedScalarFieldContainer[str]
    max_session_batch: int
    not_ready_reason: str
    def __init__(self, name: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., precision_bits: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., max_request_bytes: _Optional[int] = ..., max_inputs_per_request: _Optional[int] = ..., party: _Optional[int] = ..., ready: _Optional[bool] = ..., models: _Optional[_Iterable[str]] = ..., max_session_batch: _Optional[int] = ..., not_ready_reason: _Optional[str] = ...) -> None: ...
