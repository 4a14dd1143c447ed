"""The globals a release pickle may name, and rayvid's own code that rebuilds them.

`rayvid.release.pickle_reader` never calls anything a pickle names. A ``GLOBAL``/``STACK_GLOBAL``
resolves here to an inert `Global` stand-in, or raises `Unsafe` for any name off the list.
``REDUCE``/``NEWOBJ`` on a stand-in run the handler below for that name, with its
arguments checked first:

- ``numpy.core.multiarray._reconstruct`` (or ``numpy._core``) + ``BUILD``: a plain ndarray
  from (shape, dtype, fortran, raw bytes), a writable bit-exact copy, sizes checked first;
- ``numpy.dtype`` + ``BUILD``: numeric and byte/unicode dtypes (no object, datetime,
  structured); ``numpy.core.multiarray.scalar``: a numpy scalar from (dtype, raw bytes);
- ``numpy.core.numeric._frombuffer``: numpy's protocol-5 array form;
- ``_codecs.encode``: ``bytes`` from ``(str, 'latin1')``, how Python 3 writes bytes below
  protocol 3; ``copy_reg._reconstructor``/``copyreg``: a builtin container subclass' base;
- ``__builtin__``/``builtins`` list, tuple, set, frozenset, dict, bytes, bytearray, object:
  the builtin itself, from a container argument only (``bytes(10**12)`` is refused).

Anything else, e.g. ``posix.system``, is refused with its name, before any later opcode runs.
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["NDARRAY", "RECONSTRUCT", "Bad", "Global", "Pending", "Unsafe", "resolve_global"]


class Bad(Exception):
    """Malformed or unsupported data; the reader turns it into PickleFormatError."""


class Unsafe(Exception):
    """A refused callable; the reader turns it into UnsafePickleError."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class Global:
    """Inert stand-in for an allowed global; REDUCE/NEWOBJ dispatch to its handlers."""

    __slots__ = ("qualname", "reduce", "newobj", "ctor")

    def __init__(self, qualname, reduce=None, newobj=None, ctor=None):
        self.qualname, self.ctor = qualname, ctor
        self.reduce = reduce or self._refuse
        self.newobj = newobj or self._refuse

    def _refuse(self, args):
        raise Unsafe(self.qualname, "not an allowed reconstructor for this opcode")


class Pending:
    """A REDUCE result that a BUILD completes (arrays, dtypes); remembers its memo ids."""

    __slots__ = ("finish", "ids")

    def __init__(self, finish):
        self.finish, self.ids = finish, []


# --- numpy ----------------------------------------------------------------------------------

_DTYPE_CODE = re.compile(r"[biufcSUV][0-9]{1,6}")
_ENDIAN = {"<": "<", ">": ">", "|": "|", "=": "="}


def _text(x) -> str:
    if x.__class__ is bytes:
        return x.decode("latin1")
    if x.__class__ is str:
        return x
    raise Bad(f"expected a string, got {type(x).__name__}")


def _reduce_dtype(args):
    if args.__class__ is not tuple or len(args) != 3:
        raise Bad("numpy.dtype needs (code, align, copy)")
    code = _text(args[0])
    if not _DTYPE_CODE.fullmatch(code):
        raise Bad(f"unsupported dtype code {code!r} (object, datetime, structured)")
    base = np.dtype(code)
    return Pending(lambda state: _finish_dtype(base, state))


def _finish_dtype(base: np.dtype, state) -> np.dtype:
    if state.__class__ is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise Bad("unsupported numpy dtype state")
    endian = _ENDIAN.get(_text(state[1]))
    if endian is None or state[2:5] != (None, None, None):
        raise Bad("unsupported numpy dtype state (sub-array or fields)")
    elsize = state[5]
    if elsize != -1 and elsize != base.itemsize:
        raise Bad(f"dtype item size {elsize} does not match {base.str}")
    return base.newbyteorder(endian) if endian in "<>" else base


def _as_raw(raw) -> bytes | bytearray:
    if raw.__class__ is bytes or raw.__class__ is bytearray:
        return raw
    if raw.__class__ is str:  # data written as unicode, as numpy accepts with latin1
        return raw.encode("latin1")
    raise Bad("array data is not a byte string (object arrays are not supported)")


def make_array(raw, dtype, shape, fortran: bool) -> np.ndarray:
    """A writable ndarray owning a copy of ``raw``; Bad unless sizes agree exactly."""
    if not isinstance(dtype, np.dtype):
        raise Bad("array dtype is not a dtype")
    if shape.__class__ is not tuple or not all(s.__class__ is int and s >= 0 for s in shape):
        raise Bad(f"bad array shape {shape!r}")
    raw = _as_raw(raw)
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:  # checked before any allocation
        raise Bad(f"array data has {len(raw)} bytes, shape {shape} {dtype} needs "
                  f"{count * dtype.itemsize}")
    arr = np.frombuffer(bytearray(raw), dtype)  # bytearray: writable, owns its copy
    if len(shape) != 1:
        arr = arr.reshape(shape, order="F" if fortran else "C")
    return arr


def _reduce_reconstruct(args):
    if args.__class__ is not tuple or len(args) != 3 or args[0] is not NDARRAY:
        raise Unsafe(RECONSTRUCT.qualname, "only plain numpy.ndarray is rebuilt")
    return Pending(_finish_array)


