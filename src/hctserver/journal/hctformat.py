"""hctree's journal entry data (../shared/interop/FORMAT.md, section 6), pure.

Per written table: ``'T'`` name NUL, then one record per key the
transaction left in it, in key order:

* ``'i'`` varint(rowid as u64) varint(n) record: a rowid table's full new row;
* ``'d'`` varint(rowid as u64): a rowid table's deleted row;
* ``'I'`` varint(n) record: a WITHOUT ROWID table's full new row (primary
  key columns in key order, then the others in table order);
* ``'D'`` varint(n) record: a WITHOUT ROWID table's deleted key.

A record is SQLite's: varint(header size), a serial type per field, the
bodies. No I/O here: :func:`decode` and :func:`encode` turn bytes into
:class:`TableOps` and back; :mod:`hctserver.journal.hctapply` applies them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from .. import speedups
from ..errors import ProtocolError
from .patchset import get_varint, put_varint

TABLE = 0x54  # 'T'
ROW = 0x69  # 'i'
DELETE = 0x64  # 'd'
WROW = 0x49  # 'I'
WDELETE = 0x44  # 'D'
KINDS = {ROW: "i", DELETE: "d", WROW: "I", WDELETE: "D"}

_f64 = struct.Struct(">d")
_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}

Value = int | float | str | bytes | None


class Op(NamedTuple):
    kind: str  # "i", "d", "I" or "D"
    rowid: int | None  # "i" and "d"
    values: tuple[Value, ...]  # the record's fields ("d": none)


class TableOps(NamedTuple):
    name: str
    ops: list[Op]


# --- records -------------------------------------------------------------------


def py_decode_record(rec: bytes | memoryview) -> tuple[Value, ...]:
    """The fields of an SQLite record."""
    rec = bytes(rec)
    hsize, p = get_varint(rec, 0)
    if not 0 < hsize <= len(rec):
        raise ProtocolError(f"a record header of {hsize} bytes in a record of {len(rec)}")
    head = rec[p:hsize]
    if max(head, default=0) < 0x80:  # every serial type in one byte: the usual case
        types = list(head)
    else:
        types = []
        while p < hsize:
            t, p = get_varint(rec, p)
            types.append(t)
    out: list[Value] = []
    body = hsize
    for t in types:
        if t == 0:
            out.append(None)
        elif t in _INT_SIZES:
            n = _INT_SIZES[t]
            out.append(int.from_bytes(rec[body : body + n], "big", signed=True))
            body += n
        elif t == 7:
            out.append(_f64.unpack_from(rec, body)[0])
            body += 8
        elif t in (8, 9):
            out.append(t - 8)
        elif t >= 12:
            n = (t - 12) // 2
            raw = rec[body : body + n]
            if len(raw) != n:
                raise ProtocolError("a record's field runs past its end")
            out.append(raw if t % 2 == 0 else raw.decode("utf-8", "replace"))
            body += n
        else:
            raise ProtocolError(f"serial type {t} in a record (10 and 11 are reserved)")
        if body > len(rec):
            raise ProtocolError("a record's field runs past its end")
    return tuple(out)


def _int_type(v: int, wide_negatives: bool) -> tuple[int, bytes]:
    if v == 0:
        return 8, b""
    if v == 1:
        return 9, b""
    if wide_negatives and v < 0:
        return 6, v.to_bytes(8, "big", signed=True)
    for t, n in _INT_SIZES.items():
        if -(1 << (8 * n - 1)) <= v < (1 << (8 * n - 1)):
            return t, v.to_bytes(n, "big", signed=True)
    raise ValueError(f"integer {v} does not fit in 64 bits")


def encode_record(values: Sequence[Value], *, wide_negatives: bool = False) -> bytes:
    """An SQLite record, as OP_MakeRecord builds it (the smallest integer
    size; ``wide_negatives``: negative integers always in 8 bytes, which the
    original C follower reads correctly, FORMAT.md section 7)."""
    types: list[int] = []
    bodies: list[bytes] = []
    for v in values:
        if v is None:
            t, b = 0, b""
        elif isinstance(v, bool):
            t, b = _int_type(int(v), wide_negatives)
        elif isinstance(v, int):
            t, b = _int_type(v, wide_negatives)
        elif isinstance(v, float):
            t, b = 7, _f64.pack(v)
        elif isinstance(v, str):
            b = v.encode("utf-8")
            t = 13 + 2 * len(b)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            b = bytes(v)
            t = 12 + 2 * len(b)
        else:
            raise ValueError(f"cannot store {type(v).__name__} in a record")
        types.append(t)
        bodies.append(b)
    head = b"".join(put_varint(t) for t in types)
    size = len(head) + 1
    while len(put_varint(size)) + len(head) != size:  # the size counts its own varint
        size = len(put_varint(size)) + len(head)
    return put_varint(size) + head + b"".join(bodies)


# --- entries ---------------------------------------------------------------------


class RawOp(NamedTuple):
    """An op whose record is not decoded yet (``b""`` for ``'d'``)."""

    kind: str
    rowid: int | None
    record: bytes

    def op(self) -> Op:
        return Op(self.kind, self.rowid, decode_record(self.record) if self.record else ())


def py_scan(data: bytes | memoryview) -> list[tuple[str, list[RawOp]]]:
    """The tables and ops of one entry's data, records left undecoded (a
    follower decodes only each key's last one); ProtocolError if it is not
    hctree's format."""
    buf = bytes(data)
    out: list[tuple[str, list[RawOp]]] = []
    p = 0
    n = len(buf)
    try:
        while p < n:
            if buf[p] != TABLE:
                raise ProtocolError(f"byte {p}: expected a table ('T'), found 0x{buf[p]:02x}")
            end = buf.index(b"\x00", p + 1)
            ops: list[RawOp] = []
            out.append((buf[p + 1 : end].decode("utf-8"), ops))
            p = end + 1
            while p < n and buf[p] != TABLE:
                kind = buf[p]
                p += 1
                if kind == DELETE:
                    u, p = get_varint(buf, p)
                    ops.append(RawOp("d", _signed(u), b""))
                    continue
                if kind == ROW:
                    u, p = get_varint(buf, p)
                    rowid: int | None = _signed(u)
                elif kind in (WROW, WDELETE):
                    rowid = None
                else:
                    raise ProtocolError(f"byte {p - 1}: unknown record kind 0x{kind:02x}")
                size, p = get_varint(buf, p)
                if p + size > n or not size:
                    raise ProtocolError(f"byte {p}: a record of {size} bytes runs past the end")
                ops.append(RawOp(KINDS[kind], rowid, buf[p : p + size]))
                p += size
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"hctree entry data is malformed ({e})") from None
    return out


