# mypy: disable-error-code="type-arg"
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Node(_message.Message):
    __slots__ = ("id", "cluster", "kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    id: str
    cluster: str
    kind: str
    def __init__(self, id: _Optional[str] = ..., cluster: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class ConfigRequest(_message.Message):
    __slots__ = ("node", "version_info", "response_nonce", "error_detail", "accept_delta", "resync", "full", "heartbeat")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_NONCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    node: Node
    version_info: str
    response_nonce: str
    error_detail: str
    accept_delta: bool
    resync: bool
    full: bool
    heartbeat: bool
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., version_info: _Optional[str] = ..., response_nonce: _Optional[str] = ..., error_detail: _Optional[str] = ..., accept_delta: _Optional[bool] = ..., resync: _Optional[bool] = ..., full: _Optional[bool] = ..., heartbeat: _Optional[bool] = ...) -> None: ...

class ConfigResponse(_message.Message):
    __slots__ = ("version_info", "nonce", "snapshot", "base_version", "replica", "current_version", "heartbeat")
    VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    version_info: str
    nonce: str
    snapshot: bytes
    base_version: str
    replica: str
    current_version: str
    heartbeat: bool
    def __init__(self, version_info: _Optional[str] = ..., nonce: _Optional[str] = ..., snapshot: _Optional[bytes] = ..., base_version: _Optional[str] = ..., replica: _Optional[str] = ..., current_version: _Optional[str] = ..., heartbeat: _Optional[bool] = ...) -> None: ...
