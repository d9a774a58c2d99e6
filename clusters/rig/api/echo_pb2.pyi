# mypy: disable-error-code="type-arg"
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CallRequest(_message.Message):
    __slots__ = ("text", "delay_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    delay_ms: int
    def __init__(self, text: _Optional[str] = ..., delay_ms: _Optional[int] = ...) -> None: ...

class CallReply(_message.Message):
    __slots__ = ("cluster", "pod", "text")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    pod: str
    text: str
    def __init__(self, cluster: _Optional[str] = ..., pod: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ControlRequest(_message.Message):
    __slots__ = ("set_fail_ratio", "fail_ratio")
    SET_FAIL_RATIO_FIELD_NUMBER: _ClassVar[int]
    FAIL_RATIO_FIELD_NUMBER: _ClassVar[int]
    set_fail_ratio: bool
    fail_ratio: float
    def __init__(self, set_fail_ratio: _Optional[bool] = ..., fail_ratio: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("calls", "failed", "fail_ratio")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    FAIL_RATIO_FIELD_NUMBER: _ClassVar[int]
    calls: int
    failed: int
    fail_ratio: float
    def __init__(self, calls: _Optional[int] = ..., failed: _Optional[int] = ..., fail_ratio: _Optional[float] = ...) -> None: ...
