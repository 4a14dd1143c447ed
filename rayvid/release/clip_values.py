"""One clip's value from a release pickle -> validated numpy arrays, or `BadClipError`.

The value formats (`../shared/docs/iqiyi-vid-2019.md`): faces are a list of
`[frame_str, bbox, det, quality, feat]`, heads `[frame_str, bbox, det, feat]`, bodies
`[frame_str, bbox, feat]` (items lists or tuples, the list possibly empty), audio one vector.

    faces = parse_detections(value, "face", file=path, clip=clip, feat_dim=512)
    faces["feat"]   # (n, 512) float16, bit-exact

Each field of a clip's detections is converted in one numpy call (a fast path); only when
that fails does a per-item pass run to name the first bad detection. Errors name the file,
the clip and the field, e.g. `face_val_v2.pickle: clip IQIYI_VID_VAL_0000012: face[3].bbox:
not 4 integers: list of 3`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from rayvid.release.pickle_reader import ReleaseFormatError
from rayvid.release.schema import BBOX_LEN

# Fields of one detection, in the order of the release's item lists/tuples.
DETECTION_FIELDS = {
    "face": ("frame", "bbox", "det", "quality", "feat"),
    "head": ("frame", "bbox", "det", "feat"),
    "body": ("frame", "bbox", "feat"),
}
_INT32_MAX = 2**31 - 1
_F16 = np.dtype("<f2")
_F16_EXPONENT = np.uint16(0x7C00)
_SEQ = (list, tuple)
_SEQ_TYPES = frozenset(_SEQ)


class BadClipError(ReleaseFormatError):
    """One clip's value is malformed: names the file, the clip and the field."""

    def __init__(self, file: str | Path, clip: str, field: str, reason: str):
        self.file, self.clip, self.field, self.reason = str(file), clip, field, reason
        super().__init__(f"{file}: clip {clip}: {field}: {reason}")

    def __reduce__(self):  # pickles across processes (prepare's workers) as itself
        return type(self), (self.file, self.clip, self.field, self.reason)


class _ItemError(Exception):
    """Internal: detection `index` of a column is bad for `reason`."""

    def __init__(self, index: int, reason: str):
        self.index, self.reason = index, reason


def clip_name(key: object, file: str | Path) -> str:
    """A pickle key (py2 str = bytes) -> clip name str; BadClipError if it is not a name."""
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            raise BadClipError(file, repr(key), "key", "not a UTF-8 clip name") from None
    if not isinstance(key, str) or not key or key != key.strip():
        raise BadClipError(file, repr(key), "key", "not a clip name")
    return key


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"ndarray {x.dtype} shape {x.shape}"
    if isinstance(x, _SEQ):
        return f"{type(x).__name__} of {len(x)}"
    return f"{type(x).__name__} {x!r}"[:80]


def _frame(x: object) -> int:
    if type(x) is bytes and x.isdigit():  # the release: py2 str such as b"1234"
        return int(x)
    if isinstance(x, (bytes, str)) and x.isdigit():  # int() alone would take b"+1", b" 1_0"
        return int(x)
    if isinstance(x, Integral) and not isinstance(x, bool):
        return int(x)
    raise ValueError


def _frames(column: tuple) -> np.ndarray:
    try:
        try:  # fast path, the release's py2 str frames: all non-empty ASCII digit strings
            if not (all(column) and b"".join(column).isdigit()):
                raise TypeError
            out = np.fromiter(map(int, column), np.int64, len(column))
        except TypeError:
            out = np.array([_frame(x) for x in column], np.int64)
        if out.size == 0 or (out.min() >= 0 and out.max() <= _INT32_MAX):
            return out.astype(np.int32)
    except (ValueError, OverflowError):
        pass
    for i, x in enumerate(column):  # slow path: name the first bad frame
        try:
            if 0 <= _frame(x) <= _INT32_MAX:
                continue
        except ValueError:
            pass
        raise _ItemError(i, "not an int frame string")
    raise AssertionError("unreachable")


def _number(x: object) -> float:
    if type(x) is not float and (isinstance(x, bool) or not isinstance(x, Real)):
        raise ValueError
    v = float(x)
    if not math.isfinite(v):
        raise ValueError
    return v


def _bbox(x: object) -> list[int]:
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if not isinstance(x, _SEQ) or len(x) != BBOX_LEN:
        raise ValueError
    out = [_number(v) for v in x]
    if any(v != int(v) or abs(v) > _INT32_MAX for v in out):
        raise ValueError
    return [int(v) for v in out]


def _bboxes(column: tuple) -> np.ndarray:
    n = len(column)
    try:
        arr = np.array(column) if n else np.empty((0, BBOX_LEN), np.int64)
    except (ValueError, TypeError):  # ragged: some bbox is not 4 numbers
        arr = None
    if arr is not None and arr.shape == (n, BBOX_LEN) and arr.dtype.kind in "iuf":
        ok = n == 0 or np.abs(arr).max() <= _INT32_MAX  # False for NaN too
        if ok and arr.dtype.kind == "f":
            ok = bool((arr == np.round(arr)).all())
        if ok:
            return arr.astype(np.int32)
    for i, x in enumerate(column):  # slow path: name the first bad bbox
        try:
            _bbox(x)
        except ValueError:
            raise _ItemError(i, "not 4 integers") from None
    return np.array([_bbox(x) for x in column], np.int32)


