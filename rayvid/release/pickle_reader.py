"""Restricted, streaming reader for the release's pickles (Python 2 cPickle, or any pickler).

The iQIYI-VID-2019 features ship as pickles of one dict each (clip name -> faces / heads /
bodies / audio vector), several GB per file. ``pickle.load`` would run whatever the file
names and hold the whole dict, so rayvid walks the opcodes itself:

    for clip, faces in iter_dict_items("face_train_v2.pickle"):   # streams, bounded memory
        ...
    small = load("some.pickle")                                     # a whole (small) pickle

**Nothing in a pickle is ever called.** Globals resolve against `rayvid.release.pickle_allowlist`
(numpy arrays, dtypes and scalars, builtin containers, ``_codecs.encode``); anything else
raises `UnsafePickleError` (file, ``module.name``, byte offset) when it is read, before any
later opcode runs. Values come back as ``pickle.load(f, encoding="bytes")`` returns them:
py2 ``str`` and py3 ``bytes`` as ``bytes``, unicode as ``str``, numbers, ``None``,
containers, writable bit-exact ``numpy.ndarray`` copies, dtypes and numpy scalars.

**Bounded memory, exactly.** A pickler memoizes objects and may fetch any of them again
at any later point (CPython's picklers store numpy's shared typecode ``b'b'`` once and
fetch it for every later array; Python 2's cPickle shares globals and dtypes the same way).
So ``iter_dict_items`` reads the file twice: `rayvid.release.pickle_scan.scan_references` first
finds, for every memo id that is ever fetched, the offset of its last fetch; the walk then
memoizes only those ids and drops each at that offset. The top-level dict is never filled:
each ``MARK k v ... SETITEMS`` batch (1000 items in py2 files) is yielded and released.
Memory is one batch plus the objects the file itself still refers back to; for the
release that is a handful of globals, dtypes and short strings. A file that keeps more
than ``max_shared_bytes`` alive that way (containers shared across clips) fails with an
error naming the file and offset, instead of growing without bound; ``load`` reads it.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from rayvid.release import pickle_scan
from rayvid.release.pickle_allowlist import NDARRAY, RECONSTRUCT, Bad, Global, Pending, Unsafe, \
    native_order, resolve_global
from rayvid.release.pickle_opcodes import I4, PY2_ARRAY, REFUSED, U2, U4, VAROPS, text_value

__all__ = ["PickleFormatError", "ReleaseFormatError", "UnsafePickleError", "WalkStats",
           "iter_dict_items", "load"]

MAX_SHARED_BYTES = 1 << 30  # objects kept alive across batches by back-references
_NO_LIMIT = sys.maxsize


class ReleaseFormatError(ValueError):
    """A release file does not have the layout rayvid expects."""


class PickleFormatError(ReleaseFormatError):
    """A pickle is malformed, truncated or uses something the walker does not support."""

    def __init__(self, path: str | os.PathLike, offset: int, message: str):
        self.path, self.offset, self.detail = os.fspath(path), offset, message
        super().__init__(f"{self.path}: byte {offset}: {message}")

    def __reduce__(self):  # survives a process boundary (parallel prepare)
        return type(self), (self.path, self.offset, self.detail)


class UnsafePickleError(ReleaseFormatError):
    """A pickle names a global (a callable) that rayvid does not rebuild itself."""

    def __init__(self, path: str | os.PathLike, offset: int, global_name: str, message: str):
        self.path, self.offset, self.global_name = os.fspath(path), offset, global_name
        self.detail = message
        super().__init__(f"{self.path}: byte {offset}: refusing '{global_name}': {message}")

    def __reduce__(self):
        return type(self), (self.path, self.offset, self.global_name, self.detail)


@dataclass
class WalkStats:
    """Counters a caller may pass to ``iter_dict_items`` (diagnostics, tests, benchmarks)."""

    items: int = 0
    batches: int = 0
    referenced: int = 0  # memo ids the file fetches at least once (pass 1)
    live: int = 0  # memo entries alive after the last batch
    max_live: int = 0
    max_live_bytes: int = 0  # approximate size of those entries, at most


class _Truncated(Exception):
    """Internal: the file ends inside an opcode."""


_F8 = struct.Struct(">d").unpack_from


def _approx_nbytes(v) -> int:
    """Rough size of a memo entry and the arrays/strings it holds directly."""
    if isinstance(v, np.ndarray):
        return v.nbytes + 112
    if isinstance(v, (list, tuple, set, frozenset)):
        return sys.getsizeof(v) + sum(_approx_nbytes(x) for x in v if not isinstance(
            x, (list, tuple, dict, set, frozenset)))
    if isinstance(v, dict):
        return sys.getsizeof(v) + sum(map(_approx_nbytes, v.values()))
    return sys.getsizeof(v) if not isinstance(v, (Global, Pending, np.dtype)) else 64


class _Walker:
    """One pass over one file: `run()` yields the top dict's items (stream) or the object."""

    def __init__(self, f, path: str, stream: bool, refs: dict[int, int] | None,
                 stats: WalkStats | None, max_shared_bytes: int):
        self.read, self.path, self.stream, self.refs = f.read, path, stream, refs
        self.stats, self.max_shared_bytes = stats or WalkStats(), max_shared_bytes
        self.size = os.fstat(f.fileno()).st_size
        self.chunk = max(1, min(pickle_scan.CHUNK, self.size))
        self.buf, self.base, self.eof = b"", 0, False
        self.limit = 0
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict = {}
        self.memo_len = 0  # MEMOIZE's next id: the unpickler's memo length
        self.saw_put = False  # explicit PUT ids seen (text PUT; BINPUT is tracked in run)
        self.top = None  # the top-level dict (stream): never filled
        self.error_at = (0, 0)  # (base, opos) of the opcode that raised
        # Stand-ins (Global, Pending) pushed and not yet consumed by REDUCE/NEWOBJ/BUILD:
        # a cheap upper bound; only when it is non-zero is a yielded value searched for one.
        self.loose = 0

    # --- buffer ---------------------------------------------------------------------------

    def refill(self, keep: int, need: int) -> None:
        """Make the buffer start at ``keep`` and hold ``need`` bytes (or all that is left)."""
        buf, self.eof = pickle_scan.fill(self.read, self.buf, keep, need, self.chunk)
        self.buf, self.base = buf, self.base + keep
        self.limit = _NO_LIMIT if self.eof else len(buf) - pickle_scan.SLACK

    def span(self, keep: int, end: int) -> None:
        """Like refill, for an argument that must end at ``end``; _Truncated if it can't.

        A length past the end of the file is refused before anything is read (a corrupt
        8-byte length must not become an allocation)."""
        if self.base + end > self.size:
            raise _Truncated
        buf, eof = pickle_scan.fill(self.read, self.buf, keep, end - keep, self.chunk)
        if len(buf) < end - keep:
            raise _Truncated
        self.buf, self.base, self.eof = buf, self.base + keep, eof
        self.limit = _NO_LIMIT if eof else len(buf) - pickle_scan.SLACK

    def lines(self, pos: int, count: int) -> tuple[list[bytes], int]:
        """``count`` newline-ended argument lines from ``pos``; -> (lines, pos after)."""
        out = []
        for _ in range(count):
            nl = self.buf.find(b"\n", pos)
            if nl < 0:
                self.buf = pickle_scan.fill_line(self.read, self.buf, pos)
                self.base += pos
                self.limit, pos = len(self.buf) - pickle_scan.SLACK, 0
                nl = self.buf.find(b"\n")
                if nl < 0:
                    raise _Truncated
            out.append(self.buf[pos:nl])
            pos = nl + 1
        return out, pos

    # --- memo -----------------------------------------------------------------------------

    def put(self, k: int, v) -> None:
        """Memoize ``v`` as id ``k`` if the file fetches it later (always, for load)."""
        if self.refs is not None and k not in self.refs:
            return
        if v is self.top and self.top is not None:
            raise Bad("the top-level dict is referenced from inside itself; use load()")
        self.memo[k] = v
        if v.__class__ is Pending:
            v.ids.append(k)

    def get(self, k: int, offset: int):
        """Memo entry ``k`` fetched by the opcode at absolute ``offset``."""
        try:
            v = self.memo[k]
        except KeyError:
            raise Bad(f"memo entry {k} was never stored") from None
        if self.refs is not None and self.refs.get(k) == offset:
            del self.memo[k]  # its last fetch in the file
        if v.__class__ is Global or v.__class__ in _CONTAINERS or v.__class__ is dict:
            self.loose += 1  # a stand-in, or a container that may hold one
        elif v.__class__ is Pending:
            raise Bad(f"memo entry {k} is fetched before its BUILD (not supported)")
        return v

    def after_batch(self, items: int) -> None:
        """Counters, and the bound on what back-references keep alive between batches."""
        s = self.stats
        s.items, s.batches, s.live = s.items + items, s.batches + 1, len(self.memo)
        s.max_live = max(s.max_live, s.live)
        if self.refs is not None and self.memo:
            size = sum(map(_approx_nbytes, self.memo.values()))
            s.max_live_bytes = max(s.max_live_bytes, size)
            if size > self.max_shared_bytes:
                raise Bad(f"{len(self.memo)} objects (~{size >> 20} MiB) stay referenced "
                          "across top-level items, over the streaming reader's bound of "
                          f"{self.max_shared_bytes >> 20} MiB; use load() if it fits")

    # --- opcodes that are rare in release files -----------------------------------------------

    def cold(self, op: int, pos: int) -> int:
        """Run opcode ``op`` whose argument starts at ``pos``; -> the next opcode's pos."""
        stack = self.stack
        if op in VAROPS:  # length-prefixed: LONG1/4, BINBYTES8, BINUNICODE8, ...
            width, unpack, convert = VAROPS[op]
            start = pos + width
            end = start + unpack(self.buf, pos)[0]
            if end < start:
                raise Bad("negative length")
            if end > len(self.buf):
                self.span(pos, end)
                start, end = start - pos, end - pos
            stack.append(convert(self.buf[start:end]))
            return end
        if op in b"ILFSVpgci":  # protocol-0 text arguments
            return self.text_op(op, pos)
        if op == 0x93:  # STACK_GLOBAL
            name = stack.pop()
            module = stack[-1]
            if module.__class__ is not str or name.__class__ is not str:
                raise Bad("STACK_GLOBAL needs two str")
            stack[-1] = resolve_global(module, name)
            self.loose += 1
        elif op == 0x81:  # NEWOBJ
            args = stack.pop()
            if stack[-1].__class__ is not Global:
                raise Unsafe(type(stack[-1]).__name__, "NEWOBJ of a non-global object")
            stack[-1] = stack[-1].newobj(args)
            self.loose -= 1
        elif op == 100 or op == 108 or op == 0x91:  # DICT, LIST, FROZENSET (from a MARK)
            items = self.pop_mark()
            if op == 108:
                self.stack.append(items)
            elif op == 0x91:
                self.stack.append(frozenset(items))
            elif len(items) % 2:
                raise Bad("DICT needs key/value pairs")
            else:
                self.stack.append(dict(zip(items[0::2], items[1::2])))
        elif op == 0x90:  # ADDITEMS
            items = self.pop_mark()
            if self.stack[-1].__class__ is not set:
                raise Bad("ADDITEMS to a non-set")
            self.stack[-1].update(items)
        elif op == 0x8f:
            stack.append(set())
        elif op == 48:  # POP: the top item, or a MARK with nothing above it
            if stack:
                stack.pop()
            else:
                self.pop_mark()
        elif op == 49:  # POP_MARK
            self.pop_mark()
        elif op == 50:  # DUP
            stack.append(stack[-1])
        elif op == 97:  # APPEND
            v = stack.pop()
            if stack[-1].__class__ is not list:
                raise Bad(f"APPEND to a {type(stack[-1]).__name__}")
            stack[-1].append(v)
        elif op == 0x80:  # PROTO
            if self.buf[pos] > 5:
                raise Bad(f"unsupported pickle protocol {self.buf[pos]}")
            return pos + 1
        elif op == 0x95:  # FRAME: our own buffer makes frames irrelevant
            if self.base + pos + 8 > self.size:
                raise _Truncated
            return pos + 8
        elif op in REFUSED:
            raise Bad(f"opcode {REFUSED[op]} is not supported")
        else:
            raise Bad(f"unknown opcode 0x{op:02x}")
        return pos

    def text_op(self, op: int, pos: int) -> int:
        (line, *second), pos = self.lines(pos, 2 if op in b"ci" else 1)
        if op == 99 or op == 105:  # GLOBAL, INST
            g = resolve_global(line.decode("utf-8"), second[0].decode("utf-8"))
            self.loose += 1
            if op == 105:
                raise Unsafe(g.qualname, "INST is not supported")
            self.stack.append(g)
        elif op == 112:  # PUT
            self.saw_put = True
            self.put(int(line), self.stack[-1])
        elif op == 103:  # GET
            self.stack.append(self.get(int(line), self.base + pos - len(line) - 2))
        else:
            self.stack.append(text_value(op, line.rstrip(b"\r")))
        return pos

    def pop_mark(self) -> list:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    # --- the walk -------------------------------------------------------------------------------

    def run(self):
        """Yield the top dict's (key, value) pairs (stream) or one (None, top object).

        Internal errors become PickleFormatError/UnsafePickleError at the offset of the
        opcode that failed (``base + opos``: both are rebased together when the buffer moves
        inside an opcode).
        """
        try:
            self.refill(0, self.chunk)
            if not self.buf:
                raise Bad("empty file")
            if self.stream:
                _check_top_is_dict(self.buf)
            yield from self.loop()
        except GeneratorExit:
            raise
        except Exception as e:
            base, opos = self.error_at
            raise self.public_error(e, min(base + opos, self.size)) from None

    def public_error(self, e: Exception, offset: int) -> Exception:
        """The PickleFormatError/UnsafePickleError for internal error ``e``, or ``e`` itself."""
        path = self.path
        if isinstance(e, Unsafe):
            return UnsafePickleError(path, offset, e.name, str(e))
        if isinstance(e, Bad):
            return PickleFormatError(path, offset, str(e))
        if isinstance(e, (_Truncated, struct.error)):
            return PickleFormatError(path, offset, "truncated: the file ends inside an opcode")
        if isinstance(e, IndexError):
            at_end = self.eof and offset >= self.base + len(self.buf) - 1
            return PickleFormatError(path, offset, "truncated: the file ends before STOP"
                                     if at_end else "stack underflow (an opcode found no "
                                     "value or no MARK)")
        if isinstance(e, RecursionError):
            return PickleFormatError(path, offset, "objects nested too deeply")
        if isinstance(e, (TypeError, ValueError, ArithmeticError, LookupError, AttributeError)):
            return PickleFormatError(path, offset, f"malformed data: {e!r}")
        return e

    def loop(self):
        """The opcode loop. The hot opcodes of release files (py2 cPickle, CPython protocols
        2-5) run inline, ordered by frequency, with one superinstruction for a py2 numpy
        1-D array; the rest go through `cold`. Locals mirror the buffer and the stack for
        speed; they are written back before, and re-read after, any call that may move them.
        ``self.error_at`` is (base, opos) of the opcode running when anything raises.
        """
        buf, base, limit = self.buf, self.base, self.limit
        pos = opos = 0
        n = len(buf)
        stack, metastack, refs, memo = self.stack, self.metastack, self.refs, self.memo
        streaming, saw_put = self.stream, False
        try:
            while True:
                if pos > limit:
                    self.refill(pos, self.chunk)
                    buf, base, limit, n = self.buf, self.base, self.limit, len(self.buf)
                    pos = 0
                opos = pos
                op = buf[pos]
                pos += 1
                if op == 114 or op == 113:  # LONG_BINPUT, BINPUT
                    if op == 113:
                        k = buf[pos]
                        pos += 1
                    else:
                        k = U4(buf, pos)[0]
                        pos += 4
                    saw_put = True
                    v = stack[-1]  # an empty stack is an error even if k is never fetched
                    if refs is None or k in refs:
                        self.put(k, v)
                elif op == 77:  # BININT2
                    stack.append(U2(buf, pos)[0])
                    pos += 2
                elif op == 40:  # MARK
                    metastack.append(stack)
                    stack = self.stack = []
                elif op == 75:  # BININT1
                    stack.append(buf[pos])
                    pos += 1
                elif op == 93:  # EMPTY_LIST
                    stack.append([])
                elif op == 101:  # APPENDS
                    items = stack
                    stack = self.stack = metastack.pop()
                    if stack[-1].__class__ is not list:
                        raise Bad(f"APPENDS to a {type(stack[-1]).__name__}")
                    stack[-1].extend(items)
                elif op == 71:  # BINFLOAT
                    stack.append(_F8(buf, pos)[0])
                    pos += 8
                elif op == 104 or op == 106:  # BINGET, LONG_BINGET
                    if op == 104:
                        k = buf[pos]
                        pos += 1
                    else:
                        k = U4(buf, pos)[0]
                        pos += 4
                    if memo.get(k) is RECONSTRUCT and (m := PY2_ARRAY(buf, pos)) is not None:
                        end = self.py2_array(m, base, opos)
                        if end:
                            pos = end
                            continue
                    stack.append(self.get(k, base + opos))
                elif op == 85 or op == 67:  # SHORT_BINSTRING (py2 str), SHORT_BINBYTES
                    end = pos + 1 + buf[pos]
                    if end > n:
                        self.span(pos, end)
                        buf, base, limit, n = self.buf, self.base, self.limit, len(self.buf)
                        end, opos, pos = end - pos, opos - pos, 0
                    stack.append(buf[pos + 1:end])
                    pos = end
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 0x94:  # MEMOIZE: the next id is the unpickler's memo length
                    if saw_put or self.saw_put:
                        raise Bad("mixes MEMOIZE with explicit PUT ids (no pickler does)")
                    self.put(self.memo_len, stack[-1])
                    self.memo_len += 1
                elif op == 82:  # REDUCE: only rayvid's own reconstructors, never a call
                    args = stack.pop()
                    fn = stack[-1]
                    if fn.__class__ is not Global:
                        raise Unsafe(type(fn).__name__, "REDUCE of an object that is not an "
                                     "allowed global")
                    v = stack[-1] = fn.reduce(args)
                    # the callable is consumed, and _reconstruct's ndarray argument
                    self.loose += (v.__class__ is Pending) - 1 - (fn is RECONSTRUCT)
                elif op == 98:  # BUILD
                    state = stack.pop()
                    obj = stack[-1]
                    if obj.__class__ is not Pending:
                        raise Bad(f"BUILD of a {type(obj).__name__} is not supported")
                    v = stack[-1] = obj.finish(state)
                    self.loose -= 1
                    for k in obj.ids:
                        memo[k] = v
                elif op == 116:  # TUPLE
                    items = tuple(stack)
                    stack = self.stack = metastack.pop()
                    stack.append(items)
                elif op == 0x87:  # TUPLE3
                    c = stack.pop()
                    b = stack.pop()
                    stack[-1] = (stack[-1], b, c)
                elif op == 0x86:  # TUPLE2
                    b = stack.pop()
                    stack[-1] = (stack[-1], b)
                elif op == 0x89 or op == 0x88:  # NEWFALSE, NEWTRUE
                    stack.append(op == 0x88)
                elif op == 84 or op == 88 or op == 66 or op == 0x8c:
                    # BINSTRING (py2 str), BINUNICODE, BINBYTES, SHORT_BINUNICODE
                    if op == 0x8c:
                        start, size = pos + 1, buf[pos]
                    else:
                        start, size = pos + 4, (I4 if op == 84 else U4)(buf, pos)[0]
                        if size < 0:
                            raise Bad("negative BINSTRING length")
                    end = start + size
                    if end > n:
                        self.span(pos, end)
                        buf, base, limit, n = self.buf, self.base, self.limit, len(self.buf)
                        start, end, opos, pos = start - pos, end - pos, opos - pos, 0
                    raw = buf[start:end]
                    stack.append(raw if op == 84 or op == 66 else
                                 raw.decode("utf-8", "surrogatepass"))
                    pos = end
                elif op == 74:  # BININT
                    stack.append(I4(buf, pos)[0])
                    pos += 4
                elif op == 78:  # NONE
                    stack.append(None)
                elif op == 117 or op == 115:  # SETITEMS, SETITEM
                    if op == 117:
                        items = stack
                        stack = self.stack = metastack.pop()
                    else:
                        items = stack[-2:]
                        del stack[-2:]
                    target = stack[-1]
                    if target.__class__ is not dict or len(items) % 2:
                        raise Bad("SETITEM(S) needs a dict and key/value pairs")
                    if streaming and target is self.top and not metastack:
                        for i in range(0, len(items), 2):
                            k, v = items[i], items[i + 1]
                            items[i] = items[i + 1] = None  # the consumer may free values
                            hash(k)  # a dict key must be hashable, as in a real load
                            if self.loose:
                                _check_plain(k)
                                _check_plain(v)
                            yield k, v
                        k = v = None
                        self.loose = 0  # every stand-in pushed so far is in no value
                        self.after_batch(len(items) // 2)
                    else:
                        for i in range(0, len(items), 2):
                            target[items[i]] = items[i + 1]
                elif op == 125:  # EMPTY_DICT
                    stack.append({})
                    if streaming and self.top is None:
                        self.top = stack[-1]
                elif op == 41:  # EMPTY_TUPLE
                    stack.append(())
                elif op == 46:  # STOP
                    if metastack or len(stack) != 1:
                        raise Bad("STOP with an open MARK or not exactly one object")
                    if self.loose:
                        _check_plain(stack[0])
                    if not streaming:
                        yield None, stack[0]
                    elif stack[0] is not self.top:
                        raise Bad("the top-level object is not a dict")
                    elif stack[0]:  # items given to DICT directly (protocol 0 `(...d`)
                        pairs = list(stack[0].items())
                        stack[0].clear()
                        yield from pairs
                    return
                else:  # GLOBAL and everything rare
                    self.stack = stack
                    pos = self.cold(op, pos)
                    stack = self.stack
                    buf, base, limit, n = self.buf, self.base, self.limit, len(self.buf)
                    if streaming and self.top is None and op == 100 and len(stack) == 1:
                        self.top = stack[0]  # protocol 0: `(d` starts the top-level dict
        except GeneratorExit:
            raise
        except BaseException:
            self.error_at = (base, opos)
            raise

    def array_of(self, m) -> tuple[np.ndarray, int] | None:
        """(array, pos after its BUILD) for a PY2_ARRAY match, or None when the match does not
        check out (then the opcodes run one by one). No side effects."""
        nd, _, _, k1, m2, dt, u1, t4 = m.groups()
        memo, buf = self.memo, self.buf
        dtype, count = memo.get(dt[0]), k1[0] if k1 is not None else U2(m2)[0]
        start = m.end()
        end = start + (u1[0] if u1 is not None else I4(t4)[0])
        if not (memo.get(nd[0]) is NDARRAY and isinstance(dtype, np.dtype)
                and end - start == count * dtype.itemsize and end + 2 <= len(buf)
                and buf[end] == 116 and buf[end + 1] == 98):  # TUPLE BUILD
            return None
        return native_order(np.frombuffer(buf, dtype, count, start).copy()), end + 2

    def commit_array(self, m, arr: np.ndarray, base: int, get_pos: int) -> None:
        """The memo effects of the 17 opcodes a PY2_ARRAY match stands for: the fetches of
        _reconstruct (at ``get_pos``), ndarray and the dtype, and the array's BINPUT."""
        memo, refs = self.memo, self.refs
        if refs is not None:
            recon = self.buf_id(get_pos)
            if refs.get(recon) == base + get_pos:
                del memo[recon]
            nd, dt = m[1][0], m[6][0]
            if refs.get(nd) == base + m.start(1) - 1:
                del memo[nd]
            if refs.get(dt) == base + m.start(6) - 1:
                del memo[dt]
        self.put(m[2][0] if m[2] is not None else U4(m[3])[0], arr)

    def buf_id(self, pos: int) -> int:
        """The memo id of the BINGET/LONG_BINGET at ``pos``."""
        return self.buf[pos + 1] if self.buf[pos] == 104 else U4(self.buf, pos + 1)[0]

    def py2_array(self, m, base: int, get_pos: int) -> int:
        """Push the array of a PY2_ARRAY match after the BINGET of _reconstruct at ``get_pos``;
        -> the next opcode's pos, or 0 to run the opcodes one by one."""
        built = self.array_of(m)
        if built is None:
            return 0
        self.commit_array(m, built[0], base, get_pos)
        self.stack.append(built[0])
        return built[1]


_LEAVES = frozenset((bytes, str, int, float, bool, type(None), complex, bytearray, np.ndarray))
_CONTAINERS = frozenset((list, tuple, set, frozenset))


def _check_plain(value) -> None:
    """Bad if a stand-in escaped into the data: a global never REDUCEd (pickle.load would
    return the callable itself) or an array/dtype whose BUILD never came."""
    todo, seen = [value], set()
    while todo:
        v = todo.pop()
        c = v.__class__
        if c in _LEAVES:
            continue
        if c in _CONTAINERS or c is dict:
            if id(v) not in seen:  # containers may be shared or cyclic (load)
                seen.add(id(v))
                todo.extend(v.items() if c is dict else v)
        elif c is Global or c is Pending:
            name = v.qualname if c is Global else "an array or dtype without its BUILD"
            raise Bad(f"the data holds {name} itself, not a value built from it "
                      "(not supported)")


def _check_top_is_dict(buf: bytes) -> None:
    p = 2 if buf[:1] == b"\x80" else 0
    if buf[p:p + 1] == b"\x95":  # FRAME
        p += 9
    if buf[p:p + 1] != b"}" and buf[p:p + 2] != b"(d":
        raise Bad("the top-level object is not a dict")


def _walk(path: str, stream: bool, refs, stats: WalkStats | None, max_shared_bytes: int):
    with open(path, "rb", buffering=0) as f:
        yield from _Walker(f, path, stream, refs, stats, max_shared_bytes).run()


def iter_dict_items(path: str | os.PathLike, *, stats: WalkStats | None = None,
                    max_shared_bytes: int = MAX_SHARED_BYTES) -> Iterator[tuple[object, object]]:
    """Stream the (key, value) pairs of the dict pickled in ``path``, in file order.

    Keys as stored (``bytes`` for Python 2 ``str``, ``str`` for unicode). Memory: one
    SETITEMS batch (1000 items in py2 files) plus the memoized objects the file fetches
    again later, each kept until its last fetch (see the module docstring). ``stats``
    (optional) is updated after every batch.
    Raises UnsafePickleError for any global outside the allow-list and PickleFormatError
    for malformed, truncated or non-dict pickles, naming the file and the byte offset.
    """
    path = os.fspath(path)
    refs = pickle_scan.scan_references(path)
    if stats is not None:
        stats.referenced = len(refs)
    return _walk(path, True, refs, stats, max_shared_bytes)


def load(path: str | os.PathLike) -> object:
    """The whole object pickled in ``path``, read by the same restricted walker."""
    for _, obj in _walk(os.fspath(path), False, None, None, MAX_SHARED_BYTES):
        return obj
    raise AssertionError("unreachable: the walker yields the object or raises")
