"""argparse value types shared by the ``pulse`` subcommands (one-sentence errors)."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from schemas.idents import IDENT_MAX_LENGTH, IDENT_PATTERN


def one_line(exc: BaseException) -> str:
    """An error's message as the body of one sentence: on one line, without a closing full
    stop (the caller adds it)."""
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return value


def int_within(lo: int, hi: int) -> Callable[[str], int]:
    """The type of a whole number within [lo, hi]."""

    def parse(text: str) -> int:
        value = non_negative_int(text) if lo >= 0 else _int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be within [{lo}, {hi}], got {value}")
        return value

    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def fraction(text: str) -> float:
    """A number within [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def non_negative_seconds(text: str) -> float:
    """A finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def check_servers(value: str) -> str:
    """``HOST:PORT[,HOST:PORT...]`` (Kafka bootstrap servers); ValueError in one sentence."""
    for server in value.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not (host and sep and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {value!r}")
    return value


def servers(text: str) -> str:
    """Kafka bootstrap servers (:func:`check_servers`)."""
    try:
        return check_servers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def name(text: str) -> str:
    """A name by the identifier rule (``schemas.idents``: 1 to 64 of ``A-Z a-z 0-9 _ . -``)."""
    if len(text) > IDENT_MAX_LENGTH or not re.match(IDENT_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"expected 1 to 64 letters, digits, '_', '.' or '-', got {text!r}"
        )
    return text


def new_file(text: str) -> Path:
    """A file to write: its directory exists, and it is not a directory (checked before a long
    run, whose result would otherwise be lost at its end)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"directory {parent} is not writable")
    if not path.exists():  # os.access says yes to root (and to a path no file can be made at)
        try:
            path.touch(exist_ok=False)
            path.unlink()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot write {text}: {exc.strerror}") from None
    return path


def out_dir(text: str) -> Path:
    """A directory to write into (made if missing): nothing else may stand at its path, and
    the nearest existing one of it and its parents must be a writable directory (checked
    before a long run, whose result would otherwise be lost at its end)."""
    path = Path(text)
    try:
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
        there = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not there.is_dir():
            raise argparse.ArgumentTypeError(f"{there} is not a directory")
        if not os.access(there, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"directory {there} is not writable")
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text} cannot be used: {exc.strerror}") from None
    return path


# the latest time a command takes: a day short of the end of year 9999, so that a range
# rounded up to its windows still prints as a date
LATEST_MS: Final = round(datetime(9999, 12, 31, tzinfo=UTC).timestamp() * 1000)


def parse_time(text: str) -> int:
    """A time as epoch ms: ISO 8601 (UTC unless it names a zone) or epoch seconds / ms
    (a number below 10^11 is seconds), from 1970 to 9999-12-31; ValueError in one sentence
    otherwise."""
    t = text.strip()
    try:
        if re.fullmatch(r"\d+(\.\d+)?", t):
            x = float(t)
            ms = round(x * 1000) if x < 1e11 else round(x)
        else:
            when = datetime.fromisoformat(t)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            ms = round(when.timestamp() * 1000)
    except (ValueError, OverflowError):
        raise ValueError(
            f"expected a time such as 2025-01-31T12:34 (UTC unless it names a zone) "
            f"or epoch seconds or milliseconds, got {text!r}"
        ) from None
    if not 0 <= ms <= LATEST_MS:
        raise ValueError(f"expected a time from 1970-01-01 to 9999-12-31T00:00 (UTC), got {text!r}")
    return ms