def _scores(column: tuple) -> np.ndarray:
    try:
        arr = np.array(column)
    except (ValueError, TypeError):
        arr = None
    if arr is not None and arr.shape == (len(column),) and arr.dtype.kind in "iuf":
        with np.errstate(over="ignore"):
            out = arr.astype(np.float32)
        if np.isfinite(out).all():
            return out
    for i, x in enumerate(column):
        try:
            if math.isfinite(np.float32(_number(x))):
                continue
        except (ValueError, OverflowError):
            pass
        raise _ItemError(i, "not a finite number")
    raise AssertionError("unreachable")


def _feature(x: object, feat_dim: int | None, exact_f16: bool) -> np.ndarray:
    """One feature vector -> (dim,) float16; ValueError with the reason if malformed."""
    if not isinstance(x, np.ndarray) or x.ndim != 1 or x.dtype.kind != "f" or x.size == 0:
        raise ValueError(f"expected a 1-d float ndarray, got {_describe(x)}")
    if feat_dim is not None and x.shape[0] != feat_dim:
        raise ValueError(f"expected shape ({feat_dim},), got {x.shape}")
    if x.dtype.itemsize == 2:
        return x.astype(_F16, copy=False)  # bit-exact (a byte swap at most)
    if exact_f16:
        raise ValueError(f"expected float16, got {x.dtype}")
    # Head/body/audio dtypes are not pinned by the spec; the dataset stores float16.
    with np.errstate(over="ignore"):
        return x.astype(np.float16)


def _features(column: tuple, feat_dim: int | None, exact_f16: bool) -> np.ndarray:
    if not column:
        return np.empty((0, feat_dim or 0), np.float16)
    first = column[0]
    dim = feat_dim or (first.shape[0] if isinstance(first, np.ndarray) and first.ndim == 1 else 0)
    shape = (dim,)
    arr = None
    if dim and all(type(x) is np.ndarray and x.shape == shape and x.dtype == _F16 for x in column):
        try:  # one copy of contiguous little-endian halves; np.stack is ~5x slower here
            arr = np.frombuffer(b"".join(column), _F16).reshape(len(column), dim)
        except (BufferError, TypeError, ValueError):  # a non-contiguous view
            arr = np.stack(column)
    if arr is None:
        rows, dim = [], feat_dim
        for i, x in enumerate(column):
            try:
                rows.append(_feature(x, dim, exact_f16))
            except ValueError as e:
                raise _ItemError(i, f"{e}") from None
            dim = rows[0].shape[0]
        arr = np.stack(rows)
    # NaN/inf halves have all exponent bits set: integer ops, ~3x faster than isfinite
    special = (arr.view(np.uint16) & _F16_EXPONENT) == _F16_EXPONENT
    if special.any():
        raise _ItemError(int(np.argmax(special.any(axis=1))),
                         "NaN or inf (or out of float16 range)")
    return arr


def parse_detections(value: object, modality: str, *, file: str | Path, clip: str,
                     feat_dim: int | None) -> dict[str, np.ndarray]:
    """One clip's face/head/body list -> arrays; BadClipError on any malformed detection.

    value: list/tuple of items, each a list/tuple of DETECTION_FIELDS[modality]; may be
    empty. feat_dim: required feature length (faces: 512), or None to take the first
    item's (the caller checks it across clips). Returns frame (n,) int32, bbox (n, 4) int32,
    det and quality (n,) float32 (where the modality has them), feat (n, dim) float16,
    bit-exact for float16 input. Face features must be float16; head/body floats are cast.
    """
    fields = DETECTION_FIELDS[modality]
    if not isinstance(value, _SEQ):
        raise BadClipError(file, clip, modality,
                           f"expected a list of detections, got {_describe(value)}")
    arity = len(fields)
    if not (set(map(type, value)) <= _SEQ_TYPES and set(map(len, value)) <= {arity}):
        for i, item in enumerate(value):  # slow path: name the first bad item
            if not isinstance(item, _SEQ) or len(item) != arity:
                raise BadClipError(file, clip, f"{modality}[{i}]",
                                   f"expected ({', '.join(fields)}), got {_describe(item)}")
    columns = list(zip(*value)) if value else [()] * arity
    out = {}
    for name, column in zip(fields, columns):
        try:
            if name == "frame":
                out[name] = _frames(column)
            elif name == "bbox":
                out[name] = _bboxes(column)
            elif name == "feat":
                out[name] = _features(column, feat_dim, exact_f16=modality == "face")
            else:
                out[name] = _scores(column)
        except _ItemError as e:
            raise BadClipError(file, clip, f"{modality}[{e.index}].{name}",
                               f"{e.reason}: {_describe(column[e.index])}") from None
    return out


def parse_audio(value: object, *, file: str | Path, clip: str, feat_dim: int | None) -> np.ndarray:
    """One clip's audio vector -> (dim,) float16; BadClipError if malformed or not finite."""
    try:
        feat = _feature(value, feat_dim, exact_f16=False)
    except ValueError as e:
        raise BadClipError(file, clip, "audio", str(e)) from None
    if not np.isfinite(feat).all():
        raise BadClipError(file, clip, "audio", "NaN or inf (or out of float16 range)")
    return feat
