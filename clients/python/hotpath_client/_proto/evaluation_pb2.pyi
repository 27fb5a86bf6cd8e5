from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Label(_message.Message):
    __slots__ = ("id", "row", "int_value", "number_value", "string_value", "bool_value")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    id: str
    row: int
    int_value: int
    number_value: float
    string_value: str
    bool_value: bool
    def __init__(self, id: _Optional[str] = ..., row: _Optional[int] = ..., int_value: _Optional[int] = ..., number_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bool_value: bool = ...) -> None: ...

class AttachLabelsRequest(_message.Message):
    __slots__ = ("model_name", "labels")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, model_name: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class AttachLabelsResponse(_message.Message):
    __slots__ = ("attached", "unknown", "unknown_ids")
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    attached: int
    unknown: int
    unknown_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, attached: _Optional[int] = ..., unknown: _Optional[int] = ..., unknown_ids: _Optional[_Iterable[str]] = ...) -> None: ...
