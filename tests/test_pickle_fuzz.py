"""Fuzz tests of rayvid's restricted pickle reader: damaged files fail cleanly, never run code.

Small release-shaped pickles (~30 clips, 8-d float16 features) from rayvid's `write_dict`
and CPython's C pickler (protocols 0, 2 and 4) are truncated, have random bytes changed,
have opcode bytes, length prefixes, memo ids and numbers overwritten, bytes deleted or
inserted, and have a ``GLOBAL``/``STACK_GLOBAL`` of a tripwire callable in this module
spliced in at an opcode boundary. For every case both ``list(iter_dict_items(path))`` and
``load(path)`` must either succeed (a changed byte may leave a valid pickle) or raise exactly
`PickleFormatError` / `UnsafePickleError` with ``.path`` the file, ``.offset`` an int within
the file and the file named in the message. Nothing else, never a hang (a per-case
``setitimer`` budget under pytest-timeout's own) and never a call of anything: an audit hook
records process, import, compile/exec, file, network and ``pickle.find_class`` events
while a case runs, and the tripwires record any call. Stock ``pickle.loads`` is used only
to show that the spliced tripwire really runs under a normal unpickler (files this test
wrote).

    pytest tests/test_pickle_fuzz.py -m "not slow"   # ~4,600 cases, 13-20 s on 2 cores
    pytest tests/test_pickle_fuzz.py -m slow         # every truncation, ~10x the mutations

Beyond the error contract, a case also fails if a read that succeeds returns anything but
plain data (an internal stand-in object, say), if ``iter_dict_items`` succeeds where
``load`` fails or gives another value, or if a changed length prefix makes the reader
allocate far more than the file holds (tracemalloc, ``MAX_ALLOC``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import re
import signal
import struct
import sys
import time
import tracemalloc
import traceback
from collections import Counter

import numpy as np
import pytest

from rayvid.release.pickle_reader import PickleFormatError, UnsafePickleError, iter_dict_items, load
from rayvid.release.py2_writer import write_dict

CASE_BUDGET_S = 5.0  # a case reads a ~5 KB file twice: milliseconds; 5 s means a hang
# A changed length prefix must not make the reader allocate what the file cannot hold:
# reading a ~5 KB file needs well under 1 MiB; 64 MiB leaves room for any read buffer.
MAX_ALLOC = 64 << 20

# --- tripwires: anything that calls them has run code named by a pickle -----------------------

# Shared through ``sys`` so that a second copy of this module (imported as
# ``tests.test_pickle_fuzz`` by a real unpickler) records into the same list.
_TRIPWIRE_CALLS: list = sys.__dict__.setdefault("_rayvid_fuzz_tripwire_calls", [])


class TripwireCalled(BaseException):
    """Raised by the tripwires; a BaseException so that no ``except Exception`` hides it."""


def _tripwire(*args, **kwargs):
    _TRIPWIRE_CALLS.append(("_tripwire", args, kwargs))
    raise TripwireCalled("_tripwire was called")


class _TripwireClass:
    def __new__(cls, *args, **kwargs):
        _TRIPWIRE_CALLS.append(("_TripwireClass", args, kwargs))
        raise TripwireCalled("_TripwireClass was instantiated")


# --- audit hook: records forbidden events while a case runs ------------------------------------

_FORBIDDEN = {"exec", "compile", "import", "open", "builtins.input", "builtins.input/result",
              "builtins.breakpoint", "pickle.find_class", "marshal.load", "marshal.loads",
              "code.__new__", "function.__new__", "ctypes.dlopen", "ctypes.dlsym",
              "ctypes.call_function", "sys.addaudithook", "cpython.run_command",
              "cpython.run_file", "cpython.run_module", "cpython.run_startup",
              "webbrowser.open", "glob.glob", "tempfile.mkstemp", "tempfile.mkdtemp"}
_FORBIDDEN_PREFIXES = ("os.", "subprocess.", "shutil.", "socket.", "ctypes.", "_ctypes.",
                       "urllib.", "http.", "ftplib.", "smtplib.", "imaplib.", "poplib.",
                       "nntplib.", "telnetlib.", "sqlite3.", "pty.", "winreg.", "_winapi.",
                       "msvcrt.", "syslog.", "resource.", "signal.", "mmap.", "fcntl.")


class _Audit:
    recording = False
    allowed_path: str | None = None  # the fuzz file: the reader may open it
    events: list = []


def _audit_hook(event, args):
    if not _Audit.recording:
        return
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)) \
            and os.fsdecode(args[0]) == _Audit.allowed_path:
        return
    if event in _FORBIDDEN or event.startswith(_FORBIDDEN_PREFIXES):
        _Audit.events.append((event, repr(args)[:200]))


# The reader decodes protocol-0 UNICODE lines with the raw-unicode-escape codec, whose
# module the codec registry imports on first use: a fixed stdlib module, not one a pickle
# names (the reader's codec names are constants). Load it now so that "import" stays
# forbidden while cases run, whatever ran before this module.
b"x".decode("raw-unicode-escape")  # (an empty input skips the codec lookup)

if not getattr(sys, "_rayvid_fuzz_audit_installed", False):  # once per process
    sys.addaudithook(_audit_hook)
    sys._rayvid_fuzz_audit_installed = True


# --- per-case time budget ----------------------------------------------------------------------


class CaseTimeout(BaseException):
    """A fuzz case ran past its budget (BaseException: the reader must not catch it)."""


@contextlib.contextmanager
def time_budget(case: str, seconds: float = CASE_BUDGET_S):
    """SIGALRM after ``seconds``: raises CaseTimeout naming ``case``. pytest-timeout's own
    SIGALRM timer (if any) is suspended meanwhile and re-armed with what it had left."""
    def on_alarm(signum, frame):
        raise CaseTimeout(f"{case}: still running after {seconds} s")

    prev_handler = signal.signal(signal.SIGALRM, on_alarm)
    prev_delay, prev_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, prev_handler)
        if prev_delay:
            left = prev_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), prev_interval)


# --- the files ----------------------------------------------------------------------------------

SHARED_FRAME = b"frame-0001"


def small_release(n_clips: int = 30, seed: int = 0) -> dict:
    """Face / head / body / audio values under release keys; 8-d float16 features."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in range(n_clips):
        def feat():
            return rng.integers(0, 1 << 16, 8, dtype=np.uint16).view(np.float16)

        bbox = [int(v) for v in rng.integers(-70_000, 70_000, 4)]
        frame = [b"%d" % (c % 10), SHARED_FRAME, b"%04d" % c, b"F" * 300][c % 4]
        kind = c % 5
        if kind == 0:
            value = [[frame, bbox, 0.5, 33.25, feat()], (b"7", tuple(bbox), 0.9, -1.0, feat())]
        elif kind == 1:
            value = [[frame, bbox, 0.75, feat()]]
        elif kind == 2:
            value = [(frame, bbox, feat())]
        elif kind == 3:
            value = feat()
        else:
            value = []
        out[b"IQIYI_VID_TRAIN_%07d" % c] = value
    return out


