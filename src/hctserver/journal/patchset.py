"""The session extension's patchset format, in pure Python.

SQLite builds and applies patchsets in C; Python only needs this for the
rare paths the C API does not cover: adopting an existing database (every
row becomes an INSERT) and re-expressing a transaction's earlier changes
after an ALTER/DROP TABLE in the same transaction.

Layout (sqlite3session.c): per table ``'P' varint(nCol) pk[nCol] name NUL``
then changes ``op indirect record...``. Values are ``0`` undefined,
``1`` int64 BE, ``2`` float64 BE, ``3`` text, ``4`` blob (varint length),
``5`` NULL. In a patchset an INSERT carries every column, a DELETE only the
primary key, an UPDATE the primary key then every other column, undefined
where it leaves the column alone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import apsw

from .. import speedups
from ..errors import ApplyError

INSERT = 18
DELETE = 9
UPDATE = 23
PATCHSET = 0x50  # 'P'
CHANGESET = 0x54  # 'T'


class _Undefined:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED: Any = _Undefined()

_i64 = struct.Struct(">q")
_f64 = struct.Struct(">d")


def put_varint(v: int) -> bytes:
    """SQLite's big-endian varint (1 to 9 bytes)."""
    if v < 0:
        raise ValueError("varint must be non-negative")
    if v <= 0x7F:
        return bytes((v,))
    if v > 0x00FFFFFFFFFFFFFF:
        out = bytearray(9)
        out[8] = v & 0xFF
        v >>= 8
        for i in range(7, -1, -1):
            out[i] = (v & 0x7F) | 0x80
            v >>= 7
        return bytes(out)
    parts = []
    while v:
        parts.append((v & 0x7F) | 0x80)
        v >>= 7
    parts[0] &= 0x7F
    return bytes(reversed(parts))


def get_varint(buf: bytes, off: int) -> tuple[int, int]:
    v = 0
    for i in range(8):
        b = buf[off + i]
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            return v, off + i + 1
    return (v << 8) | buf[off + 8], off + 9


def _enc_int(v: int) -> bytes:
    return b"\x01" + _i64.pack(v)


def _enc_float(v: float) -> bytes:
    return b"\x02" + _f64.pack(v)


def _enc_text(v: str) -> bytes:
    b = v.encode("utf-8", "surrogatepass")
    n = len(b)
    return (b"\x03" + bytes((n,)) if n < 128 else b"\x03" + put_varint(n)) + b


def _enc_blob(v: bytes) -> bytes:
    n = len(v)
    return (b"\x04" + bytes((n,)) if n < 128 else b"\x04" + put_varint(n)) + v


def _enc_null(v: None) -> bytes:
    return b"\x05"


def _enc_undefined(v: object) -> bytes:
    return b"\x00"


_ENCODERS: dict[type, Any] = {
    int: _enc_int,
    float: _enc_float,
    str: _enc_text,
    bytes: _enc_blob,
    type(None): _enc_null,
    _Undefined: _enc_undefined,
    bool: lambda v: _enc_int(int(v)),
    bytearray: lambda v: _enc_blob(bytes(v)),
    memoryview: lambda v: _enc_blob(bytes(v)),
}


def encode_value(v: object) -> bytes:
    enc = _ENCODERS.get(type(v))
    if enc is None:
        raise TypeError(f"cannot encode {type(v).__name__} in a patchset")
    out: bytes = enc(v)
    return out


def _decode_value(buf: bytes, off: int) -> tuple[object, int]:
    t = buf[off]
    off += 1
    if t == 0:
        return UNDEFINED, off
    if t == 5:
        return None, off
    if t == 1:
        return _i64.unpack_from(buf, off)[0], off + 8
    if t == 2:
        return _f64.unpack_from(buf, off)[0], off + 8
    if t in (3, 4):
        n, off = get_varint(buf, off)
        raw = buf[off : off + n]
        if len(raw) != n:
            raise IndexError("value runs past the end")
        return (raw.decode("utf-8", "surrogatepass") if t == 3 else bytes(raw)), off + n
    raise ValueError(f"unknown value type {t}")


@dataclass
class Table:
    """One table's block of a patchset."""

    name: str
    pk: bytes  # per column: 0, or the column's 1-based position in the primary key
    changes: list[tuple[int, bool, tuple[object, ...], tuple[object, ...]]] = field(
        default_factory=list
    )

    @property
    def pk_columns(self) -> list[int]:
        """Indexes of the primary-key columns, in primary-key order."""
        return sorted((i for i in range(len(self.pk)) if self.pk[i]), key=lambda i: self.pk[i])


