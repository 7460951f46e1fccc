"""Errors the local stack raises; their messages are single sentences meant for users."""

from __future__ import annotations


class StackError(Exception):
    """Something about the local stack a user has to act on; ``str(error)`` is one sentence."""


class PrerequisiteError(StackError):
    """A tool the stack needs (Java, Maven) is missing or too old."""


class PortInUseError(StackError):
    """A port the stack wants is already taken by a process we did not start."""


class StartupError(StackError):
    """A service exited or did not become ready within the start-up timeout."""
