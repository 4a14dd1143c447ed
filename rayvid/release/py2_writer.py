"""Write a dict as Python 2.7 cPickle (protocol 2, numpy 1.x) would, byte for byte.

    write_dict("face_train_v2.pickle", ((b"IQIYI_VID_TRAIN_0000001", faces), ...))

Used by rayvid's simulator (`rayvid.release.simulator.release`) and by tests that need files in
the release's exact byte layout. Streams: memory holds one item at a time; the file is
written to a temporary name and renamed when complete. Reading is `rayvid.release.pickle_reader`.

What cPickle memoizes (Modules/cPickle.c `save`/`put`): every list, dict and non-empty
tuple, and every str/unicode of 2+ characters whose refcount is above 1 (items of a list
always are: the list iterator holds a reference). Strings of fewer than 2 characters are
never memoized (`save` special-cases them), so numpy's one-byte typecode ``'b'`` is written
inline in every array. Globals and dtypes are memoized once and re-used with ``BINGET``.
"""

from __future__ import annotations

import itertools
import os
import struct
import sys
from collections.abc import Iterable

import numpy as np

from rayvid.core.atomic import atomic_path

__all__ = ["write_dict"]

_P_I4, _P_U2, _P_U4, _P_F8 = (struct.Struct(f).pack for f in ("<i", "<H", "<I", ">d"))
_BATCH = 1000  # cPickle's BATCHSIZE for lists (and the default for the top dict)
_LITTLE = sys.byteorder == "little"
_END = object()


class _Py2Writer:
    """Encodes values as py2 cPickle would; memo ids count on across the whole file.

    cPickle memoizes (BINPUT) lists, dicts, tuples and str/unicode of 2+ characters held
    elsewhere; it never memoizes the temporaries of numpy's ``__reduce__`` (the args and
    state tuples, the raw data, 1-char strings such as ``'b'`` and ``'<'``). Globals and
    dtypes are memoized once and re-used with BINGET.
    """

    def __init__(self, numpy_scalars: bool):
        self.next_id = 1  # cPickle's put2 starts at 1 (pickle.py and python 3 at 0)
        self.refs: dict = {}  # ('g', module, name) or ('d', dtype.str) -> memo id
        self.numpy_scalars = numpy_scalars

    def put(self, out: bytearray) -> int:
        i = self.next_id
        self.next_id += 1
        out += b"q" + bytes((i,)) if i < 256 else b"r" + _P_U4(i)
        return i

    def get(self, out: bytearray, key) -> bool:
        i = self.refs.get(key)
        if i is None:
            return False
        out += b"h" + bytes((i,)) if i < 256 else b"j" + _P_U4(i)
        return True

    def save_global(self, out: bytearray, module: str, name: str) -> None:
        if not self.get(out, ("g", module, name)):
            out += f"c{module}\n{name}\n".encode()
            self.refs[("g", module, name)] = self.put(out)

    def save(self, out: bytearray, obj) -> None:
        t = obj.__class__
        if t is bytes:
            self.save_str(out, obj, memoize=len(obj) >= 2)
        elif t is float:
            out += b"G" + _P_F8(obj)
        elif t is int:
            self.save_int(out, obj)
        elif t is list:
            out += b"]"
            self.put(out)
            self.save_batches(out, obj, b"a", b"e")
        elif t is tuple:
            self.save_tuple(out, obj)
            if obj:
                self.put(out)
        elif t is np.ndarray:
            self.save_array(out, obj)
        elif t is str:
            data = obj.encode("utf-8", "surrogatepass")
            out += b"X" + _P_U4(len(data)) + data
            if len(obj) >= 2:
                self.put(out)
        elif obj is None:
            out += b"N"
        elif t is bool:
            out += b"\x88" if obj else b"\x89"
        elif t is dict:
            out += b"}"
            self.put(out)
            self.save_batches(out, obj.items(), b"s", b"u")
        elif isinstance(obj, np.ndarray):  # memmap and other subclasses
            self.save_array(out, np.asarray(obj))
        elif isinstance(obj, np.generic) and obj.dtype.kind in "biufc":
            if self.numpy_scalars:
                self.save_global(out, "numpy.core.multiarray", "scalar")
                self.save_dtype(out, obj.dtype)
                self.save_str(out, obj.tobytes(), memoize=False)
                out += b"\x86R"
                self.put(out)
            else:
                self.save(out, obj.item())
        else:
            raise TypeError(f"write_dict cannot write a {t.__name__}")

    def save_pair(self, out: bytearray, item: tuple) -> None:
        key, value = item
        if key.__class__ is not bytes and key.__class__ is not str:
            raise TypeError(f"dict keys must be bytes or str, got {key!r}")
        self.save(out, key)
        self.save(out, value)

    def save_str(self, out: bytearray, data: bytes, memoize: bool) -> None:
        n = len(data)
        out += (b"U" + bytes((n,)) if n < 256 else b"T" + _P_I4(n)) + data
        if memoize:
            self.put(out)

    def save_int(self, out: bytearray, v: int) -> None:
        if 0 <= v < 256:
            out += b"K" + bytes((v,))
        elif 0 <= v < 65536:
            out += b"M" + _P_U2(v)
        elif -(1 << 31) <= v < (1 << 31):
            out += b"J" + _P_I4(v)
        else:  # a py2 long
            data = v.to_bytes((v.bit_length() >> 3) + 1, "little", signed=True)
            if v < 0 and len(data) > 1 and data[-1] == 0xFF and data[-2] & 0x80:
                data = data[:-1]
            out += b"\x8a" + bytes((len(data),)) + data

    def save_tuple(self, out: bytearray, items: tuple) -> None:
        """The tuple without its BINPUT (callers decide, as cPickle's refcount test does)."""
        if not items:
            out += b")"
            return
        if len(items) > 3:
            out += b"("
        for x in items:
            self.save(out, x)
        out += b"t" if len(items) > 3 else b"\x84\x85\x86\x87"[len(items):len(items) + 1]

    def save_batches(self, out: bytearray, items: Iterable, one: bytes, many: bytes) -> None:
        """cPickle batch_list/batch_dict: MARK ... APPENDS/SETITEMS, a lone item without."""
        it = iter(items)
        pair = one == b"s"
        while batch := list(itertools.islice(it, _BATCH)):
            if len(batch) > 1:
                out += b"("
            for x in batch:
                if pair:
                    self.save(out, x[0])
                    self.save(out, x[1])
                else:
                    self.save(out, x)
            out += many if len(batch) > 1 else one
            if len(batch) < _BATCH:
                break

    def save_dtype(self, out: bytearray, dt: np.dtype) -> None:
        """numpy 1.x arraydescr_reduce: dtype(code, 0, 1) + state (3, endian, ...)."""
        if self.get(out, ("d", dt.str)):
            return
        if dt.kind not in "biufcSUV" or dt.fields is not None or dt.subdtype is not None:
            raise TypeError(f"write_dict cannot write dtype {dt}")
        flexible = dt.kind in "SUV"
        size = dt.itemsize // 4 if dt.kind == "U" else dt.itemsize
        endian = dt.byteorder if dt.byteorder != "=" else ("<" if _LITTLE else ">")
        self.save_global(out, "numpy", "dtype")
        self.save_str(out, f"{dt.kind}{size}".encode(), memoize=False)
        out += b"K\x00K\x01\x87R"
        self.refs[("d", dt.str)] = self.put(out)
        out += b"(K\x03U\x01" + endian.encode() + b"NNN"
        for v in (dt.itemsize, dt.alignment) if flexible else (-1, -1):
            self.save_int(out, v)
        self.save_int(out, int(dt.flags))
        out += b"tb"

    def save_array(self, out: bytearray, arr: np.ndarray) -> None:
        """numpy 1.x array_reduce: _reconstruct(ndarray, (0,), 'b') + state BUILD."""
        fortran = arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous
        self.save_global(out, "numpy.core.multiarray", "_reconstruct")
        self.save_global(out, "numpy", "ndarray")
        out += b"K\x00\x85U\x01b\x87R"
        self.put(out)
        out += b"(K\x01"
        self.save_tuple(out, tuple(int(s) for s in arr.shape))
        self.save_dtype(out, arr.dtype)
        out += b"\x88" if fortran else b"\x89"
        self.save_str(out, arr.tobytes(order="F" if fortran else "C"), memoize=False)
        out += b"tb"


