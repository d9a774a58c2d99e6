from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SignRequest(_message.Message):
    __slots__ = ("csr_pem", "token", "ttl_seconds")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    token: str
    ttl_seconds: int
    def __init__(self, csr_pem: _Optional[bytes] = ..., token: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("cert_chain_pem", "trust_anchors_pem", "spiffe_id")
    CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_ANCHORS_PEM_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    cert_chain_pem: bytes
    trust_anchors_pem: bytes
    spiffe_id: str
    def __init__(self, cert_chain_pem: _Optional[bytes] = ..., trust_anchors_pem: _Optional[bytes] = ..., spiffe_id: _Optional[str] = ...) -> None: ...
