"""tf.train.Example without TensorFlow: encode shard records in TensorFlow's wire format.

The TFRecord shards hold serialized `tensorflow.Example` messages. Depending on TensorFlow
(hundreds of MB, its own protobuf pin) only to build them is not worth it, and checked-in
generated `_pb2` code ties the repository to one protoc/protobuf version. So the message
classes are built here at import time from a `FileDescriptorProto` written out in Python:
the same package, message names, field numbers and types as TensorFlow's
`tensorflow/core/example/{example,feature}.proto`, hence the same bytes on the wire, and
`tf.data.TFRecordDataset` + `tf.io.parse_single_example` read the shards unchanged.

The descriptors live in a private `DescriptorPool`, not protobuf's default pool, so that a
process that also imports TensorFlow (or any other copy of `tensorflow.Example`) does not
get a duplicate-symbol error.

Feature layout: one feature per dataclass field that declares a `tf` name in its metadata
(see `transforms.schema`); the list kind follows the field's Arrow type. Use
`feature_spec_markdown(Sample)` for the documented table.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "BytesList",
    "Example",
    "Feature",
    "Features",
    "FloatList",
    "Int64List",
    "encode_example",
    "feature_kinds",
    "feature_spec_markdown",
]

_PACKAGE = "tensorflow"
_FDP = descriptor_pb2.FieldDescriptorProto


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(
        # A name of our own: the private pool never sees TensorFlow's example.proto.
        name="entityforge/tensorflow_example.proto",
        package=_PACKAGE,
        syntax="proto3",
    )

    def add_field(msg, name, number, ftype, label=_FDP.LABEL_OPTIONAL, type_name=None, packed=False):
        field = msg.field.add(name=name, number=number, type=ftype, label=label)
        if type_name:
            field.type_name = type_name
        if packed:
            field.options.packed = True
        return field

    for name, ftype, packed in (
        ("BytesList", _FDP.TYPE_BYTES, False),
        ("FloatList", _FDP.TYPE_FLOAT, True),
        ("Int64List", _FDP.TYPE_INT64, True),
    ):
        msg = fdp.message_type.add(name=name)
        add_field(msg, "value", 1, ftype, _FDP.LABEL_REPEATED, packed=packed)

    feature = fdp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, list_type) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), start=1
    ):
        field = add_field(feature, name, number, _FDP.TYPE_MESSAGE, type_name=f".{_PACKAGE}.{list_type}")
        field.oneof_index = 0

    # map<string, Feature> feature = 1 is, on the wire and in descriptors, a repeated
    # nested FeatureEntry{key = 1, value = 2} flagged as a map entry.
    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    add_field(entry, "key", 1, _FDP.TYPE_STRING)
    add_field(entry, "value", 2, _FDP.TYPE_MESSAGE, type_name=f".{_PACKAGE}.Feature")
    add_field(
        features, "feature", 1, _FDP.TYPE_MESSAGE, _FDP.LABEL_REPEATED,
        type_name=f".{_PACKAGE}.Features.FeatureEntry",
    )

    example = fdp.message_type.add(name="Example")
    add_field(example, "features", 1, _FDP.TYPE_MESSAGE, type_name=f".{_PACKAGE}.Features")
    return fdp


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())


def _message_class(name: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


BytesList = _message_class("BytesList")
FloatList = _message_class("FloatList")
Int64List = _message_class("Int64List")
Feature = _message_class("Feature")
Features = _message_class("Features")
Example = _message_class("Example")


def _kind_of(arrow_type: pa.DataType) -> str:
    if (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or pa.types.is_binary(arrow_type)
        or pa.types.is_large_binary(arrow_type)
        or pa.types.is_fixed_size_binary(arrow_type)
    ):
        return "bytes_list"
    if pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type):
        return "int64_list"
    if pa.types.is_floating(arrow_type):
        return "float_list"
    raise TypeError(f"no tf.train.Feature kind for Arrow type {arrow_type}")


def _is_nullable(hint) -> bool:
    return type(None) in typing.get_args(hint)


@functools.cache
def _layout(cls) -> tuple[tuple[str, str, str, bool, str], ...]:
    """(field name, feature name, kind, nullable, doc) for every field with a `tf` name."""
    hints = typing.get_type_hints(cls)
    layout = []
    for f in dataclasses.fields(cls):
        feature_name = f.metadata.get("tf")
        if not feature_name:
            continue
        layout.append(
            (f.name, feature_name, _kind_of(f.metadata["arrow"]), _is_nullable(hints[f.name]), f.metadata.get("doc", ""))
        )
    if not layout:
        raise TypeError(f"{cls.__name__} declares no tf feature names")
    return tuple(layout)


def feature_kinds(cls) -> dict[str, str]:
    """feature name -> "bytes_list" | "float_list" | "int64_list" for a record type."""
    return {feature: kind for _, feature, kind, _, _ in _layout(cls)}


def _to_bytes(field: str, value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{field}: expected str or bytes, got {type(value).__name__}")


def _to_int(field: str, value) -> int:
    # bool is an int subclass; a float is refused rather than silently truncated.
    if isinstance(value, int):
        return int(value)
    raise TypeError(f"{field}: expected int, got {type(value).__name__}")


def _to_float(field: str, value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{field}: expected float, got {type(value).__name__}")


_CONVERT = {"bytes_list": _to_bytes, "int64_list": _to_int, "float_list": _to_float}


def encode_example(record) -> bytes:
    """Serialize a record (a `Sample`, or any dataclass whose fields carry `tf` names) as a
    `tf.train.Example`.

    str -> bytes_list (UTF-8), bytes -> bytes_list, int/bool -> int64_list, float ->
    float_list (float32 on the wire). Every feature is present in every example: a None
    value is written as an EMPTY list of its kind. Parse nullable features with
    `tf.io.VarLenFeature` (a null is an empty sparse tensor). `tf.io.FixedLenFeature`
    suits only the non-nullable features: TensorFlow uses a FixedLenFeature's
    `default_value` only for a feature that is absent, and a present feature with zero
    values is a "Number of ... values != expected" error, default or not. A value of the
    wrong Python type raises TypeError naming the field. Map entries are serialized in
    key order, so equal records give equal bytes.
    """
    example = Example()
    features = example.features.feature
    for field_name, feature_name, kind, _, _ in _layout(type(record)):
        value = getattr(record, field_name)
        values = getattr(features[feature_name], kind)
        # Marks the oneof as set even when nothing is appended: an empty list, not a
        # missing kind.
        values.SetInParent()
        if value is not None:
            values.value.append(_CONVERT[kind](field_name, value))
    return example.SerializeToString(deterministic=True)


def feature_spec_markdown(cls) -> str:
    """The feature table of a record type, as Markdown (for the README)."""
    lines = [
        "| feature | kind | field | nullable | meaning |",
        "|---|---|---|---|---|",
    ]
    for field_name, feature_name, kind, nullable, doc in _layout(cls):
        doc = doc.replace("|", "\\|")  # a bare | would split the table cell
        lines.append(
            f"| `{feature_name}` | {kind} | `{field_name}` | {'yes (empty list)' if nullable else 'no'} | {doc} |"
        )
    return "\n".join(lines) + "\n"


def decode_example(data: bytes, cls):
    """Parse a serialized `tf.train.Example` written by `encode_example` back into `cls`.

    An empty list is None for a nullable field; a missing feature takes the field's default.
    Raises ValueError when the bytes are not an Example or a non-nullable feature is empty.
    """
    from google.protobuf.message import DecodeError

    example = Example()
    try:
        example.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(f"not a tf.train.Example: {e}") from e
    features = example.features.feature
    hints = typing.get_type_hints(cls)
    values = {}
    for field_name, feature_name, kind, nullable, _ in _layout(cls):
        if feature_name not in features:
            continue
        items = list(getattr(features[feature_name], kind).value)
        if not items:
            if nullable:
                values[field_name] = None
                continue
            raise ValueError(f"feature {feature_name!r} is empty but {field_name} is not nullable")
        v = items[0]
        hint = typing.get_args(hints[field_name]) or (hints[field_name],)
        if kind == "bytes_list":
            values[field_name] = v if bytes in hint else v.decode("utf-8")
        elif bool in hint:
            values[field_name] = bool(v)
        else:
            values[field_name] = v
    return cls(**values)