def write_dict(path: str | os.PathLike, items: Iterable[tuple[bytes, object]],
               batch_size: int = _BATCH, *, numpy_scalars: bool = False) -> int:
    """Write ``items`` as one dict, the way python 2.7 cPickle protocol 2 would; -> count.

    Streams: items are encoded one at a time (``MARK k v ... SETITEMS`` batches of
    ``batch_size``, a lone last item with SETITEM) into a temporary file renamed to
    ``path`` at the end (``rayvid.core.atomic``). Keys: ``bytes`` (py2 str) or ``str`` (unicode). Values: bytes,
    str, int, float, bool, None, list, tuple, dict, numpy arrays of numeric dtypes; numpy
    scalars are written as plain python numbers unless ``numpy_scalars`` (then as py2
    numpy's ``numpy.core.multiarray.scalar``).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    w = _Py2Writer(numpy_scalars)
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        out = bytearray(b"\x80\x02}")
        w.put(out)
        it = iter(items)
        while (first := next(it, _END)) is not _END:
            second = next(it, _END) if batch_size > 1 else _END
            if second is _END:  # a lone item: no MARK, SETITEM (cPickle batch_dict)
                w.save_pair(out, first)
                out += b"s"
                count += 1
                if batch_size > 1:
                    break
                continue
            out += b"("
            n, item = 0, first
            while True:
                w.save_pair(out, item)
                n += 1
                if len(out) >= 1 << 20:
                    f.write(out)
                    out.clear()
                if n == 1:
                    item = second
                elif n == batch_size or (item := next(it, _END)) is _END:
                    break
            out += b"u"
            count += n
            if n < batch_size:
                break
        out += b"."
        f.write(out)
    return count