_native: Any = speedups.native()


def _native_scan(data: bytes | memoryview) -> list[tuple[str, list[RawOp]]]:
    out: list[tuple[str, list[RawOp]]] | None = _native.hct_scan(data, RawOp)
    return py_scan(data) if out is None else out  # malformed: the twin says how


def _native_decode_record(rec: bytes | memoryview) -> tuple[Value, ...]:
    out: tuple[Value, ...] | None = _native.hct_record(rec)
    return py_decode_record(rec) if out is None else out


scan = py_scan if _native is None else _native_scan
decode_record = py_decode_record if _native is None else _native_decode_record


def decode(data: bytes | memoryview) -> list[TableOps]:
    """The tables and records of one entry's data; ProtocolError if it is
    not hctree's format."""
    return [TableOps(name, [r.op() for r in ops]) for name, ops in scan(data)]


def encode(tables: Sequence[TableOps], *, wide_negatives: bool = False) -> bytes:
    parts: list[bytes] = []
    for t in tables:
        name = t.name.encode("utf-8")
        if b"\x00" in name:
            raise ValueError("a table name cannot hold a NUL byte")
        parts += (b"T", name, b"\x00")
        for op in t.ops:
            if op.kind == "d":
                assert op.rowid is not None
                parts += (b"d", put_varint(op.rowid & 0xFFFFFFFFFFFFFFFF))
                continue
            rec = encode_record(op.values, wide_negatives=wide_negatives)
            if op.kind == "i":
                assert op.rowid is not None
                parts += (b"i", put_varint(op.rowid & 0xFFFFFFFFFFFFFFFF))
            else:
                parts.append(op.kind.encode())
            parts += (put_varint(len(rec)), rec)
    return b"".join(parts)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u
