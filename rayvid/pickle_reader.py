"""Restricted, streaming reader and py2-style writer for the release's pickles.

The iQIYI-VID-2019 features ship as Python 2 cPickle files (protocol 2), one dict per
file (clip name -> faces / heads / bodies / audio vector), several GB each.
``pickle.load`` would run whatever the file asks for and hold the whole dict, so rayvid
walks the opcodes itself:

- ``iter_dict_items(path)`` yields the top-level dict's ``(key, value)`` pairs as soon as
  each ``MARK k v ... SETITEMS`` batch (py2 cPickle: 1000 items) or ``SETITEM`` is complete,
  reading the file through an 8 MiB buffer. The top-level dict itself is never filled.
- ``load(path)`` runs the same walker over a whole (small) pickle and returns its object.
- ``write_dict(path, items)`` writes a dict byte-for-byte as Python 2.7 cPickle protocol 2
  with numpy 1.x would (used by the simulator and the tests).

Nothing in a pickle is ever called. ``GLOBAL``/``STACK_GLOBAL`` resolve against an
allow-list to inert markers; ``REDUCE``/``NEWOBJ``/``BUILD`` on a marker run rayvid's own
reconstruction (numpy ``_reconstruct`` + ndarray state, ``dtype`` + state, ``scalar``,
``_frombuffer`` (protocol 5), ``_codecs.encode`` (how py3 writes bytes below protocol 3),
``copyreg._reconstructor`` and builtin containers). Any other global raises
``UnsafePickleError`` (file, ``module.name``, byte offset) when it is read, before any
later opcode runs.

Values come back as: py2 ``str`` and py3 ``bytes`` -> ``bytes`` (like ``encoding='bytes'``),
unicode -> ``str``, ``int``/``float``/``bool``/``None``, ``list``/``tuple``/``dict``/
``set``/``frozenset``/``bytearray``, ``numpy.ndarray`` (writable copies, bit-exact),
``numpy.dtype`` and numpy scalars. Keys are returned as stored: ``bytes`` for py2 ``str``
keys (the release), ``str`` for unicode keys; they are never re-encoded.

Design decision, bounded memory: a pickler memoizes (``BINPUT``) every container, so an
unpickler's memo would keep the whole file alive. After each top-level batch is yielded,
the streaming reader drops the memo entries of that batch that hold containers, arrays or
long strings; it keeps globals and dtypes (a handful, re-used via ``BINGET`` for the whole
file) and small atoms (numbers, ``bytes``/``str`` of at most 64 characters, tuples of up
to 8 such atoms: code constants are shared objects) up to
``_MAX_KEPT_ATOMS`` (oldest dropped first), so memory is one batch plus a few MB whatever
the file size. Python 2 cPickle of freshly built data never refers back to an object of an
earlier batch; a ``GET`` of a dropped entry raises ``PickleFormatError`` saying that object
sharing across batches is not supported by the streaming reader (``load`` keeps the whole
memo and reads such files).
"""

from __future__ import annotations

import codecs
import collections
import itertools
import math
import os
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ReleaseFormatError",
    "PickleFormatError",
    "UnsafePickleError",
    "WalkStats",
    "iter_dict_items",
    "load",
]

_CHUNK = 8 << 20  # bytes read per refill
_SLACK = 1024  # refill when fewer bytes remain: fixed-size opcode arguments never cross it
_NO_LIMIT = sys.maxsize
_MAX_KEPT_ATOMS = 100_000  # small memoized atoms kept across batches (~15 MB at most)
_ATOM_MAX_LEN = 64


class ReleaseFormatError(ValueError):
    """A release file does not have the layout rayvid expects."""


class PickleFormatError(ReleaseFormatError):
    """A pickle is malformed, truncated or uses something the walker does not support."""

    def __init__(self, path: str | os.PathLike, offset: int, message: str):
        self.path, self.offset, self.detail = os.fspath(path), offset, message
        super().__init__(f"{self.path}: byte {offset}: {message}")


