"""The iQIYI-VID-2019 text files: the two ground-truth files and the submission file.

The spec is `shared/docs/iqiyi-vid-2019.md` ("Labels", "Submission and metric"). This is
the one reader of `train_gt.txt` / `val_gt.txt` (release discovery, prepare, predict and the
scorer all call it) and the one reader and line writer of submissions:

    train_gt.txt     <clip>.mp4 <id>                     one line per clip
    val_gt.txt       <id> <clip>.mp4 <clip>.mp4 ...      one line per identity
    submission.txt   <id> <clip>.mp4 ...                 best first, at most 100 distinct clips

Ids are integers 1..10034 (class 0 is "other", people outside the 10,034). Blank lines are
skipped and a UTF-8 byte-order mark is accepted. A malformed file raises `GroundTruthError`
or `SubmissionError` (both `ValueError`s) whose message starts with `file:line:`.

    gt = read_gt("val_gt.txt")              # {id: ["IQIYI_VID_VAL_0000002.mp4", ...]}
    labels = read_train_gt("train_gt.txt")  # {"IQIYI_VID_TRAIN_0262102.mp4": id}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

NUM_IDENTITIES = 10034  # ids 1..10034; class 0 is "other" (noise)
MAX_RANK = 100  # clips per submission line, after dropping duplicates
MP4 = ".mp4"


class GroundTruthError(ValueError):
    """A malformed `val_gt.txt` / `train_gt.txt`; the message names the file and line."""


class SubmissionError(ValueError):
    """A malformed or over-long submission; the message names the file and line."""


def _lines(path: str | Path, error: type[ValueError]) -> Iterator[tuple[str, list[str], str]]:
    """(`file:line`, whitespace-split tokens, the line) of every non-blank line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                tokens = line.split()
                if tokens:
                    yield f"{path}:{lineno}", tokens, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_id(token: str, where: str, error: type[ValueError], max_id: int | None) -> int:
    """An identity token; `max_id` None accepts any integer (the scorer ignores a
    submission's ids that are not in the gt)."""
    if max_id is None:
        try:
            return int(token)
        except ValueError:
            raise error(f"{where}: id {token!r} is not an integer") from None
    if not (token.isascii() and token.isdigit()) or not 1 <= int(token) <= max_id:
        raise error(f"{where}: id {token!r} is not an integer in 1..{max_id}")
    return int(token)


def _first_time(seen: dict, key: object, where: str, what: str,
                error: type[ValueError]) -> None:
    """Record the line `key` first appears on; a second appearance raises naming both."""
    if key in seen:
        raise error(f"{where}: {what} listed twice (first at {seen[key]})")
    seen[key] = where


def _check_clip(token: str, where: str) -> str:
    if not token.endswith(MP4) or len(token) == len(MP4):
        raise GroundTruthError(f"{where}: {token!r} is not a <clip>{MP4} name")
    return token


def clip_stem(name: str) -> str:
    """A gt/submission clip name without `.mp4`: the key the release pickles use."""
    return name[: -len(MP4)] if name.endswith(MP4) else name


def read_gt(path: str | Path, max_id: int = NUM_IDENTITIES) -> dict[int, list[str]]:
    """Read `val_gt.txt`: one line per identity, `<id> <clip>.mp4 <clip>.mp4 ...`.

    Returns {id: clip names with `.mp4`, in file order}; one entry per non-blank line, so
    `len(result)` is the mAP denominator. Raises `GroundTruthError` (file:line) for a
    non-integer id, an id outside 1..max_id, an id on two lines, a line without clips, a
    clip not ending in `.mp4`, a clip listed twice (on one line or two: a clip has one
    identity, and |G| would be ambiguous) or a file without identity lines.
    """
    gt: dict[int, list[str]] = {}
    id_at: dict[int, str] = {}
    clip_at: dict[str, str] = {}
    for where, tokens, _ in _lines(path, GroundTruthError):
        identity = _parse_id(tokens[0], where, GroundTruthError, max_id)
        _first_time(id_at, identity, where, f"id {identity}", GroundTruthError)
        if len(tokens) < 2:
            raise GroundTruthError(f"{where}: id {identity} has no clips")
        for clip in tokens[1:]:
            _check_clip(clip, where)
            _first_time(clip_at, clip, where, f"clip {clip}", GroundTruthError)
        gt[identity] = tokens[1:]
    if not gt:
        raise GroundTruthError(f"{path}: no identity lines")
    return gt


