"""The identifier rule: device, site, metric and service names, and worker names. They go into
store keys and the dashboard, so every writer and every CLI checks them alike."""

from __future__ import annotations

from typing import Final

# Python's re.search lets "$" match before a trailing newline; "\Z" does not, as pydantic's "$".
IDENT_PATTERN: Final = r"^[A-Za-z0-9_.\-]+\Z"
IDENT_MAX_LENGTH: Final = 64