class UnsafePickleError(ReleaseFormatError):
    """A pickle names a global (a callable) that rayvid does not rebuild itself."""

    def __init__(self, path: str | os.PathLike, offset: int, global_name: str, message: str):
        self.path, self.offset, self.global_name = os.fspath(path), offset, global_name
        super().__init__(f"{self.path}: byte {offset}: refusing '{global_name}': {message}")


@dataclass
class WalkStats:
    """Counters a caller may pass to ``iter_dict_items`` (diagnostics and tests)."""

    items: int = 0
    batches: int = 0
    memo_size: int = 0  # after the last batch's pruning
    max_memo_size: int = 0
    memo_dropped: int = 0


class _Bad(Exception):
    """Internal: malformed or unsupported data; turned into PickleFormatError."""


class _Unsafe(Exception):
    """Internal: refused callable; turned into UnsafePickleError."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


# --- reconstruction: rayvid's own code for the few allowed globals -----------------------


class _Global:
    """Inert stand-in for an allowed global; REDUCE/NEWOBJ dispatch to its handlers."""

    __slots__ = ("qualname", "reduce", "newobj", "ctor")

    def __init__(self, qualname, reduce=None, newobj=None, ctor=None):
        self.qualname, self.ctor = qualname, ctor
        self.reduce = reduce or self._refuse
        self.newobj = newobj or self._refuse

    def _refuse(self, args):
        raise _Unsafe(self.qualname, "not an allowed reconstructor for this opcode")


class _Pending:
    """Result of a REDUCE that its BUILD completes (arrays, dtypes); remembers memo ids."""

    __slots__ = ("finish", "ids")

    def __init__(self, finish):
        self.finish, self.ids = finish, []


_DTYPE_CODE = re.compile(r"[biufcSUV][0-9]{1,6}")
_ENDIAN = {"<": "<", ">": ">", "|": "|", "=": "="}


def _text(x) -> str:
    if x.__class__ is bytes:
        return x.decode("latin1")
    if x.__class__ is str:
        return x
    raise _Bad(f"expected a string, got {type(x).__name__}")


def _reduce_dtype(args):
    if args.__class__ is not tuple or len(args) != 3:
        raise _Bad("numpy.dtype needs (code, align, copy)")
    code = _text(args[0])
    if not _DTYPE_CODE.fullmatch(code):
        raise _Bad(f"unsupported dtype code {code!r} (object, datetime, structured)")
    base = np.dtype(code)
    return _Pending(lambda state: _finish_dtype(base, state))


def _finish_dtype(base: np.dtype, state) -> np.dtype:
    if state.__class__ is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise _Bad("unsupported numpy dtype state")
    endian = _ENDIAN.get(_text(state[1]))
    if endian is None or state[2:5] != (None, None, None):
        raise _Bad("unsupported numpy dtype state (sub-array or fields)")
    elsize = state[5]
    if elsize != -1 and elsize != base.itemsize:
        raise _Bad(f"dtype item size {elsize} does not match {base.str}")
    return base.newbyteorder(endian) if endian in "<>" else base


def _as_raw(raw) -> bytes | bytearray:
    if raw.__class__ is bytes or raw.__class__ is bytearray:
        return raw
    if raw.__class__ is str:  # data written as unicode, as numpy accepts with latin1
        return raw.encode("latin1")
    raise _Bad("array data is not a byte string (object arrays are not supported)")


def _make_array(raw, dtype, shape, fortran: bool) -> np.ndarray:
    if not isinstance(dtype, np.dtype):
        raise _Bad("array dtype is not a dtype")
    if shape.__class__ is not tuple or not all(s.__class__ is int and s >= 0 for s in shape):
        raise _Bad(f"bad array shape {shape!r}")
    raw = _as_raw(raw)
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise _Bad(f"array data has {len(raw)} bytes, shape {shape} {dtype} needs "
                   f"{count * dtype.itemsize}")
    arr = np.frombuffer(bytearray(raw), dtype)  # bytearray: writable, owns its copy
    if len(shape) != 1:
        arr = arr.reshape(shape, order="F" if fortran else "C")
    return arr


def _reduce_reconstruct(args):
    if args.__class__ is not tuple or len(args) != 3 or args[0] is not _NDARRAY:
        raise _Unsafe(_RECONSTRUCT.qualname, "only plain numpy.ndarray is rebuilt")
    return _Pending(_finish_array)


def _finish_array(state) -> np.ndarray:
    if state.__class__ is not tuple or len(state) not in (4, 5):
        raise _Bad("unsupported numpy array state")
    if len(state) == 5:
        state = state[1:]  # (version, shape, dtype, is_fortran, rawdata)
    shape, dtype, fortran, raw = state
    return _make_array(raw, dtype, shape, bool(fortran))


def _reduce_frombuffer(args):  # numpy protocol 5: _frombuffer(buf, dtype, shape, order)
    if args.__class__ is not tuple or len(args) != 4:
        raise _Bad("_frombuffer needs (buffer, dtype, shape, order)")
    return _make_array(args[0], args[1], args[2], _text(args[3]) == "F")


def _reduce_scalar(args):
    if args.__class__ is not tuple or len(args) != 2 or not isinstance(args[0], np.dtype):
        raise _Bad("numpy scalar needs (dtype, data)")
    raw = _as_raw(args[1])
    if len(raw) != args[0].itemsize:
        raise _Bad("numpy scalar data has the wrong size")
    return np.frombuffer(raw, args[0], 1)[0]


def _reduce_codecs_encode(args):  # py3 protocol < 3 writes bytes as encode(str, 'latin1')
    if (args.__class__ is not tuple or len(args) != 2 or args[0].__class__ is not str
            or args[1] not in ("latin1", "latin-1")):
        raise _Bad("_codecs.encode is only supported as encode(str, 'latin1')")
    return args[0].encode("latin1")


_PLAIN = (list, tuple, set, frozenset, dict, bytes, bytearray)


def _builtin_reduce(ctor):
    def reduce(args):
        if args.__class__ is not tuple or len(args) > 2:
            raise _Bad(f"unsupported arguments for {ctor.__name__}")
        if not args:
            return ctor()
        if len(args) == 2:  # bytes/bytearray(str, 'latin-1')
            if ctor not in (bytes, bytearray) or args[1] not in ("latin1", "latin-1"):
                raise _Bad(f"unsupported arguments for {ctor.__name__}")
            return ctor(_text(args[0]), "latin1")
        if not isinstance(args[0], _PLAIN):  # e.g. bytes(10**12) would allocate
            raise _Bad(f"unsupported argument for {ctor.__name__}")
        return ctor(args[0])

    return reduce


def _builtin_newobj(ctor):
    def newobj(args):  # cls.__new__(cls, *args): mutable containers ignore args
        if ctor in (list, dict, set, bytearray):
            return ctor()
        return _builtin_reduce(ctor)(args)

    return newobj


def _reduce_reconstructor(args):  # copyreg._reconstructor(cls, base, state)
    if args.__class__ is not tuple or len(args) != 3:
        raise _Bad("_reconstructor needs (cls, base, state)")
    cls, base, state = args
    if cls.__class__ is not _Global or cls.ctor is None or base not in (cls, _OBJECT):
        name = getattr(cls, "qualname", type(cls).__name__)
        raise _Unsafe(name, "copyreg._reconstructor only rebuilds builtin containers")
    if base is _OBJECT or state is None:
        return cls.ctor()
    return cls.reduce((state,))


_NDARRAY = _Global("numpy.ndarray")
_RECONSTRUCT = _Global("numpy.core.multiarray._reconstruct", _reduce_reconstruct)
_OBJECT = _Global("builtins.object")


def _allowed_globals() -> dict[tuple[str, str], _Global]:
    table = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Global("numpy.dtype",
                                                                         _reduce_dtype)}
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _RECONSTRUCT
        table[(f"{core}.multiarray", "scalar")] = _Global(f"{core}.multiarray.scalar",
                                                          _reduce_scalar)
        table[(f"{core}.numeric", "_frombuffer")] = _Global(f"{core}.numeric._frombuffer",
                                                            _reduce_frombuffer)
    recon = _Global("copyreg._reconstructor", _reduce_reconstructor)
    table[("copy_reg", "_reconstructor")] = table[("copyreg", "_reconstructor")] = recon
    table[("_codecs", "encode")] = _Global("_codecs.encode", _reduce_codecs_encode)
    for ctor in _PLAIN:
        g = _Global(f"builtins.{ctor.__name__}", _builtin_reduce(ctor), _builtin_newobj(ctor),
                    ctor)
        table[("builtins", ctor.__name__)] = table[("__builtin__", ctor.__name__)] = g
    table[("builtins", "object")] = table[("__builtin__", "object")] = _OBJECT
    return table


_ALLOWED = _allowed_globals()


def _resolve_global(module: str, name: str) -> _Global:
    g = _ALLOWED.get((module, name))
    if g is None:
        raise _Unsafe(f"{module}.{name}", "not on rayvid's allow-list (numpy arrays, dtypes, "
                      "scalars and builtin containers only); nothing was executed")
    return g


# --- the walker ---------------------------------------------------------------------------


class _Truncated(Exception):
    """Internal: the file ends inside an opcode."""


_ATOM_TYPES = frozenset((int, float, bool, complex, type(None)))


def _is_atom(v) -> bool:
    """Small immutable values kept in the memo across batches (see the module docstring)."""
    c = v.__class__
    if c is bytes or c is str:
        return len(v) <= _ATOM_MAX_LEN
    return c in _ATOM_TYPES or isinstance(v, np.generic)


def _is_kept(v) -> bool:
    """Atoms and short tuples of atoms (code constants such as (0, 0) are shared)."""
    if v.__class__ is tuple:
        return len(v) <= 8 and all(map(_is_atom, v))
    return _is_atom(v)


class _Pruner:
    """Drops a finished batch's containers from the memo (see the module docstring)."""

    def __init__(self, stats: WalkStats | None):
        self.last_key = None  # newest memo key at the previous prune
        self.atoms: collections.deque = collections.deque()  # kept atom keys, oldest first
        self.max_dropped = -1
        self.dropped = 0
        self.stats = stats

    def prune(self, memo: dict, n_items: int) -> None:
        last, new_atoms, drop = self.last_key, [], []
        for k, v in reversed(memo.items()):  # entries added since the last prune are last
            if k == last:
                break
            c = v.__class__
            if c is list or c is np.ndarray or c is dict:
                drop.append(k)
            elif _is_kept(v):
                new_atoms.append(k)
            elif c is not _Global and not isinstance(v, np.dtype):
                drop.append(k)  # other containers, long strings; globals and dtypes stay
        atoms = self.atoms
        atoms.extend(reversed(new_atoms))
        while len(atoms) > _MAX_KEPT_ATOMS:
            drop.append(atoms.popleft())
        for k in drop:
            del memo[k]
        if drop:
            self.max_dropped = max(self.max_dropped, max(drop))
        self.dropped += len(drop)
        self.last_key = next(reversed(memo), None)
        if self.stats is not None:
            s = self.stats
            s.items, s.batches = s.items + n_items, s.batches + 1
            s.memo_size, s.memo_dropped = len(memo), self.dropped
            s.max_memo_size = max(s.max_memo_size, len(memo))

    def missing(self, key) -> str:
        if key.__class__ is int and key <= self.max_dropped:
            return (f"memo entry {key} was dropped after its batch: object sharing across "
                    "top-level batches is not supported by the streaming reader (python 2 "
                    "cPickle of fresh data never does this; use load() for small files)")
        return f"memo entry {key} was never stored"


