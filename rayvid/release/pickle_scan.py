"""Pass 1 of the streaming pickle reader: which memo entries are referred back to, and until where.

A pickler memoizes objects (``PUT``/``BINPUT``/``LONG_BINPUT``/``MEMOIZE``) and may refer
back to any of them (``GET``/``BINGET``/``LONG_BINGET``) at any later point of the file.
CPython's picklers (C and pure Python) memoize every ``bytes`` object, so numpy's shared
one-byte typecode ``b'b'`` is stored once, at the first array, and fetched by every later
array; single-character frame strings are shared objects too. Python 2's cPickle memoizes
every list, dict and tuple and every ``str`` of 2+ characters. No bound on the distance of
a reference is safe, so the reader does not guess:

    refs = scan_references(path)    # {memo id: byte offset of its last GET}

walks the opcodes once without building any object (long payloads are skipped with a seek)
and records, for every memo id that is ever fetched, where it is fetched last. Pass 2
(`rayvid.release.pickle_reader`) then stores only those ids and drops each one at its last fetch:
memory is one top-level batch plus exactly the objects the file still refers back to.

A malformed file just ends the scan where it stops parsing; pass 2 reports the error there
(or earlier) with its full context.
"""

from __future__ import annotations

import os
import re
import struct

from rayvid.release.pickle_opcodes import ARGS, I4, LINE2, PY2_ARRAY, U4

__all__ = ["CHUNK", "SLACK", "fill", "fill_line", "scan_references"]

CHUNK = 8 << 20  # bytes read per refill
SLACK = 1024  # refill when fewer bytes remain: fixed-size opcode arguments never cross it

# What the scan loop does per opcode byte: skip a fixed-size argument of 0-8 bytes, or
_SHORT, _BINGET, _SLOW = 254, 253, 255  # skip a 1-byte-length payload, record a BINGET, other
_SKIP = bytes(_BINGET if op == 104 else _SHORT if op in b"UC\x8c\x8a"
              else ARGS[op] if isinstance(ARGS.get(op), int) and ARGS[op] >= 0 and op != 106
              else _SLOW for op in range(256))
_VARIABLE = {op: kind for op, kind in ARGS.items() if isinstance(kind, tuple)}
_LONG_BINGET, _GET, _STOP = 106, 103, 46
# A run of opcodes that fetch nothing and carry at most 8 argument bytes or a short string:
# one regex match (C speed) skips what would be a dozen trips round the loop.
_SHORT_STRINGS = b"|".join(re.escape(bytes([k])) + b".{%d}" % k for k in range(32))
_RUN = re.compile(b"(?:[](}N)ealbstuR\\x85\\x86\\x87\\x88\\x89\\x94]|[qK\\x80].|M..|[rJ].{4}|G.{8}|"
                  b"[UC\\x8c](?:" + _SHORT_STRINGS + b"))+", re.S).match


def fill(read, buf: bytes, pos: int, need: int, size: int) -> tuple[bytes, bool]:
    """A new buffer: buf[pos:] plus reads of ``size`` until it holds ``need`` bytes; EOF."""
    parts, have = [buf[pos:]], len(buf) - pos
    while have < need:
        chunk = read(max(size, need - have))
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts), False


def fill_line(read, buf: bytes, pos: int) -> bytes:
    """A new buffer: buf[pos:] plus reads until it holds a newline (or the file ends)."""
    parts = [buf[pos:]]
    while chunk := read(CHUNK):
        parts.append(chunk)
        if b"\n" in chunk:
            break
    return b"".join(parts)