def write(path, writer: str) -> bytes:
    obj = small_release()
    if writer == "rayvid":
        write_dict(path, obj.items())
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(writer[-1])))
    return path.read_bytes()


WRITERS = ["rayvid", "c-p0", "c-p2", "c-p4"]


# --- running one case ---------------------------------------------------------------------------

_OK = "ok"


_PLAIN_TYPES = (bytes, str, int, float, bool, type(None), list, tuple, dict, set, frozenset,
                bytearray, complex, np.ndarray, np.generic, np.dtype)


def _foreign(x, seen=None) -> str | None:
    """The first value in ``x`` that is not plain data (e.g. an internal stand-in)."""
    seen = set() if seen is None else seen
    if id(x) in seen:
        return None
    seen.add(id(x))
    if not isinstance(x, _PLAIN_TYPES):
        return f"{type(x).__module__}.{type(x).__qualname__}: {x!r}"[:200]
    if isinstance(x, dict):
        for k, v in x.items():
            if (bad := _foreign(k, seen) or _foreign(v, seen)) is not None:
                return bad
    elif isinstance(x, (list, tuple, set, frozenset)):
        for v in x:
            if (bad := _foreign(v, seen)) is not None:
                return bad
    return None


def _canon(x, seen=()):
    """A comparable form of a loaded value (floats and arrays bit-exact, cycles cut)."""
    if id(x) in seen:
        return ("cycle",)
    t = type(x)
    if not isinstance(x, _PLAIN_TYPES):
        return ("foreign", t.__name__)  # reported by _foreign
    if t is float:
        return ("float", struct.pack("<d", x))
    if t is np.ndarray:
        return ("array", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, np.generic):
        return ("scalar", x.dtype.str, x.tobytes())
    if isinstance(x, np.dtype):
        return ("dtype", x.str)
    if t in (list, tuple, dict, set, frozenset):
        inner = seen + (id(x),)
        if t is dict:
            return ("dict", tuple((_canon(k, inner), _canon(v, inner)) for k, v in x.items()))
        items = tuple(_canon(v, inner) for v in x)
        return (t.__name__, tuple(sorted(items, key=repr)) if t in (set, frozenset) else items)
    return (t.__name__, x)