def merge(datas: Sequence[bytes]) -> bytes:
    """Many patchsets as one, merged by SQLite's changegroup (in C). A lone
    non-empty patchset among a few (a leader's parts of one transaction) is
    returned as it is; a follower's long lists are not filtered first."""
    if len(datas) <= 16:
        datas = [d for d in datas if d]
        if len(datas) <= 1:
            return datas[0] if datas else b""
    data = b"".join(datas)  # a patchset may hold a table's block more than once
    if not data:
        return b""
    builder = apsw.ChangesetBuilder()  # type: ignore[no-untyped-call]
    try:
        builder.add(data)
        out: bytes = builder.output()
    finally:
        builder.close()
    return out


def encode_table(name: str, pk: Sequence[int]) -> bytes:
    return bytes((PATCHSET,)) + put_varint(len(pk)) + bytes(pk) + name.encode("utf-8") + b"\x00"


_OPS = {
    (INSERT, False): b"\x12\x00",
    (INSERT, True): b"\x12\x01",
    (DELETE, False): b"\x09\x00",
    (DELETE, True): b"\x09\x01",
    (UPDATE, False): b"\x17\x00",
    (UPDATE, True): b"\x17\x01",
}


def py_encode_values(values: Sequence[object]) -> bytes:
    """The values as a record's fields, one after the other."""
    return b"".join(map(encode_value, values))


def _native_encode_values(values: Sequence[object]) -> bytes:
    out: bytes | None = _native.encode_values(values, UNDEFINED)
    return py_encode_values(values) if out is None else out


_native: Any = speedups.native()
encode_values = py_encode_values if _native is None else _native_encode_values


def encode_insert(values: Sequence[object], indirect: bool = False) -> bytes:
    return _OPS[INSERT, indirect] + encode_values(values)


def encode_delete(pk_values: Sequence[object], indirect: bool = False) -> bytes:
    """pk_values: the primary-key columns' values, in column order."""
    return _OPS[DELETE, indirect] + encode_values(pk_values)


def encode_update(
    pk_values: Sequence[object], new: Sequence[object], indirect: bool = False
) -> bytes:
    """pk_values in column order; new: the non-key columns in column order,
    UNDEFINED for the unchanged ones."""
    return _OPS[UPDATE, indirect] + encode_values(pk_values) + encode_values(new)


def decode(data: bytes) -> list[Table]:
    """Decode a patchset (or changeset). Raises ApplyError if malformed.

    For both formats ``old`` holds the values the record carries for the
    old row (primary key only in a patchset) and ``new`` the new row.
    """
    try:
        return list(_iter_tables(data))
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ApplyError(f"malformed patchset: {e}") from None


def _iter_tables(data: bytes) -> Iterator[Table]:
    off = 0
    n = len(data)
    while off < n:
        kind = data[off]
        if kind not in (PATCHSET, CHANGESET):
            raise ValueError(f"bad table marker 0x{kind:02x} at offset {off}")
        patch = kind == PATCHSET
        ncol, off = get_varint(data, off + 1)
        pk = data[off : off + ncol]
        off += ncol
        end = data.index(b"\x00", off)
        table = Table(data[off:end].decode("utf-8"), bytes(pk))
        off = end + 1
        pkcols = [i for i in range(ncol) if pk[i]]
        while off < n and data[off] in (INSERT, DELETE, UPDATE):
            op, indirect = data[off], bool(data[off + 1])
            off += 2
            old: tuple[object, ...] = ()
            new: tuple[object, ...] = ()
            if op == INSERT:
                new, off = _record(data, off, ncol)
            elif op == DELETE:
                if patch:
                    vals, off = _record(data, off, len(pkcols))
                    old = _spread(vals, pkcols, ncol)
                else:
                    old, off = _record(data, off, ncol)
            elif patch:
                vals, off = _record(data, off, len(pkcols))
                old = _spread(vals, pkcols, ncol)
                others = [i for i in range(ncol) if not pk[i]]
                vals, off = _record(data, off, len(others))
                new = _spread(vals, others, ncol)
            else:
                old, off = _record(data, off, ncol)
                new, off = _record(data, off, ncol)
            table.changes.append((op, indirect, old, new))
        yield table


def _record(data: bytes, off: int, count: int) -> tuple[tuple[object, ...], int]:
    out = []
    for _ in range(count):
        v, off = _decode_value(data, off)
        out.append(v)
    return tuple(out), off


def _spread(vals: tuple[object, ...], cols: list[int], ncol: int) -> tuple[object, ...]:
    row: list[object] = [UNDEFINED] * ncol
    for i, c in enumerate(cols):
        row[c] = vals[i]
    return tuple(row)