def read_train_gt(path: str | Path, max_id: int = NUM_IDENTITIES) -> dict[str, int]:
    """Read `train_gt.txt`: one line per clip, `<clip>.mp4 <id>`.

    Returns {clip name with `.mp4`: id}. Raises `GroundTruthError` (file:line) for a line
    without exactly two fields, a clip not ending in `.mp4`, a non-integer id, an id outside
    1..max_id, or a clip listed twice.
    """
    labels: dict[str, int] = {}
    clip_at: dict[str, str] = {}
    for where, tokens, line in _lines(path, GroundTruthError):
        if len(tokens) != 2:
            raise GroundTruthError(
                f"{where}: expected '<clip>{MP4} <id>', got {len(tokens)} fields: {line!r}")
        clip = _check_clip(tokens[0], where)
        identity = _parse_id(tokens[1], where, GroundTruthError, max_id)
        _first_time(clip_at, clip, where, f"clip {clip}", GroundTruthError)
        labels[clip] = identity
    return labels


def train_gt_line(clip: str, identity: int) -> str:
    """One `train_gt.txt` line without the newline; clip: the pickles' name, no `.mp4`."""
    return f"{clip}{MP4} {identity}"


def val_gt_line(identity: int, clips: Sequence[str]) -> str:
    """One `val_gt.txt` line without the newline; clips: the pickles' names, no `.mp4`."""
    return " ".join([str(identity), *(c + MP4 for c in clips)])


def dedupe_ranking(clips: Sequence[str]) -> list[str]:
    """The official script's first step on a submission line: drop repeats, keep the first."""
    return list(dict.fromkeys(clips))


def read_submission(path: str | Path, max_rank: int = MAX_RANK) -> dict[int, list[str]]:
    """Read a submission: one line per identity, `<id> <clip>.mp4 ...`, best first.

    Returns {id: ranked clip names, duplicates dropped (first kept)}. Ids are not range
    checked: ids absent from the gt are ignored by the scorer. Raises `SubmissionError`
    (file:line) for a non-integer id, an id on two lines, or more than `max_rank` distinct
    clips on a line (checked after dropping duplicates, as the official script does).
    """
    return dict(iter_submission(path, max_rank))


def iter_submission(path: str | Path, max_rank: int = MAX_RANK) -> Iterator[tuple[int, list[str]]]:
    """`read_submission` one line at a time: (id, ranked clip names), the same checks, so
    a 10,035-line submission (1M names) is scored without holding it."""
    id_at: dict[int, str] = {}
    for where, tokens, _ in _lines(path, SubmissionError):
        identity = _parse_id(tokens[0], where, SubmissionError, None)
        _first_time(id_at, identity, where, f"id {identity}", SubmissionError)
        ranking = dedupe_ranking(tokens[1:])
        check_ranking_length(identity, ranking, max_rank, where)
        yield identity, ranking


def check_ranking_length(identity: int, ranking: Sequence[str], max_rank: int = MAX_RANK,
                         where: str = "") -> None:
    """SubmissionError when a de-duplicated ranking has more than `max_rank` clips."""
    if len(ranking) > max_rank:
        prefix = f"{where}: " if where else ""
        raise SubmissionError(f"{prefix}identity {identity} has {len(ranking)} distinct clips, "
                              f"at most {max_rank} allowed")


def submission_line(identity: int, clips: Sequence[str], top_k: int = MAX_RANK) -> str:
    """One submission line, `<id> <clip>.mp4 ...` without the newline.

    clips: names best first, with or without `.mp4` (appended when missing); repeats are
    dropped (first kept), then at most top_k written. A name that is empty or holds
    whitespace raises ValueError (it would split into other tokens).
    """
    for clip in clips:
        if not clip or len(clip.split()) != 1 or clip != clip.strip():
            raise ValueError(f"identity {identity}: clip name {clip!r} is empty or has whitespace")
    names = [c if c.endswith(MP4) else c + MP4 for c in clips]
    return " ".join([str(identity), *dedupe_ranking(names)[:top_k]])
