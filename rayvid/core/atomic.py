"""Write a file or a folder whole or not at all.

Everything rayvid writes goes to a temporary name in the same folder (so the final rename
stays on one file system) and is renamed into place only when complete: a reader, or a
job restarted after a crash, never sees half of it. A failure removes the temporary.

    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(text)                      # or write_json(out / "summary.json", obj)

The temporary is `.NAME.tmp-<pid>-<random>`: hidden, unique per writer, and recognisable
(`is_temporary`) by anything that lists a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def temporary_name(path: str | Path) -> Path:
    """A fresh temporary path next to `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: str | Path) -> bool:
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _is_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path for `path`; the caller writes a file or makes a folder there.
    On success it replaces `path` (a folder already at `path`, or anything there when a
    folder replaces it, is moved aside first and removed after); on any error the temporary
    is removed and `path` is left as it was."""
    final = Path(path)
    tmp = temporary_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: nothing was written to {tmp.name}")
        if _is_dir(final) or (_is_dir(tmp) and (final.exists() or final.is_symlink())):
            old = temporary_name(final)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> Path:
    """`obj` as JSON (keys in the order given), with a trailing newline; `default` converts
    what json cannot (as in `json.dumps`)."""
    return write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")
