"""MCP sessions of the handshake revisions (2025-06-18, 2025-11-25).

``initialize`` opens a session bound to the subject of the API key that opened it; its id
(``Mcp-Session-Id``) is random and useless to any other key (the door answers 404, as for
an unknown id). A session holds the negotiated revision and the requests in flight, so a
``notifications/cancelled`` can cancel the task behind a ``tools/call`` (or the call
forwarded to an MCP server behind the hub). Sessions end on ``DELETE /mcp``, after
``IDLE_S`` without a request, or when the subject opens more than ``MAX_PER_SUBJECT`` (the
least recently used goes). Nothing is stored: a restarted hub
answers old ids with 404 and clients initialize again, as the spec expects.

The stateless revision (2026-07-28) has no session: each request carries its envelope.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

IDLE_S = 30 * 60.0
MAX_PER_SUBJECT = 64
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """One handshake-era session."""

    id: str
    subject: str
    protocol_version: str
    client: dict[str, object] | None
    last_used: float = field(default_factory=time.monotonic)
    initialized: bool = False
    # JSON-RPC request id (as sent) -> the task running it, for notifications/cancelled.
    inflight: dict[str | int, str] = field(default_factory=dict)
    # JSON-RPC request id -> the call to an MCP server's tool serving it (cancelled as one).
    server_calls: dict[str | int, asyncio.Future[object]] = field(default_factory=dict)
    # Requests the client cancelled: their answer is an error it will not read.
    cancelled: dict[str | int, bool] = field(default_factory=dict)


class SessionTable:
    """The open sessions, least recently used first."""

    def __init__(self, *, idle_s: float = IDLE_S, max_per_subject: int = MAX_PER_SUBJECT) -> None:
        self.idle_s = idle_s
        self.max_per_subject = max_per_subject
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(
        self, subject: str, protocol_version: str, client: dict[str, object] | None
    ) -> Session:
        """A new session for ``subject``; the oldest ones go beyond the limits."""
        self._expire()
        mine = [s for s in self._sessions.values() if s.subject == subject]
        for old in mine[: max(0, len(mine) - self.max_per_subject + 1)]:
            self._sessions.pop(old.id, None)
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(secrets.token_urlsafe(24), subject, protocol_version, client)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str, subject: str) -> Session | None:
        """The live session ``session_id`` of ``subject``, or None (unknown, expired, foreign)."""
        self._expire()
        session = self._sessions.get(session_id)
        if session is None or session.subject != subject:
            return None
        session.last_used = time.monotonic()
        self._sessions.move_to_end(session_id)
        return session

    def close(self, session_id: str) -> Session | None:
        """End a session; the one ended, or None."""
        return self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.last_used >= cutoff or oldest.inflight or oldest.server_calls:
                break
            self._sessions.popitem(last=False)
