"""Pickle opcode facts shared by the two passes of the reader (`pickle_scan`, `pickle_reader`).

Opcode names and argument layouts are those of CPython's ``pickletools`` (protocols 0-5);
the numbers here are the opcode bytes.
"""

from __future__ import annotations

import codecs
import re
import struct

__all__ = ["ARGS", "LEN", "LINE", "LINE2", "PY2_ARRAY", "REFUSED", "VAROPS", "text_value"]

U1, U2, I4, U4, U8 = (struct.Struct(f).unpack_from for f in ("<B", "<H", "<i", "<I", "<Q"))

# The argument of every opcode: a fixed size in bytes (0: none), LINE (one newline-ended
# line), LINE2 (two lines), or (LEN-width, unpack) for a length prefix then that many bytes.
LINE, LINE2, LEN = -1, -2, -3
ARGS: dict[int, object] = {
    **dict.fromkeys(b"(.012NQRabde}l]ostu)\x81\x85\x86\x87\x88\x89\x8f\x90\x91\x92\x93\x94"
                    b"\x97\x98", 0),
    **dict.fromkeys(b"FILSVPgp", LINE), **dict.fromkeys(b"ci", LINE2),
    ord("J"): 4, ord("K"): 1, ord("M"): 2, ord("G"): 8, ord("h"): 1, ord("j"): 4,
    ord("q"): 1, ord("r"): 4, 0x80: 1, 0x82: 1, 0x83: 2, 0x84: 4, 0x95: 8,
    ord("U"): (1, U1), ord("C"): (1, U1), 0x8c: (1, U1), 0x8a: (1, U1),
    ord("T"): (4, I4), ord("B"): (4, U4), ord("X"): (4, U4), 0x8b: (4, I4),
    0x8d: (8, U8), 0x8e: (8, U8), 0x96: (8, U8),
}


def _long(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


def _utf8(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


# Length-prefixed opcodes the walker runs on its slow path: (length bytes, unpack, convert).
VAROPS = {0x8a: (1, U1, _long), 0x8b: (4, I4, _long), 0x8d: (8, U8, _utf8),
          0x8e: (8, U8, bytes), 0x96: (8, U8, bytearray)}

# Opcodes that exist but that no release file needs (persistent ids, the extension
# registry, out-of-band buffers, NEWOBJ_EX, OBJ): refused by name.
REFUSED = {ord("P"): "PERSID", ord("Q"): "BINPERSID", ord("o"): "OBJ", 0x82: "EXT1",
           0x83: "EXT2", 0x84: "EXT4", 0x92: "NEWOBJ_EX", 0x97: "NEXT_BUFFER",
           0x98: "READONLY_BUFFER"}

# A Python 2 cPickle numpy 1-D array after ``BINGET <_reconstruct>``: BINGET ndarray, (0,),
# 'b', TUPLE3, REDUCE, BINPUT, MARK 1 (count,) BINGET dtype, False, length-prefixed raw
# data; TUPLE BUILD follow the data. One regex match replaces 16 opcodes (the walker checks
# the memo entries and sizes before it trusts a match). Groups: ndarray id, array id (1 or
# 4 bytes), count (1 or 2 bytes), dtype id, data length (1 or 4 bytes).
PY2_ARRAY = re.compile(rb"h(.)K\x00\x85U\x01b\x87R(?:q(.)|r(.{4}))\(K\x01(?:K(.)|M(.{2}))"
                       rb"\x85h(.)\x89(?:U(.)|T(.{4}))", re.S).match


def text_value(op: int, line: bytes):
    """Value of a protocol-0 text opcode (INT, LONG, FLOAT, STRING, UNICODE)."""
    if op == 73:  # INT: python 2 writes True/False as I01/I00
        return True if line == b"01" else False if line == b"00" else int(line)
    if op == 76:  # LONG
        return int(line[:-1] if line.endswith(b"L") else line)
    if op == 70:  # FLOAT
        return float(line)
    if op == 83:  # STRING: a quoted python 2 str literal -> bytes
        if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
            raise ValueError("STRING argument is not quoted")
        return codecs.escape_decode(line[1:-1])[0]
    return str(line, "raw-unicode-escape")  # UNICODE
