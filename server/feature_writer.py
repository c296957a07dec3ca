"""Rows written where Feast's Redis store keeps them, without Feast's writer.

The mirror of :class:`avrec.server.feature_reader.ViewReader`: one hash per entity, a serialized
``ValueProto`` per feature and the row's stamp in ``_ts:<view>``. The values are built as
Feast's ``python_values_to_proto_values`` builds them (checked byte for byte in
``tests/server/test_incremental.py``); that function costs 0.5-0.7 ms for one 1,000-long
list, more than a whole incremental update, so it is not called per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, Value
from google.protobuf.timestamp_pb2 import Timestamp

from avrec.server.feature_reader import ViewReader

if TYPE_CHECKING:
    from collections.abc import Callable

    from feast import FeatureStore


def _value(kind: str, value: Any) -> Value:
    """One feature value as Feast's ``python_values_to_proto_values`` makes it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Value()
    if kind == "INT64":
        return Value(int64_val=value)
    if kind == "DOUBLE":
        return Value(double_val=value)
    if kind == "UNIX_TIMESTAMP":  # microseconds in, whole seconds stored (as Feast does)
        return Value(unix_timestamp_val=value // 1_000_000)
    if kind == "FLOAT_LIST":
        return Value(float_list_val=FloatList(val=value))
    if kind == "INT64_LIST":
        return Value(int64_list_val=Int64List(val=value))
    raise TypeError(f"no raw encoding for {kind}")


def _serialized(kind: str, value: Any) -> bytes:
    return _value(kind, value).SerializeToString()


_LISTS = frozenset({"FLOAT_LIST", "INT64_LIST"})
SCALAR_CACHE = 1 << 16  # serialized scalars each writer keeps (counts and times repeat)


@dataclass(frozen=True)
class ViewWriter:
    """Writes rows of one view where Feast's Redis store keeps them (see ViewReader)."""

    reader: ViewReader
    kinds: tuple[str, ...]
    _scalar: Callable[[str, Any], bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # serialized scalars, memoised per writer (3-4 µs each to build)
        object.__setattr__(self, "_scalar", lru_cache(maxsize=SCALAR_CACHE)(_serialized))

    @classmethod
    def from_store(cls, store: FeatureStore, view_name: str) -> ViewWriter:
        """The writer of ``view_name`` (its features' value types from the registry)."""
        view = store.get_feature_view(view_name)
        kinds = tuple(f.dtype.to_value_type().name for f in view.features)
        return cls(ViewReader.from_store(store, view_name), kinds)

    def mapping(self, stamp_us: int, values: dict[str, Any]) -> dict[bytes | str, bytes]:
        """The hash fields of one row: each feature's ``ValueProto`` and ``_ts:<view>``."""
        reader = self.reader
        out: dict[bytes | str, bytes] = {
            hash_field: (_serialized(kind, values[name]) if kind in _LISTS
                         else self._scalar(kind, values[name]))
            for name, kind, hash_field in zip(reader.features, self.kinds, reader.fields,
                                         strict=False)}
        seconds, rest = divmod(stamp_us, 1_000_000)
        out[reader.fields[-1]] = Timestamp(seconds=seconds, nanos=rest * 1000).SerializeToString()
        return out


def stamp_us(raw: bytes | None) -> int | None:
    """A row stamp (``_ts:<view>`` bytes) as integer microseconds; None when absent."""
    if raw is None:
        return None
    stamp = Timestamp()
    stamp.ParseFromString(raw)
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000
