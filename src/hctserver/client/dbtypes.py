"""Values between Python and the database, as :mod:`sqlite3` converts them.

Parameters: None, int, float, str and bytes go as they are; subclasses of
int, float and str (``bool``, ``IntEnum``) as their base type; anything with
the buffer protocol (bytearray, memoryview) as bytes; a type with an
adapter (:func:`register_adapter`; ``date`` and ``datetime`` have ISO text
ones by default) or a ``__conform__(sqlite3.PrepareProtocol)`` method as what
it returns. Results: converters (:func:`register_converter`; ``date`` and
``timestamp`` by default) chosen by the declared type
(:data:`PARSE_DECLTYPES`) or a ``[name]`` in the column's name
(:data:`PARSE_COLNAMES`), given the value as bytes, as :mod:`sqlite3` does.
Also PEP 249's type objects and constructors, and :class:`Row`.
"""

from __future__ import annotations

import datetime
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, overload

from .backend import Params, Value
from .exceptions import ProgrammingError

PARSE_DECLTYPES = 1
PARSE_COLNAMES = 2

Adapter = Callable[[Any], Any]
Converter = Callable[[bytes], Any]
Columns = Sequence[tuple[str, str | None]]

adapters: dict[type, Adapter] = {
    datetime.date: lambda v: v.isoformat(),
    datetime.datetime: lambda v: v.isoformat(" "),
}
converters: dict[str, Converter] = {}


def register_adapter(kind: type, adapter: Adapter) -> None:
    """Bind values of exactly type ``kind`` as ``adapter(value)``."""
    adapters[kind] = adapter


def register_converter(name: str, converter: Converter) -> None:
    """Convert values of columns typed ``name`` (any case) with ``converter(bytes)``."""
    converters[name.upper()] = converter


def convert_date(val: bytes) -> datetime.date:
    return datetime.date(*map(int, val.split(b"-")))


def convert_timestamp(val: bytes) -> datetime.datetime:
    """``YYYY-MM-DD HH:MM:SS[.ffffff]``, as :mod:`sqlite3`'s default converter."""
    datepart, timepart = val.split(b" ")
    year, month, day = map(int, datepart.split(b"-"))
    whole, _, fraction = timepart.partition(b".")
    hours, minutes, seconds = map(int, whole.split(b":"))
    micro = int(f"{fraction.decode():0<6.6}") if fraction else 0
    return datetime.datetime(year, month, day, hours, minutes, seconds, micro)


register_converter("date", convert_date)
register_converter("timestamp", convert_timestamp)

_INT64 = range(-(1 << 63), 1 << 63)


def adapt(value: Any) -> Value:
    """One parameter as a value the database takes (see the module's text)."""
    kind = type(value)
    if value is None or (kind in (int, float, str, bytes) and kind not in adapters):
        return _checked(value)
    adapter = adapters.get(kind)
    if adapter is not None:
        value = adapter(value)
    elif hasattr(value, "__conform__"):
        value = value.__conform__(sqlite3.PrepareProtocol)
    if value is None or isinstance(value, (bool, int)):
        return _checked(None if value is None else int(value))
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    try:
        return bytes(memoryview(value))
    except TypeError:
        raise ProgrammingError(
            f"Error binding parameter: type {type(value).__name__!r} is not supported"
        ) from None


def _checked(value: Value) -> Value:
    if isinstance(value, int) and value not in _INT64:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")
    return value


def adapt_params(params: Any) -> Params:
    """A sequence of values, or a mapping of names to values (``:name``,
    ``@name``, ``$name`` in the SQL, without the sign here)."""
    if params is None:
        return None
    if isinstance(params, Mapping):
        return {str(k): adapt(v) for k, v in params.items()}
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise ProgrammingError("parameters are of unsupported type")
    return [adapt(v) for v in params]


def column_name(name: str, detect_types: int) -> str:
    """The name in ``description``: with PARSE_COLNAMES, cut at " [" as :mod:`sqlite3`."""
    if detect_types & PARSE_COLNAMES:
        at = name.find("[")
        if at >= 0:
            return name[: at - 1 if at > 0 and name[at - 1] == " " else at]
    return name


def column_converters(columns: Columns, detect_types: int) -> list[Converter | None]:
    """Each column's converter: a ``[name]`` in its name first, then the
    first word of its declared type."""
    out: list[Converter | None] = []
    for name, decltype in columns:
        conv = None
        if detect_types & PARSE_COLNAMES:
            start = name.find("[")
            end = name.find("]", start + 1)
            if start >= 0 and end > start:
                conv = converters.get(name[start + 1 : end].upper())
        if conv is None and detect_types & PARSE_DECLTYPES and decltype:
            word = decltype.split("(", 1)[0].strip().split(" ", 1)[0]
            conv = converters.get(word.upper())
        out.append(conv)
    return out


def as_bytes(value: Any) -> bytes:
    """A value as SQLite's ``sqlite3_column_blob`` gives it to a converter."""
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else repr(value)).encode()


class Row:
    """A result row by index and by (case-insensitive) column name, like
    :class:`sqlite3.Row`; ``sqlite3.Row`` given as a row factory means this."""

    __slots__ = ("_names", "_values")

    def __init__(self, cursor: Any, values: tuple[Any, ...]) -> None:
        description = cursor.description or ()
        self._names: tuple[str, ...] = tuple(d[0] for d in description)
        self._values = tuple(values)

    def keys(self) -> list[str]:
        return list(self._names)

    @overload
    def __getitem__(self, key: int | str) -> Any: ...
    @overload
    def __getitem__(self, key: slice) -> tuple[Any, ...]: ...
    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            folded = key.casefold()
            for i, name in enumerate(self._names):
                if name.casefold() == folded:
                    return self._values[i]
            raise IndexError("No item with that key")
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Row):
            return NotImplemented
        return self.keys() == other.keys() and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(self._names) ^ hash(self._values)

    def __repr__(self) -> str:
        pairs = ", ".join(f"{n}={v!r}" for n, v in zip(self._names, self._values, strict=True))
        return f"<Row {pairs}>"


# --- PEP 249's constructors and type objects ----------------------------------

Date = datetime.date
Time = datetime.time
Timestamp = datetime.datetime
Binary = memoryview


def DateFromTicks(ticks: float) -> datetime.date:
    return Date(*time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> datetime.time:
    return Time(*time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> datetime.datetime:
    return Timestamp(*time.localtime(ticks)[:6])


class DBAPITypeObject:
    """A PEP 249 type object: equal to each declared type it stands for.

    ``description``'s type code is None, as :mod:`sqlite3`'s; these compare
    equal to declared types (``"VARCHAR(10)" == STRING``) by SQLite's
    column affinity rules."""

    def __init__(self, name: str, test: Callable[[str], bool]) -> None:
        self.name = name
        self._test = test

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self._test(other.upper())

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<type {self.name}>"


STRING = DBAPITypeObject("STRING", lambda t: any(w in t for w in ("CHAR", "CLOB", "TEXT")))
BINARY = DBAPITypeObject("BINARY", lambda t: "BLOB" in t)
NUMBER = DBAPITypeObject(
    "NUMBER", lambda t: any(w in t for w in ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC"))
)
DATETIME = DBAPITypeObject("DATETIME", lambda t: "DATE" in t or "TIME" in t)
ROWID = DBAPITypeObject("ROWID", lambda t: t in ("ROWID", "_ROWID_", "OID"))
