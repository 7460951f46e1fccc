"""Errors as one line of text, for the one-sentence messages every command prints."""

from __future__ import annotations


def first_line(exc: BaseException, typed: bool = False) -> str:
    """The first line of ``exc``'s message (client libraries' messages can run over lines), or
    its type's name when it has none; with ``typed``, ``Type: line`` (unless the line starts
    with its type already, as some of aiokafka's do)."""
    name = type(exc).__name__
    line = (str(exc).splitlines() or [""])[0]
    if not line:
        return name
    return f"{name}: {line}" if typed and not line.startswith(name) else line
