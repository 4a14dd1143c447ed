"""What every job's command line shares: `--config FILE`, repeatable `--set KEY=VALUE`, and
loading the job's config from them and the job's own flags (`rayvid.config.load_config`:
defaults <- YAML <- flags <- --set). A flag left out keeps the config's value (`KEEP`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from rayvid.config import ConfigError, load_config  # noqa: E402

KEEP = argparse.SUPPRESS  # the default of every flag that maps to a config key
T = TypeVar("T")


def parser(doc: str, config_help: str, set_example: str) -> argparse.ArgumentParser:
    """The job's parser, with --config and --set; its description is `doc`'s first line."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--config", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {set_example} (repeatable)")
    return p


def job_config(job: str, cls: type[T], args: argparse.Namespace, *, path: str | None = None,
               overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None) -> T | None:
    """`cls` from `path` (default: --config), `flags` (default: the parsed flags named like a
    field of `cls`) and `overrides` + --set. None once a bad config was reported as
    `JOB: config error: ...` on stderr: the job then exits 2."""
    if flags is None:
        fields = getattr(cls, "model_fields", {})
        flags = {k: v for k, v in vars(args).items() if k in fields}
    try:
        return load_config(cls, path if path is not None else getattr(args, "config", None),
                           list(overrides) + list(args.set), flags=dict(flags))
    except ConfigError as e:
        print(f"{job}: config error: {e}", file=sys.stderr)
        return None