def scan_references(path: str | os.PathLike, chunk: int | None = None) -> dict[int, int]:
    """{memo id: absolute byte offset of the last opcode that fetches it} for ``path``.

    Ids never fetched are absent. Reads the file once, holding ``chunk`` bytes (default
    CHUNK) at a time.
    """
    chunk = chunk or CHUNK
    last: dict[int, int] = {}
    with open(path, "rb", buffering=0) as f:
        read, skip = f.read, _SKIP
        buf, eof = fill(read, b"", 0, chunk, chunk)
        base, pos, n = 0, 0, len(buf)
        limit = n if eof else n - SLACK
        try:
            while True:
                if pos >= limit:
                    if eof and pos >= n:
                        return last  # truncated: pass 2 reports it
                    base += pos
                    buf, eof = fill(read, buf, pos, chunk, chunk)
                    pos, n = 0, len(buf)
                    limit = n if eof else n - SLACK
                    continue
                op = buf[pos]
                size = skip[op]
                if size < 9 or size == _SHORT:
                    m = _RUN(buf, pos)
                    pos = m.end() if m is not None else pos + (1 + size if size < 9 else
                                                               2 + buf[pos + 1])
                elif size == _BINGET:
                    last[buf[pos + 1]] = base + pos
                    m = PY2_ARRAY(buf, pos + 2)
                    if m is None:
                        pos += 2
                        continue
                    # a py2 numpy array: its own fetches, then skip its data
                    last[m[1][0]] = base + pos + 2
                    last[m[6][0]] = base + m.start(6) - 1
                    end = m.end() + (m[7][0] if m[7] is not None else I4(m[8])[0])
                    if end <= n:
                        pos = end
                    else:
                        base, buf, pos, n, eof, limit = _skip_to(f, base + end, chunk)
                else:
                    at = _slow_op(f, op, buf, pos, base, last, chunk)
                    if at is None:
                        return last  # STOP, an unknown opcode or a truncation
                    if at[0] is buf:
                        pos = at[1]
                    else:
                        buf, pos, base, eof = at
                        n = len(buf)
                        limit = n if eof else n - SLACK
        except (IndexError, struct.error):
            return last  # truncated inside an opcode: pass 2 reports it


def _skip_to(f, offset: int, chunk: int):
    """Seek to absolute ``offset`` (past a long payload) and read a fresh buffer there."""
    size = os.fstat(f.fileno()).st_size
    f.seek(min(offset, size))
    buf, eof = fill(f.read, b"", 0, chunk, chunk)
    if offset > size:
        buf, eof = b"", True
    n = len(buf)
    return offset, buf, 0, n, eof, n if eof else n - SLACK


def _slow_op(f, op: int, buf: bytes, pos: int, base: int, last: dict, chunk: int):
    """Skip an opcode the loop does not inline; records LONG_BINGET and GET.

    -> (buf, pos after it) in the same buffer, or a new (buf, pos, base, eof) after a seek
    or a line refill, or None when the scan must stop here.
    """
    n = len(buf)
    if op == _LONG_BINGET:
        last[U4(buf, pos + 1)[0]] = base + pos
        return buf, pos + 5
    kind = _VARIABLE.get(op)
    if kind is not None:  # 4- and 8-byte lengths
        width, unpack = kind
        end = pos + 1 + width + unpack(buf, pos + 1)[0]
        if end < pos + 1 + width:
            return None  # negative length
        if end <= n:
            return buf, end
        base, buf, pos, n, eof, _ = _skip_to(f, base + end, chunk)
        return buf, pos, base, eof
    lines = ARGS.get(op)
    if lines is None or op == _STOP:
        return None  # STOP, or an unknown opcode that pass 2 will name
    eof, moved = False, False
    for _ in range(2 if lines == LINE2 else 1):
        nl = buf.find(b"\n", pos + 1)
        if nl < 0:
            base += pos
            buf = fill_line(f.read, buf, pos)
            pos, moved = 0, True
            nl = buf.find(b"\n", 1)
            if nl < 0:
                return None
        if op == _GET:
            try:
                last[int(buf[pos + 1:nl])] = base + pos
            except ValueError:
                return None
        pos = nl  # the second line (if any) starts after this newline
    return (buf, pos + 1, base, eof) if moved else (buf, pos + 1)