def _overwrite(path, data: bytes) -> None:
    """Write in place, then cut to size: ext4 flushes a file truncated to 0 on close
    (``open(.., "wb")``), which would make each case ~40x slower."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def run_case(path, data: bytes, case: str, expect=None, tripwire_name=None,
             splice=None, max_alloc: int | None = None) -> list[str]:
    """Write ``data`` to ``path``, read it with both APIs; -> failure messages (none: ok).

    ``expect``: the exception type a case must raise (None: success allowed too).
    ``tripwire_name``/``splice``: the refused global's name and the spliced byte range.
    ``max_alloc``: a bound on the peak of Python/numpy allocations while reading
    (tracemalloc; only for cases that change a length, as it slows the reads down).
    """
    _overwrite(path, data)
    spath, size = str(path), len(data)
    outcomes = {}
    del _Audit.events[:]
    _Audit.allowed_path = spath
    calls_before = len(_TRIPWIRE_CALLS)
    trace = max_alloc is not None and not tracemalloc.is_tracing()
    peak = 0
    try:
        if trace:
            tracemalloc.start()
        with time_budget(case):
            for api, read in (("iter_dict_items", lambda: list(iter_dict_items(path))),
                              ("load", lambda: load(path))):
                _Audit.recording = True
                try:
                    outcomes[api] = (_OK, read())
                except BaseException as e:  # noqa: BLE001 - judged below
                    if isinstance(e, (CaseTimeout, KeyboardInterrupt)):
                        raise
                    outcomes[api] = ("error", e)
                finally:
                    _Audit.recording = False
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
    except CaseTimeout as e:
        return [f"{case} [both APIs]: hang: {e}"]
    finally:
        _Audit.recording = False
        if trace:
            tracemalloc.stop()
    failures = []
    if trace and peak > max_alloc:
        failures.append(f"{case} [both APIs]: allocated {peak / 2**20:.0f} MiB reading a "
                        f"{size}-byte file (bound {max_alloc / 2**20:.0f} MiB)")
    events = list(_Audit.events)
    if events:
        failures.append(f"{case} [both APIs]: audit events while reading: {events}")
    if len(_TRIPWIRE_CALLS) != calls_before:
        failures.append(f"{case} [both APIs]: a tripwire was called: "
                        f"{_TRIPWIRE_CALLS[calls_before:]}")
    for api, (kind, result) in outcomes.items():
        where = f"{case} [{api}]"
        if kind == _OK:
            if expect is not None:
                failures.append(f"{where}: succeeded, expected {expect.__name__}")
            try:
                bad = _foreign(result)
            except RecursionError:
                bad = None
            if bad is not None:
                failures.append(f"{where}: succeeded with a value that is not plain data: "
                                f"{bad}")
            continue
        e = result
        tb = "".join(traceback.format_exception(e))
        if type(e) not in (PickleFormatError, UnsafePickleError):
            failures.append(f"{where}: raised {type(e).__name__}:\n{tb}")
            continue
        if expect is not None and type(e) is not expect:
            failures.append(f"{where}: raised {type(e).__name__}, expected {expect.__name__}:"
                            f"\n{tb}")
        offset = getattr(e, "offset", None)
        if getattr(e, "path", None) != spath or spath not in str(e):
            failures.append(f"{where}: error does not name the file: {e!r}, .path="
                            f"{getattr(e, 'path', None)!r}")
        if type(offset) is not int or not 0 <= offset <= size:
            failures.append(f"{where}: offset {offset!r} not an int in [0, {size}]: {e}")
        if type(e) is UnsafePickleError and not isinstance(e.global_name, str):
            failures.append(f"{where}: global_name {e.global_name!r} is not a str")
        if tripwire_name is not None and type(e) is UnsafePickleError:
            if e.global_name != tripwire_name:
                failures.append(f"{where}: refused {e.global_name!r}, expected "
                                f"{tripwire_name!r}: {e}")
            if not splice[0] <= offset < splice[1]:
                failures.append(f"{where}: offset {offset} outside the spliced bytes "
                                f"{splice}: {e}")
    # both APIs read the same file: a dict that streams must also load, to the same value
    kind_i, items = outcomes.get("iter_dict_items", (None, None))
    kind_l, whole = outcomes.get("load", (None, None))
    if kind_i == _OK:
        if kind_l != _OK:
            failures.append(f"{case} [both APIs]: iter_dict_items succeeded but load raised "
                            f"{whole!r}")
        else:
            try:
                same = _canon(dict(items)) == _canon(whole)
            except RecursionError:
                same = True  # too deep to compare here; both read it without error
            if not same:
                failures.append(f"{case} [both APIs]: iter_dict_items and load disagree")
    return failures


def _report(failures: list[str], n_cases: int):
    """Fail with a count per kind of failure, then the first cases in full."""
    kinds = Counter()
    for f in failures:
        head = f.split("\n", 1)[0]
        head = head.split("]: ", 1)[1] if "]: " in head else head.split(": ", 1)[-1]
        kinds[re.sub(r"\d+", "N", head.split(":", 1)[0])[:90]] += 1
    summary = "\n".join(f"  {n:5d} x {kind}" for kind, n in kinds.most_common())
    assert not failures, (f"{len(failures)} failures in {n_cases} cases:\n{summary}\n"
                          "first ones:\n\n" + "\n\n".join(failures[:8]))


# --- mutations ----------------------------------------------------------------------------------


def _ops(data: bytes) -> list[tuple[int, str, object, int]]:
    """(pos, opcode name, arg, end) of every opcode of a valid pickle."""
    ops = []
    gen = list(pickletools.genops(data))
    for i, (op, arg, pos) in enumerate(gen):
        end = gen[i + 1][2] if i + 1 < len(gen) else pos + 1
        ops.append((pos, op.name, arg, end))
    return ops


def truncation_offsets(size: int, n_spread: int) -> list[int]:
    if size <= n_spread + 40:
        return list(range(size))
    spread = np.linspace(0, size - 1, n_spread).astype(int).tolist()
    return sorted(set(range(16)) | set(spread) | set(range(size - 20, size)))


_LENGTH_PREFIX = {"SHORT_BINSTRING": 1, "SHORT_BINBYTES": 1, "SHORT_BINUNICODE": 1, "LONG1": 1,
                  "BINSTRING": 4, "BINBYTES": 4, "BINUNICODE": 4, "LONG4": 4,
                  "BINUNICODE8": 8, "BINBYTES8": 8, "BYTEARRAY8": 8, "FRAME": 8}
_MEMO_ARG = {"BINPUT": 1, "BINGET": 1, "LONG_BINPUT": 4, "LONG_BINGET": 4}
_NUMBER_ARG = {"BININT1": 1, "BININT2": 2, "BININT": 4, "BINFLOAT": 8, "PROTO": 1}
_OPCODE_BYTES = [op.code.encode("latin1") for op in pickletools.opcodes]


def mutations(data: bytes, rng: np.random.Generator, n_random: int):
    """(description, mutated bytes, kind) cases: random byte changes, then targeted ones."""
    size = len(data)
    for _ in range(n_random):
        out = bytearray(data)
        changes = []
        for p in rng.choice(size, int(rng.integers(1, 5)), replace=False).tolist():
            new = int(rng.integers(0, 256))
            changes.append((p, out[p], new))
            out[p] = new
        yield f"bytes {changes}", bytes(out), "random"
    ops = _ops(data)
    scale = max(1, n_random // 500)

    def pick(names, k):
        cands = [o for o in ops if o[1] in names]
        if not cands:
            return []
        return [cands[i] for i in rng.choice(len(cands), min(k, len(cands)), replace=False)]

    # opcode bytes: another opcode, or any byte
    for pos, name, _, _ in pick({o[1] for o in ops}, 100 * scale):
        new = (_OPCODE_BYTES[int(rng.integers(len(_OPCODE_BYTES)))] if rng.random() < 0.7
               else bytes([int(rng.integers(256))]))
        yield f"opcode {name}@{pos} -> {new!r}", data[:pos] + new + data[pos + 1:], "opcode"
    # length prefixes: edge values and random ones
    for pos, name, arg, end in pick(set(_LENGTH_PREFIX), 60 * scale):
        width = _LENGTH_PREFIX[name]
        top = (1 << (8 * width)) - 1
        cur = int.from_bytes(data[pos + 1:pos + 1 + width], "little")
        new = [0, 1, top, top >> 1, (top >> 1) + 1, max(cur - 1, 0), min(cur + 1, top),
               int(rng.integers(0, min(top, 1 << 62)))][int(rng.integers(8))]
        raw = new.to_bytes(width, "little")
        yield (f"length of {name}@{pos}: {cur} -> {new}",
               data[:pos + 1] + raw + data[pos + 1 + width:], "length")
    # memo ids
    for pos, name, arg, end in pick(set(_MEMO_ARG), 40 * scale):
        width = _MEMO_ARG[name]
        new = int(rng.integers(0, 1 << (8 * width)))
        if rng.random() < 0.5:
            new = max(0, int(arg) + int(rng.integers(-3, 4)))
        raw = new.to_bytes(width, "little")
        yield (f"memo id of {name}@{pos}: {arg} -> {new}",
               data[:pos + 1] + raw + data[pos + 1 + width:], "memo")
    # text memo ids and numbers (protocol 0)
    for pos, name, arg, end in pick({"PUT", "GET", "INT", "LONG", "FLOAT"}, 40 * scale):
        new = [b"-1", b"99999999999999999999", b"", b"x", b"1e999", b"0", b"nan",
               b"%d" % int(rng.integers(0, 1 << 31))][int(rng.integers(8))]
        yield (f"text arg of {name}@{pos} -> {new!r}", data[:pos + 1] + new + b"\n" + data[end:],
               "text")
    # numbers (array shapes, counts, protocol)
    for pos, name, arg, end in pick(set(_NUMBER_ARG), 40 * scale):
        width = _NUMBER_ARG[name]
        raw = rng.integers(0, 256, width, dtype=np.uint8).tobytes()
        yield (f"arg of {name}@{pos} -> {raw!r}", data[:pos + 1] + raw + data[pos + 1 + width:],
               "number")
    # delete an opcode (and its argument) or one byte; insert an opcode byte
    for pos, name, arg, end in pick({o[1] for o in ops}, 30 * scale):
        if rng.random() < 0.5:
            yield f"delete {name}@{pos}", data[:pos] + data[end:], "delete"
        else:
            yield f"delete byte @{pos}", data[:pos] + data[pos + 1:], "delete"
    for pos, name, arg, end in pick({o[1] for o in ops}, 30 * scale):
        new = _OPCODE_BYTES[int(rng.integers(len(_OPCODE_BYTES)))]
        yield f"insert {new!r} before {name}@{pos}", data[:pos] + new + data[pos:], "insert"


def _module_names() -> list[str]:
    return sorted({__name__, "tests.test_pickle_fuzz"})


def tripwire_splices(data: bytes, rng: np.random.Generator, n: int):
    """(description, bytes, refused global name, (start, end) of the spliced bytes) for
    GLOBAL/STACK_GLOBAL + REDUCE/NEWOBJ + POP of a tripwire spliced in at an opcode
    boundary after the top-level dict is created. Frame lengths (protocol 4) are adjusted, so the
    result is a valid pickle that calls the tripwire under stock ``pickle.loads``."""
    ops = _ops(data)
    first_dict = next(i for i, o in enumerate(ops) if o[1] in ("EMPTY_DICT", "DICT"))
    boundaries = [o[0] for o in ops[first_dict + 1:]]  # ... up to STOP's position
    frames = [(o[0], o[0] + 9, o[0] + 9 + o[2]) for o in ops if o[1] == "FRAME"]
    for k in range(n):
        module = _module_names()[k % len(_module_names())]
        form = ["global-reduce", "stack_global-reduce", "global-newobj"][k % 3]
        name = "_TripwireClass" if form == "global-newobj" else "_tripwire"
        if form == "stack_global-reduce":
            m, nm = module.encode(), name.encode()
            head = b"\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(nm)]) + nm
            insert = head + b"\x93)R0"
        else:
            insert = b"c" + module.encode() + b"\n" + name.encode() + b"\n" + (
                b")\x81" if form == "global-newobj" else b")R") + b"0"
        p = boundaries[int(rng.integers(len(boundaries)))]
        out = bytearray(data[:p] + insert + data[p:])
        for fpos, start, end in frames:  # keep the frame holding p consistent
            if start <= p < end:
                new_len = (end - start) + len(insert)
                out[fpos + 1:fpos + 9] = new_len.to_bytes(8, "little")
        yield (f"splice {form} {module}.{name} @{p}", bytes(out), f"{module}.{name}",
               (p, p + len(insert)))


# --- the tests ------------------------------------------------------------------------------------


def test_the_audit_hook_and_the_budget_work(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("x")
    _Audit.allowed_path = str(tmp_path / "fuzz.pickle")
    del _Audit.events[:]
    _Audit.recording = True
    try:
        with open(other, "rb"):
            pass
        compile("1", "<fuzz>", "eval")
        with open(_Audit.allowed_path, "wb"):
            pass
    finally:
        _Audit.recording = False
    events = [e for e, _ in _Audit.events]
    assert events == ["open", "compile"], _Audit.events
    del _Audit.events[:]
    before = signal.getitimer(signal.ITIMER_REAL)[0]
    handler = signal.getsignal(signal.SIGALRM)
    with pytest.raises(CaseTimeout, match="the sleepy case"):
        with time_budget("the sleepy case", 0.05):
            time.sleep(2)
    assert signal.getsignal(signal.SIGALRM) is handler
    after = signal.getitimer(signal.ITIMER_REAL)[0]
    assert (after > 0) == (before > 0) and after <= before  # the outer timer re-armed


@pytest.mark.parametrize("writer", WRITERS)
def test_spliced_tripwire_runs_under_stock_pickle(tmp_path, writer):
    """The splice is a live attack: a normal unpickler calls the tripwire (this test's own
    file); rayvid's reader refuses it (the fuzz tests below)."""
    data = write(tmp_path / "w.pickle", writer)
    pickle.loads(data, encoding="bytes")  # valid before the splice
    for desc, spliced, name, _ in tripwire_splices(data, np.random.default_rng(1), 6):
        del _TRIPWIRE_CALLS[:]
        # (by name: "tests.test_pickle_fuzz" imports a second copy of this module)
        with pytest.raises(BaseException, match="was called|was instantiated") as info:
            pickle.loads(spliced, encoding="bytes")
        assert type(info.value).__name__ == "TripwireCalled"
        assert [c[0] for c in _TRIPWIRE_CALLS] == [name.rsplit(".", 1)[1]], desc
    del _TRIPWIRE_CALLS[:]


