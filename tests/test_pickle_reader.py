"""Tests of rayvid.release.pickle_reader (the restricted streaming reader) and rayvid.release.py2_writer.

Run: pytest tests/test_pickle_reader.py  (a few seconds, no Ray).
``pickle.dumps`` creates test inputs; ``pickle.loads`` is only used as an oracle on
bytes the tests themselves wrote.
"""

import gc
import os
import pickle
import pickletools
import sys
import subprocess
import weakref

import numpy as np
import pytest

from rayvid.release import pickle_scan
from rayvid.release.pickle_reader import (PickleFormatError, ReleaseFormatError, UnsafePickleError,
                                  WalkStats, iter_dict_items, load)
from rayvid.release.py2_writer import write_dict

# What python 2.7 cPickle protocol 2 + numpy 1.x writes for
# {'IQIYI_VID_TRAIN_0000001': [['5', [10, 20, 300, 400], 0.5, 33.25,
#                               np.array([1, -2], np.float16)]]}
# cPickle memo ids start at 1; 1-char strings and numpy's reduce temporaries are not
# memoized; 0.5 = 0x3FE0..., 33.25 = 0x4040A0...; float16 1.0 = 0x3C00, -2.0 = 0xC000.
PY2_FACE = (
    b"\x80\x02}q\x01U\x17IQIYI_VID_TRAIN_0000001q\x02]q\x03]q\x04(U\x015"
    b"]q\x05(K\nK\x14M,\x01M\x90\x01e"
    b"G?\xe0\x00\x00\x00\x00\x00\x00G@@\xa0\x00\x00\x00\x00\x00"
    b"cnumpy.core.multiarray\n_reconstruct\nq\x06cnumpy\nndarray\nq\x07"
    b"K\x00\x85U\x01b\x87Rq\x08"
    b"(K\x01K\x02\x85cnumpy\ndtype\nq\tU\x02f2K\x00K\x01\x87Rq\n"
    b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    b"\x89U\x04\x00<\x00\xc0tb"
    b"eas.")

# python 2 cPickle protocol 0 (text) of {'IQIYI_VID_VAL_0000002': [('12', [1, 300], 0.5,
# True, u'\xe9')]}: STRING, UNICODE (raw-unicode-escape), INT, FLOAT, I01, PUT lines.
PY2_TEXT = (b"(dp1\nS'IQIYI_VID_VAL_0000002'\np2\n(lp3\n(S'12'\np4\n(lp5\nI1\naI300\n"
            b"aF0.5\nI01\nV\xe9\ntp6\nas.")