def _finish_array(state) -> np.ndarray:
    if state.__class__ is not tuple or len(state) not in (4, 5):
        raise Bad("unsupported numpy array state")
    if len(state) == 5:
        state = state[1:]  # (version, shape, dtype, is_fortran, rawdata)
    shape, dtype, fortran, raw = state
    return native_order(make_array(raw, dtype, shape, bool(fortran)))


def native_order(arr: np.ndarray) -> np.ndarray:
    """What numpy's ``ndarray.__setstate__`` does with non-native data (the ``_reconstruct``
    form of protocols 0-4 and Python 2): the same values, byteswapped to native order.
    numpy's protocol-5 form (``_frombuffer``) keeps the order as written, and so does rayvid."""
    if arr.dtype.isnative:
        return arr
    return arr.astype(arr.dtype.newbyteorder("="))


def _reduce_frombuffer(args):  # numpy protocol 5: _frombuffer(buf, dtype, shape, order)
    if args.__class__ is not tuple or len(args) != 4:
        raise Bad("_frombuffer needs (buffer, dtype, shape, order)")
    return make_array(args[0], args[1], args[2], _text(args[3]) == "F")


def _reduce_scalar(args):
    if args.__class__ is not tuple or len(args) != 2 or not isinstance(args[0], np.dtype):
        raise Bad("numpy scalar needs (dtype, data)")
    raw = _as_raw(args[1])
    if len(raw) != args[0].itemsize:
        raise Bad("numpy scalar data has the wrong size")
    return np.frombuffer(raw, args[0], 1)[0]


# --- builtins -------------------------------------------------------------------------------


def _reduce_codecs_encode(args):  # py3 protocol < 3 writes bytes as encode(str, 'latin1')
    if (args.__class__ is not tuple or len(args) != 2 or args[0].__class__ is not str
            or args[1] not in ("latin1", "latin-1")):
        raise Bad("_codecs.encode is only supported as encode(str, 'latin1')")
    return args[0].encode("latin1")


_PLAIN = (list, tuple, set, frozenset, dict, bytes, bytearray)


def _builtin_reduce(ctor):
    def reduce(args):
        if args.__class__ is not tuple or len(args) > 2:
            raise Bad(f"unsupported arguments for {ctor.__name__}")
        if not args:
            return ctor()
        if len(args) == 2:  # bytes/bytearray(str, 'latin-1')
            if ctor not in (bytes, bytearray) or args[1] not in ("latin1", "latin-1"):
                raise Bad(f"unsupported arguments for {ctor.__name__}")
            return ctor(_text(args[0]), "latin1")
        if not isinstance(args[0], _PLAIN):  # e.g. bytes(10**12) would allocate
            raise Bad(f"unsupported argument for {ctor.__name__}")
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
        raise Bad("_reconstructor needs (cls, base, state)")
    cls, base, state = args
    if cls.__class__ is not Global or cls.ctor is None or base not in (cls, _OBJECT):
        name = getattr(cls, "qualname", type(cls).__name__)
        raise Unsafe(name, "copyreg._reconstructor only rebuilds builtin containers")
    if base is _OBJECT or state is None:
        return cls.ctor()
    return cls.reduce((state,))


# --- the table --------------------------------------------------------------------------------

NDARRAY = Global("numpy.ndarray")
RECONSTRUCT = Global("numpy.core.multiarray._reconstruct", _reduce_reconstruct)
_OBJECT = Global("builtins.object")


def _allowed_globals() -> dict[tuple[str, str], Global]:
    table = {("numpy", "ndarray"): NDARRAY,
             ("numpy", "dtype"): Global("numpy.dtype", _reduce_dtype)}
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x write different names
        table[(f"{core}.multiarray", "_reconstruct")] = RECONSTRUCT
        table[(f"{core}.multiarray", "scalar")] = Global(f"{core}.multiarray.scalar",
                                                         _reduce_scalar)
        table[(f"{core}.numeric", "_frombuffer")] = Global(f"{core}.numeric._frombuffer",
                                                           _reduce_frombuffer)
    recon = Global("copyreg._reconstructor", _reduce_reconstructor)
    table[("copy_reg", "_reconstructor")] = table[("copyreg", "_reconstructor")] = recon
    table[("_codecs", "encode")] = Global("_codecs.encode", _reduce_codecs_encode)
    for ctor in _PLAIN:
        g = Global(f"builtins.{ctor.__name__}", _builtin_reduce(ctor), _builtin_newobj(ctor),
                   ctor)
        table[("builtins", ctor.__name__)] = table[("__builtin__", ctor.__name__)] = g
    table[("builtins", "object")] = table[("__builtin__", "object")] = _OBJECT
    return table


_ALLOWED = _allowed_globals()


def resolve_global(module: str, name: str) -> Global:
    """The stand-in for ``module.name``; Unsafe for anything off the allow-list."""
    g = _ALLOWED.get((module, name))
    if g is None:
        raise Unsafe(f"{module}.{name}", "not on rayvid's allow-list (numpy arrays, dtypes, "
                     "scalars and builtin containers only); nothing was executed")
    return g