def _fuzz(tmp_path, writer, n_spread, n_random, n_splices, seed):
    data = write(tmp_path / "original.pickle", writer)
    path = tmp_path / "fuzz.pickle"
    calls_before = len(_TRIPWIRE_CALLS)
    assert run_case(path, data, f"{writer} unchanged") == []
    failures, n = [], 0
    for cut in truncation_offsets(len(data), n_spread):
        n += 1
        failures += run_case(path, data[:cut], f"{writer} truncated at {cut}/{len(data)}",
                             expect=PickleFormatError)
    rng = np.random.default_rng(seed)
    for desc, mutated, kind in mutations(data, rng, n_random):
        n += 1
        failures += run_case(path, mutated, f"{writer} {desc}",
                             max_alloc=MAX_ALLOC if kind == "length" else None)
    for desc, spliced, name, span in tripwire_splices(data, rng, n_splices):
        n += 1
        failures += run_case(path, spliced, f"{writer} {desc}", expect=UnsafePickleError,
                             tripwire_name=name, splice=span)
    assert len(_TRIPWIRE_CALLS) == calls_before, _TRIPWIRE_CALLS[calls_before:]
    _report(failures, n)
    return n


# Protocol 0 (text) is the slowest to fuzz: the slow lane, with the long runs.
@pytest.mark.parametrize("writer", [pytest.param(w, marks=[pytest.mark.slow] if w == "c-p0" else [])
                                    for w in WRITERS])
def test_fuzz(tmp_path, writer):
    _fuzz(tmp_path, writer, n_spread=300, n_random=300, n_splices=30, seed=WRITERS.index(writer))


@pytest.mark.slow
# CI runs the long fuzz on CPython 3's protocol 2 (the layout that broke the old reader);
# the others (protocol 0 takes 90 s) run on demand; the short fuzz covers every writer in CI.
@pytest.mark.parametrize("writer", [pytest.param(w, marks=[pytest.mark.soak] if w != "c-p2" else [])
                                    for w in WRITERS])
def test_fuzz_long(tmp_path, writer):
    _fuzz(tmp_path, writer, n_spread=1 << 30, n_random=5000, n_splices=300,
          seed=100 + WRITERS.index(writer))