def _write(tmp_path, data: bytes, name="x.pickle"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_same(a, b):
    """Equal values of the same types; arrays bit-exact with the same dtype and shape."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    else:
        assert a == b


def _f16(rng, n=512):
    """float16 vector with arbitrary bit patterns (NaN payloads, -0, inf included)."""
    return rng.integers(0, 1 << 16, n, dtype=np.uint16).view(np.float16)


def _release_like(rng, n_clips):
    """Face / head / body / audio-shaped values, lists and tuples, empty lists."""
    for c in range(n_clips):
        faces = [[str(7 * i + 1).encode(), [i, 20, 300 + i, 70000], 0.99, -3.5 + i, _f16(rng)]
                 for i in range(c % 3)]
        if c % 4 == 1:
            faces = [tuple(f) for f in faces]
        heads = [(b"12", [1, 2, 3, 4], 0.5, _f16(rng, 8))]
        bodies = [[b"3", (1, 2, 3, 4), _f16(rng, 4)]]
        yield b"IQIYI_VID_TRAIN_%07d" % c, [faces, heads, bodies, _f16(rng, 6)]


# --- python 2 files -------------------------------------------------------------------------


def test_reads_handwritten_python2_cpickle_bytes(tmp_path):
    path = _write(tmp_path, PY2_FACE)
    items = list(iter_dict_items(path))
    assert len(items) == 1
    key, faces = items[0]
    assert key == b"IQIYI_VID_TRAIN_0000001"
    frame, bbox, det, quality, feat = faces[0]
    assert (frame, bbox, det, quality) == (b"5", [10, 20, 300, 400], 0.5, 33.25)
    assert feat.dtype == np.float16 and feat.shape == (2,)
    assert feat.view(np.uint16).tolist() == [0x3C00, 0xC000]
    assert feat.flags.writeable
    assert_same(load(path), dict(items))
    assert_same(load(path), pickle.loads(PY2_FACE, encoding="bytes"))  # oracle


def test_writer_reproduces_python2_bytes(tmp_path):
    value = [[b"5", [10, 20, 300, 400], 0.5, 33.25, np.array([1, -2], np.float16)]]
    n = write_dict(tmp_path / "w.pickle", iter([(b"IQIYI_VID_TRAIN_0000001", value)]))
    assert n == 1
    assert (tmp_path / "w.pickle").read_bytes() == PY2_FACE


def test_reads_python2_protocol0_text(tmp_path):
    path = _write(tmp_path, PY2_TEXT)
    expected = {b"IQIYI_VID_VAL_0000002": [(b"12", [1, 300], 0.5, True, "\xe9")]}
    assert_same(load(path), expected)
    assert_same(dict(iter_dict_items(path)), expected)
    assert_same(load(path), pickle.loads(PY2_TEXT, encoding="bytes"))


# --- round trips ------------------------------------------------------------------------------


def test_round_trip_release_shaped_values(tmp_path):
    rng = np.random.default_rng(0)
    expected = dict(_release_like(rng, 9))
    path = tmp_path / "r.pickle"
    assert write_dict(path, _release_like(np.random.default_rng(0), 9)) == 9
    assert not list(tmp_path.glob("*.tmp-*"))
    stats = WalkStats()
    got = dict(iter_dict_items(path, stats=stats))
    assert_same(got, expected)
    assert (stats.items, stats.batches) == (9, 1)
    assert_same(pickle.loads(path.read_bytes(), encoding="bytes"), expected)  # oracle


@pytest.mark.parametrize("n_items, batches", [(1000, 1), (1001, 2), (2503, 3)])
def test_round_trip_many_batches(tmp_path, n_items, batches):
    items = [(b"c%d" % i, [b"%d" % i, i, -i, float(i), None, i % 2 == 0]) for i in range(n_items)]
    path = tmp_path / "b.pickle"
    assert write_dict(path, iter(items)) == n_items
    data = path.read_bytes()
    assert data.count(b"u") >= batches - (n_items % 1000 == 1)  # SETITEMS per full batch
    stats = WalkStats()
    assert_same(list(iter_dict_items(path, stats=stats)), items)
    assert stats.batches == batches
    assert_same(pickle.loads(data, encoding="bytes"), dict(items))


def test_writer_types_and_long_memo_ids(tmp_path):
    rng = np.random.default_rng(1)
    value = {b"k": (1, 2, 3, 4), "u": "\xe9t\xe9", b"big": [2**40, -2**40, -129, 2**31, 65536],
             b"nested": [[[]], (), (1,), (1, 2)], b"f64": np.arange(6.0).reshape(2, 3),
             b"fortran": np.asfortranarray(np.arange(6, dtype="<i4").reshape(2, 3)),
             b"u1": np.arange(3, dtype=np.uint8), b"scalar": np.float32(1.5)}
    items = [(b"c%03d" % i, [_f16(rng, 3), b"ab"]) for i in range(300)] + [(b"v", value)]
    path = tmp_path / "t.pickle"
    write_dict(path, items)
    got = dict(iter_dict_items(path))
    assert got[b"v"][b"scalar"] == 1.5 and type(got[b"v"][b"scalar"]) is float
    assert got[b"v"][b"fortran"].flags.f_contiguous
    expected = dict(items)
    expected[b"v"] = {**value, b"scalar": 1.5}
    assert_same(got, expected)
    assert_same(pickle.loads(path.read_bytes(), encoding="bytes"), expected)
    assert b"r" in path.read_bytes()  # memo ids > 255: LONG_BINPUT


def test_writer_numpy_scalars_option(tmp_path):
    path = tmp_path / "s.pickle"
    write_dict(path, [(b"a", [np.float32(0.25), np.float16(-1), np.int64(7)])], numpy_scalars=True)
    assert b"cnumpy.core.multiarray\nscalar\n" in path.read_bytes()
    assert_same(load(path), {b"a": [np.float32(0.25), np.float16(-1), np.int64(7)]})


def test_writer_is_atomic_on_failure(tmp_path):
    def items():
        yield b"a", [1]
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        write_dict(tmp_path / "f.pickle", items())
    assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError):
        write_dict(tmp_path / "g.pickle", [(b"a", object())])
    assert not list(tmp_path.iterdir())


# --- python 3 pickles of every protocol ---------------------------------------------------


def _py3_value(rng):
    return {b"IQIYI_VID_TEST_0000001": [[b"0001", [1, 2, 3, 4], 0.9, 35.5, _f16(rng)],
                                        (b"0002", (5, 6, 7, 8), np.float32(0.8), 20.0, _f16(rng))],
            "unicode key": [], b"audio": _f16(rng, 7),
            b"misc": [None, True, False, -1, 2**70, -2**70, b"", bytearray(b"xy"), {1, 2},
                      frozenset([3]), {"d": 1}, (), "\u00e9\u4e2d",
                      np.arange(6, dtype=">f4").reshape(2, 3, order="F"), np.zeros((0, 3))]}


@pytest.mark.parametrize("protocol", range(6))
def test_reads_python3_pickles(tmp_path, protocol):
    obj = _py3_value(np.random.default_rng(protocol))
    obj.update({b"k%d" % i: [i] for i in range(1200)})  # two SETITEMS batches
    data = pickle.dumps(obj, protocol=protocol)
    path = _write(tmp_path, data)
    oracle = pickle.loads(data, encoding="bytes")  # numpy: big-endian comes back native < 5
    assert_same(load(path), oracle)
    assert_same(dict(iter_dict_items(path)), oracle)


@pytest.mark.parametrize("chunk", [1500, 4099])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_small_read_chunks(tmp_path, monkeypatch, chunk, protocol):
    """Refills inside strings, lines and the numpy fast path give the same values."""
    monkeypatch.setattr(pickle_scan, "CHUNK", chunk)
    rng = np.random.default_rng(3)
    items = list(_release_like(rng, 40))
    path = tmp_path / "c.pickle"
    if protocol == 2:
        write_dict(path, items)
    else:
        path.write_bytes(pickle.dumps(dict(items), protocol=protocol))
    assert_same(list(iter_dict_items(path)), items)


def test_reconstructor_and_builtins_are_rebuilt_not_called(tmp_path):
    data = (b"ccopy_reg\n_reconstructor\n(c__builtin__\nlist\nc__builtin__\nlist\n"
            b"(lp0\nI1\naI2\natR.")
    assert load(_write(tmp_path, data)) == [1, 2]


# --- malicious pickles --------------------------------------------------------------------


class _Evil:
    def __init__(self, target, func=os.system, arg=None):
        self.func, self.arg = func, arg if arg is not None else f"touch {target}"

    def __reduce__(self):
        return self.func, (self.arg,)


def _assert_refused(path, global_name, pwned, reader=load):
    with pytest.raises(UnsafePickleError) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message and global_name in message
    assert info.value.global_name == global_name and info.value.offset >= 0
    assert isinstance(info.value, ReleaseFormatError)
    assert not pwned.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_refuses_os_system(tmp_path, protocol):
    pwned = tmp_path / "pwned"
    evil = _Evil(pwned)
    name = f"{os.system.__module__}.system"  # posix.system on Linux
    path = _write(tmp_path, pickle.dumps({b"clip": [evil]}, protocol=protocol))
    _assert_refused(path, name, pwned)
    _assert_refused(path, name, pwned, reader=lambda p: list(iter_dict_items(p)))
    top = _write(tmp_path, pickle.dumps(evil, protocol=protocol), "top.pickle")
    _assert_refused(top, name, pwned)


def test_refuses_handcrafted_globals(tmp_path):
    pwned = tmp_path / "pwned"
    touch = f"touch {pwned}".encode()
    cases = {
        "posix.system": b"\x80\x02}q\x00U\x04clipcposix\nsystem\nq\x01U" + bytes([len(touch)])
                        + touch + b"\x85Rs.",
        "os.system": b"(dp0\nS'c'\ncos\nsystem\n(S'" + touch + b"'\ntRs.",
        "builtins.eval": b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.",
        "subprocess.Popen": b"csubprocess\nPopen\n((S'touch'\nS'" + touch + b"'\nltR.",
        "os.system ": b"(S'" + touch + b"'\nios\nsystem\n.",  # INST
    }
    for name, data in cases.items():
        _assert_refused(_write(tmp_path, data), name.strip(), pwned)
    evil = pickle.dumps({b"a": _Evil(pwned, eval, "1")}, protocol=2)
    _assert_refused(_write(tmp_path, evil), "__builtin__.eval", pwned)  # py3 names it so
    evil = pickle.dumps({b"a": _Evil(pwned, subprocess.Popen, ["touch", str(pwned)])}, 4)
    _assert_refused(_write(tmp_path, evil), "subprocess.Popen", pwned)


def test_refuses_reduce_of_non_global_and_unknown_reconstructor_use(tmp_path):
    with pytest.raises(UnsafePickleError):
        load(_write(tmp_path, b"\x80\x02])R."))  # REDUCE of a list
    with pytest.raises(UnsafePickleError, match="numpy.ndarray"):
        load(_write(tmp_path, b"\x80\x02cnumpy\nndarray\nK\x01\x85R."))
    with pytest.raises(UnsafePickleError, match="builtins.object"):
        load(_write(tmp_path, b"\x80\x02c__builtin__\nobject\n)R."))


# --- malformed files ------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    pickle.dumps({b"a": [[b"1", [1, 2], 0.5, 1.0, np.ones(3, np.float16)]]}, 2), PY2_FACE])
def test_truncated_files(tmp_path, data):
    # every 3rd cut (writing a file costs ms here) plus the last bytes: inside opcodes,
    # inside the numpy fast path, before STOP
    for cut in [*range(0, len(data), 3), len(data) - 2, len(data) - 1]:
        path = _write(tmp_path, data[:cut])
        with pytest.raises(PickleFormatError, match="x.pickle"):
            list(iter_dict_items(path))
        with pytest.raises(PickleFormatError):
            load(path)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, world\n", "not a dict"),
    (b"\x80\x02]q\x00(K\x01K\x02e.", "not a dict"),
    (b"\x80\x02}q\x00e.", "underflow"),
    (b"\x80\x02}q\x00\xff.", "unknown opcode"),
    (b"\x80\x09}.", "protocol 9"),
    (b"\x80\x02}q\x00h\x07K\x01s.", "never stored"),
    (b"\x80\x02}q\x00U\x01aK\x01K\x02u.", "underflow"),
    (b"\x80\x02}(U\x01aK\x01U\x01bu.", "key/value"),
    (b"\x80\x02}(]K\x01u.", "unhashable"),
    (b"\x80\x02}\x80\x02P0\n.", "PERSID"),
])
def test_malformed(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(PickleFormatError, match=message) as info:
        list(iter_dict_items(path))
    assert str(path) in str(info.value)


def test_top_level_list_is_fine_for_load_only(tmp_path):
    path = _write(tmp_path, pickle.dumps([1, 2], protocol=2))
    assert load(path) == [1, 2]
    with pytest.raises(PickleFormatError, match="not a dict"):
        next(iter_dict_items(path))


def test_random_garbage_is_rejected(tmp_path):
    rng = np.random.default_rng(5)
    for _ in range(20):
        path = _write(tmp_path, rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
        with pytest.raises(ReleaseFormatError):
            load(path)


# --- bounded memory ---------------------------------------------------------------------------


def test_memo_keeps_only_what_is_fetched_again_and_arrays_are_freed(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "m.pickle"
    n_batches, per_batch = 25, 40
    write_dict(path, _release_like(rng, n_batches * per_batch), batch_size=per_batch)
    stats = WalkStats()
    first_batch_refs, it = [], iter_dict_items(path, stats=stats)
    for i, (_, value) in enumerate(it):
        if i < per_batch:
            first_batch_refs += [weakref.ref(f[4]) for f in value[0]] + [weakref.ref(value[3])]
        if i == 3 * per_batch:
            gc.collect()
            assert first_batch_refs and all(r() is None for r in first_batch_refs)
        del value
    assert stats.batches == n_batches and stats.items == n_batches * per_batch
    # py2 cPickle fetches only globals and dtypes again: nothing else is ever memoized
    assert 0 < stats.referenced <= 6 and stats.max_live <= stats.referenced
    assert stats.max_live_bytes < 4096


def _shared_far_apart(shared):
    obj = {b"k%04d" % i: [] for i in range(2500)}
    obj[b"k0000"], obj[b"k2400"] = [shared], [shared]  # batches 0 and 2 (1000 per batch)
    return obj


@pytest.mark.parametrize("shared", [b"frame-0001", [1, 2], np.arange(3.0)])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_sharing_across_batches_is_read_like_pickle_load(tmp_path, shared, protocol):
    obj = _shared_far_apart(shared)
    data = pickle.dumps(obj, protocol=protocol)
    path = _write(tmp_path, data)
    stats = WalkStats()
    items = list(iter_dict_items(path, stats=stats))
    assert_same(dict(items), pickle.loads(data, encoding="bytes"))
    assert items[0][1][0] is items[2400][1][0]  # one object, as pickle.load gives
    assert stats.live == 0  # released at its last fetch


def test_sharing_beyond_the_bound_is_a_clear_error(tmp_path):
    obj = _shared_far_apart(np.zeros(1 << 20, np.uint8))
    path = _write(tmp_path, pickle.dumps(obj, protocol=2))
    with pytest.raises(PickleFormatError, match="stay referenced across top-level items") as e:
        list(iter_dict_items(path, max_shared_bytes=1 << 19))
    assert str(path) in str(e.value) and e.value.offset > 0
    assert len(list(iter_dict_items(path))) == 2500  # the default bound (1 GiB) reads it
    assert_same(load(path), obj)


def test_a_self_referencing_top_dict_is_refused_by_the_stream_only(tmp_path):
    d = {b"a": [1]}
    d[b"self"] = d
    path = _write(tmp_path, pickle.dumps(d, protocol=2))
    with pytest.raises(PickleFormatError, match="referenced from inside itself"):
        list(iter_dict_items(path))
    whole = load(path)
    assert whole[b"self"] is whole and whole[b"a"] == [1]


def test_the_issue_repro_reads(tmp_path):
    """CPython memoizes numpy's typecode b'b' once and fetches it for every later array."""
    d = {b"IQIYI_VID_TRAIN_%07d" % i: [[b"%d" % i, [1, 2, 3, 4], 0.9, 40.0,
                                        np.ones(4, np.float16)]] for i in range(60000)}
    data = pickle.dumps(d, protocol=2)
    path = _write(tmp_path, data)
    stats = WalkStats()
    for (k, v), (k0, v0) in zip(iter_dict_items(path, stats=stats),
                                pickle.loads(data, encoding="bytes").items(), strict=True):
        assert k == k0
        assert_same(v, v0)
    assert stats.items == 60000 and stats.max_live <= stats.referenced < 10


def test_reading_imports_nothing_and_never_uses_the_stock_unpickler(tmp_path):
    """In a fresh interpreter: reading py2 and py3 pickles (numpy globals included) fires
    no `pickle.find_class` or `import` audit event and never imports numpy.core (numpy 2
    warns on it)."""
    write_dict(tmp_path / "py2.pickle", _release_like(np.random.default_rng(0), 5))
    (tmp_path / "py3.pickle").write_bytes(pickle.dumps(dict(_release_like(
        np.random.default_rng(1), 5)), protocol=2))
    code = f"""
import sys, warnings
warnings.simplefilter("error")
from rayvid.release.pickle_reader import iter_dict_items, load
events = []
sys.addaudithook(lambda e, a: events.append(e) if e in ("pickle.find_class", "import") else None)
for name in ("py2.pickle", "py3.pickle"):
    assert len(list(iter_dict_items({str(tmp_path)!r} + "/" + name))) == 5
    assert len(load({str(tmp_path)!r} + "/" + name)) == 5
assert not events, events
assert "numpy.core" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


# --- the reference scan (pass 1) against pickletools ------------------------------------------


def _last_fetches(data: bytes) -> dict[int, int]:
    """The oracle: each memo id's last GET/BINGET/LONG_BINGET offset, from pickletools."""
    return {int(arg): pos for op, arg, pos in pickletools.genops(data)
            if op.name in ("GET", "BINGET", "LONG_BINGET")}


@pytest.mark.parametrize("chunk", [None, 1500, 4099])
def test_reference_scan_matches_pickletools(tmp_path, chunk):
    rng = np.random.default_rng(11)
    items = list(_release_like(rng, 700))
    shared = b"shared-frame"
    items += [(b"s%04d" % i, [[shared, [1, 2, 3, 4], 0.5, 1.0, _f16(rng, 300)]])
              for i in range(300)]  # long arrays cross small read chunks
    for protocol in range(6):
        data = pickle.dumps(dict(items), protocol=protocol)
        path = _write(tmp_path, data)
        assert pickle_scan.scan_references(path, chunk) == _last_fetches(data), protocol
    path = tmp_path / "py2.pickle"
    write_dict(path, items)
    assert pickle_scan.scan_references(path, chunk) == _last_fetches(path.read_bytes())


@pytest.mark.parametrize("data", [
    b"\x80\x02}q\x00U\x01a]q\x01cnumpy\nndarray\nq\x02as.",  # a bare global in the data
    b"\x80\x02}q\x00U\x01a]q\x01cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    b"K\x00\x85U\x01b\x87Ras.",  # an array whose BUILD never comes
])
def test_stand_ins_never_reach_the_caller(tmp_path, data):
    path = _write(tmp_path, data)
    for read in (lambda p: list(iter_dict_items(p)), load):
        with pytest.raises(PickleFormatError, match="itself, not a value built from it"):
            read(path)
