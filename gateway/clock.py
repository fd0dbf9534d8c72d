"""Wall-clock timestamps, one format for every stored and logged time: RFC 3339, UTC, ``Z``.

Stored times compare as strings (the watchdog's ``created_at <= ?``), so every writer must
use the same shape; these helpers are the only place it is spelt.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

Timespec = Literal["seconds", "milliseconds", "microseconds"]


def iso_utc(ts: float, timespec: Timespec = "milliseconds") -> str:
    """``ts`` (seconds since the epoch) as RFC 3339 in UTC with a ``Z`` suffix."""
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")


def utcnow(timespec: Timespec = "milliseconds") -> str:
    """The current time as RFC 3339 in UTC with a ``Z`` suffix (milliseconds by default)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def now_rfc3339() -> str:
    """The current time with microseconds, as decision records carry it (OPA's shape)."""
    return utcnow("microseconds")