def _fill(read, buf: bytes, pos: int, need: int, size: int) -> tuple[bytes, bool]:
    """A new buffer: buf[pos:] plus reads of ``size`` until it holds ``need`` bytes; EOF."""
    parts, have = [buf[pos:]], len(buf) - pos
    while have < need:
        chunk = read(max(size, need - have))
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts), False


def _fill_line(read, buf: bytes, pos: int) -> bytes:
    """A new buffer: buf[pos:] plus reads until it holds a newline (or the file ends)."""
    parts = [buf[pos:]]
    while chunk := read(_CHUNK):
        parts.append(chunk)
        if b"\n" in chunk:
            break
    return b"".join(parts)


def _text_value(op: int, line: bytes):
    """Value of a protocol-0 text opcode (INT, LONG, FLOAT, STRING, UNICODE)."""
    if op == 73:  # INT: python 2 writes True/False as I01/I00
        return True if line == b"01" else False if line == b"00" else int(line)
    if op == 76:  # LONG
        return int(line[:-1] if line.endswith(b"L") else line)
    if op == 70:  # FLOAT
        return float(line)
    if op == 83:  # STRING: a quoted python 2 str literal -> bytes
        if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
            raise _Bad("STRING argument is not quoted")
        return codecs.escape_decode(line[1:-1])[0]
    return str(line, "raw-unicode-escape")  # UNICODE


def _long(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


def _utf8(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def _same(data: bytes) -> bytes:
    return data


_I4 = struct.Struct("<i").unpack_from
_U1 = struct.Struct("<B").unpack_from
_U2 = struct.Struct("<H").unpack_from
_U4 = struct.Struct("<I").unpack_from
_U8 = struct.Struct("<Q").unpack_from
_F8 = struct.Struct(">d").unpack_from
# length-prefixed opcodes other than the hot BINSTRING: (length bytes, unpack, convert)
_VAROPS = {66: (4, _U4, _same), 88: (4, _U4, _utf8), 0x8c: (1, _U1, _utf8),
           0x8d: (8, _U8, _utf8), 0x8e: (8, _U8, _same), 0x96: (8, _U8, bytearray),
           0x8b: (4, _I4, _long)}
# after BINGET of _reconstruct: BINGET ndarray, (0,), 'b', TUPLE3, REDUCE, BINPUT,
# MARK 1 (count,) BINGET dtype, False, len-prefixed raw data (TUPLE BUILD checked apart)
_PY2_ARRAY = re.compile(rb"h(.)K\x00\x85U\x01b\x87R(?:q(.)|r(.{4}))\(K\x01(?:K(.)|M(.{2}))"
                        rb"\x85h(.)\x89(?:U(.)|T(.{4}))", re.S).match
_LINE_OPS = frozenset(b"ILFSVcgpi")  # protocol-0 opcodes with newline-ended arguments
_REFUSED = {ord("P"): "PERSID", ord("Q"): "BINPERSID", ord("o"): "OBJ", 0x82: "EXT1",
            0x83: "EXT2", 0x84: "EXT4", 0x92: "NEWOBJ_EX", 0x97: "NEXT_BUFFER",
            0x98: "READONLY_BUFFER"}


def _check_top_is_dict(buf: bytes) -> None:
    p = 2 if buf[:1] == b"\x80" else 0
    if buf[p:p + 1] == b"\x95":  # FRAME
        p += 9
    if buf[p:p + 1] != b"}" and buf[p:p + 2] != b"(d":
        raise _Bad("the top-level object is not a dict")


def _walk(path: str, stream: bool, stats: WalkStats | None = None):
    """Yield the top dict's (key, value) pairs (stream) or one (None, top object).

    One function with locals and an if-chain ordered by opcode frequency in py2 face
    files (no function call per opcode), plus one superinstruction for py2 numpy arrays.
    """
    with open(path, "rb", buffering=0) as f:
        read = f.read
        chunk = max(1, min(_CHUNK, os.fstat(f.fileno()).st_size))  # small files: small reads
        buf, eof = _fill(read, b"", 0, chunk, chunk)
        n, pos, base, opos = len(buf), 0, 0, 0
        limit = _NO_LIMIT if eof else n - _SLACK
        stack, metastack, memo = [], [], {}
        pruner = _Pruner(stats)
        try:
            if not buf:
                raise _Bad("empty file")
            if stream:
                _check_top_is_dict(buf)
            while True:
                if pos > limit:
                    base += pos
                    buf, eof = _fill(read, buf, pos, chunk, chunk)
                    n, pos = len(buf), 0
                    limit = _NO_LIMIT if eof else n - _SLACK
                opos = pos
                op = buf[pos]
                pos += 1
                if op == 114:  # LONG_BINPUT (py2 memo ids pass 255 after the first clip)
                    k = _U4(buf, pos)[0]
                    v = memo[k] = stack[-1]
                    if v.__class__ is _Pending:
                        v.ids.append(k)
                    pos += 4
                elif op == 77:  # BININT2
                    stack.append(_U2(buf, pos)[0])
                    pos += 2
                elif op == 40:  # MARK
                    metastack.append(stack)
                    stack = []
                elif op == 75:  # BININT1
                    stack.append(buf[pos])
                    pos += 1
                elif op == 93:  # EMPTY_LIST
                    stack.append([])
                elif op == 101:  # APPENDS
                    items = stack
                    stack = metastack.pop()
                    target = stack[-1]
                    if target.__class__ is not list:
                        raise _Bad(f"APPENDS to a {type(target).__name__}")
                    target.extend(items)
                elif op == 71:  # BINFLOAT
                    stack.append(_F8(buf, pos)[0])
                    pos += 8
                elif op == 104:  # BINGET
                    try:
                        v = memo[buf[pos]]
                    except KeyError:
                        raise _Bad(pruner.missing(buf[pos])) from None
                    pos += 1
                    if v is _RECONSTRUCT and (m := _PY2_ARRAY(buf, pos)) is not None:
                        # superinstruction: the 16 opcodes of a py2 numpy 1-D array
                        nd, q1, r4, k1, m2, dt, u1, t4 = m.groups()
                        dtype = memo.get(dt[0])
                        count = k1[0] if k1 is not None else _U2(m2)[0]
                        start = m.end()
                        end = start + (u1[0] if u1 is not None else _I4(t4)[0])
                        if (memo.get(nd[0]) is _NDARRAY and isinstance(dtype, np.dtype)
                                and end - start == count * dtype.itemsize and end + 2 <= n
                                and buf[end] == 116 and buf[end + 1] == 98):  # TUPLE BUILD
                            v = np.frombuffer(buf, dtype, count, start).copy()
                            memo[q1[0] if q1 is not None else _U4(r4)[0]] = v
                            pos = end + 2
                    stack.append(v)
                elif op == 85 or op == 67:  # SHORT_BINSTRING (py2 str), SHORT_BINBYTES
                    end = pos + 1 + buf[pos]
                    if end > n:
                        base += pos
                        buf, eof = _fill(read, buf, pos, end - pos, chunk)
                        n, end, pos, limit = len(buf), end - pos, 0, len(buf) - _SLACK
                        if end > n:
                            raise _Truncated
                    stack.append(buf[pos + 1:end])
                    pos = end
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 113:  # BINPUT
                    k = buf[pos]
                    v = memo[k] = stack[-1]
                    if v.__class__ is _Pending:
                        v.ids.append(k)
                    pos += 1
                elif op == 0x94:  # MEMOIZE
                    k = len(memo) + pruner.dropped
                    v = memo[k] = stack[-1]
                    if v.__class__ is _Pending:
                        v.ids.append(k)
                elif op == 82:  # REDUCE: only rayvid's own reconstructors, never a call
                    args = stack.pop()
                    fn = stack[-1]
                    if fn.__class__ is not _Global:
                        raise _Unsafe(type(fn).__name__, "REDUCE of an object that is not "
                                      "an allowed global")
                    stack[-1] = fn.reduce(args)
                elif op == 98:  # BUILD
                    state = stack.pop()
                    obj = stack[-1]
                    if obj.__class__ is not _Pending:
                        raise _Bad(f"BUILD of a {type(obj).__name__} is not supported")
                    v = stack[-1] = obj.finish(state)
                    for k in obj.ids:
                        memo[k] = v
                elif op == 116:  # TUPLE
                    items = tuple(stack)
                    stack = metastack.pop()
                    stack.append(items)
                elif op == 0x87:  # TUPLE3
                    c = stack.pop()
                    b = stack.pop()
                    stack[-1] = (stack[-1], b, c)
                elif op == 0x89:  # NEWFALSE
                    stack.append(False)
                elif op == 84:  # BINSTRING (py2 str: the feature vectors)
                    end = pos + 4 + _I4(buf, pos)[0]
                    if end < pos + 4:
                        raise _Bad("negative BINSTRING length")
                    if end > n:
                        base += pos
                        buf, eof = _fill(read, buf, pos, end - pos, chunk)
                        n, end, pos, limit = len(buf), end - pos, 0, len(buf) - _SLACK
                        if end > n:
                            raise _Truncated
                    stack.append(buf[pos + 4:end])
                    pos = end
                elif op == 0x86:  # TUPLE2
                    b = stack.pop()
                    stack[-1] = (stack[-1], b)
                elif op == 106:  # LONG_BINGET
                    k = _U4(buf, pos)[0]
                    try:
                        stack.append(memo[k])
                    except KeyError:
                        raise _Bad(pruner.missing(k)) from None
                    pos += 4
                elif op == 97:  # APPEND
                    v = stack.pop()
                    target = stack[-1]
                    if target.__class__ is not list:
                        raise _Bad(f"APPEND to a {type(target).__name__}")
                    target.append(v)
                elif op == 74:  # BININT
                    stack.append(_I4(buf, pos)[0])
                    pos += 4
                elif op == 78:  # NONE
                    stack.append(None)
                elif op == 0x88:  # NEWTRUE
                    stack.append(True)
                elif op in _VAROPS:
                    width, unpack, convert = _VAROPS[op]
                    end = pos + width + unpack(buf, pos)[0]
                    if end < pos + width:
                        raise _Bad("negative length")
                    if end > n:
                        base += pos
                        buf, eof = _fill(read, buf, pos, end - pos, chunk)
                        n, end, pos, limit = len(buf), end - pos, 0, len(buf) - _SLACK
                        if end > n:
                            raise _Truncated
                    stack.append(convert(buf[pos + width:end]))
                    pos = end
                elif op == 117 or op == 115:  # SETITEMS, SETITEM
                    if op == 117:
                        items = stack
                        stack = metastack.pop()
                    else:
                        items = stack[-2:]
                        del stack[-2:]
                    target = stack[-1]
                    if target.__class__ is not dict or len(items) % 2:
                        raise _Bad("SETITEM(S) needs a dict and key/value pairs")
                    if stream and len(stack) == 1 and not metastack:  # the top-level dict
                        for i in range(0, len(items), 2):
                            k, v = items[i], items[i + 1]
                            items[i] = items[i + 1] = None  # the consumer may free values
                            hash(k)  # a dict key must be hashable, as in a real load
                            yield k, v
                        k = v = None
                        pruner.prune(memo, len(items) // 2)
                    else:
                        for i in range(0, len(items), 2):
                            target[items[i]] = items[i + 1]
                elif op == 125:  # EMPTY_DICT
                    stack.append({})
                elif op == 41:  # EMPTY_TUPLE
                    stack.append(())
                elif op in _LINE_OPS:
                    lines = []
                    for _ in range(2 if op == 99 or op == 105 else 1):
                        nl = buf.find(b"\n", pos)
                        if nl < 0:
                            base += pos
                            buf = _fill_line(read, buf, pos)
                            n, pos, limit = len(buf), 0, len(buf) - _SLACK
                            nl = buf.find(b"\n")
                            if nl < 0:
                                raise _Truncated
                        lines.append(buf[pos:nl])
                        pos = nl + 1
                    line = lines[0].rstrip(b"\r")
                    if op == 99 or op == 105:  # GLOBAL, INST
                        g = _resolve_global(lines[0].decode(), lines[1].decode())
                        if op == 105:
                            raise _Unsafe(g.qualname, "INST is not supported")
                        stack.append(g)
                    elif op == 112:  # PUT
                        k = int(line)
                        v = memo[k] = stack[-1]
                        if v.__class__ is _Pending:
                            v.ids.append(k)
                    elif op == 103:  # GET
                        try:
                            stack.append(memo[int(line)])
                        except KeyError:
                            raise _Bad(pruner.missing(int(line))) from None
                    else:
                        stack.append(_text_value(op, line))
                elif op == 0x93:  # STACK_GLOBAL
                    name = stack.pop()
                    module = stack[-1]
                    if module.__class__ is not str or name.__class__ is not str:
                        raise _Bad("STACK_GLOBAL needs two str")
                    stack[-1] = _resolve_global(module, name)
                elif op == 0x81:  # NEWOBJ
                    args = stack.pop()
                    cls = stack[-1]
                    if cls.__class__ is not _Global:
                        raise _Unsafe(type(cls).__name__, "NEWOBJ of a non-global object")
                    stack[-1] = cls.newobj(args)
                elif op == 0x8a:  # LONG1
                    end = pos + 1 + buf[pos]
                    if end > n:
                        raise _Truncated
                    stack.append(_long(buf[pos + 1:end]))
                    pos = end
                elif op == 100 or op == 108:  # DICT, LIST
                    items = stack
                    stack = metastack.pop()
                    if op == 108:
                        stack.append(items)
                    elif len(items) % 2:
                        raise _Bad("DICT needs key/value pairs")
                    else:
                        stack.append(dict(zip(items[0::2], items[1::2])))
                elif op == 48:  # POP
                    if stack:
                        stack.pop()
                    else:
                        stack = metastack.pop()
                elif op == 49:  # POP_MARK
                    stack = metastack.pop()
                elif op == 50:  # DUP
                    stack.append(stack[-1])
                elif op == 0x8f:  # EMPTY_SET
                    stack.append(set())
                elif op == 0x90 or op == 0x91:  # ADDITEMS, FROZENSET
                    items = stack
                    stack = metastack.pop()
                    if op == 0x91:
                        stack.append(frozenset(items))
                    elif stack[-1].__class__ is set:
                        stack[-1].update(items)
                    else:
                        raise _Bad("ADDITEMS to a non-set")
                elif op == 0x80:  # PROTO
                    if buf[pos] > 5:
                        raise _Bad(f"unsupported pickle protocol {buf[pos]}")
                    pos += 1
                elif op == 0x95:  # FRAME: our own buffer makes frames irrelevant
                    pos += 8
                elif op == 46:  # STOP
                    if metastack or len(stack) != 1:
                        raise _Bad("STOP with an open MARK or not exactly one object")
                    if not stream:
                        yield None, stack[0]
                    elif stack[0].__class__ is not dict:
                        raise _Bad("the top-level object is not a dict")
                    elif stack[0]:  # items given to DICT directly (never by a pickler)
                        pairs = list(stack[0].items())
                        stack[0].clear()
                        yield from pairs
                    return
                elif op in _REFUSED:
                    raise _Bad(f"opcode {_REFUSED[op]} is not supported")
                else:
                    raise _Bad(f"unknown opcode 0x{op:02x}")
        except _Unsafe as e:
            raise UnsafePickleError(path, base + opos, e.name, str(e)) from None
        except _Bad as e:
            raise PickleFormatError(path, base + opos, str(e)) from None
        except (_Truncated, struct.error):
            raise PickleFormatError(path, base + opos, "truncated: the file ends inside "
                                    "an opcode") from None
        except IndexError:
            msg = ("truncated: the file ends before STOP" if pos >= n else
                   "stack underflow (an opcode found no value or no MARK)")
            raise PickleFormatError(path, base + opos, msg) from None
        except (TypeError, ValueError, OverflowError, KeyError) as e:
            raise PickleFormatError(path, base + opos, f"malformed data: {e!r}") from None


def iter_dict_items(path: str | os.PathLike, *,
                    stats: WalkStats | None = None) -> Iterator[tuple[bytes, object]]:
    """Stream the (key, value) pairs of the dict pickled in ``path``, in file order.

    Keys as stored (``bytes`` for python 2 ``str``, ``str`` for unicode). Memory: one
    SETITEMS batch (1000 clips in py2 files) plus bounded memo atoms. ``stats`` (optional)
    is updated after every batch.
    Raises UnsafePickleError for any global outside the allow-list and PickleFormatError
    for malformed, truncated or non-dict pickles.
    """
    return _walk(os.fspath(path), True, stats)


def load(path: str | os.PathLike) -> object:
    """The whole object pickled in ``path``, read by the same restricted walker."""
    for _, obj in _walk(os.fspath(path), False):
        return obj
    raise AssertionError("unreachable: the walker yields the object or raises")
