"""Random identifiers: UUID version 4 strings from a buffer of the kernel's random bytes.

``uuid.uuid4()`` reads 16 bytes from the kernel on every call. A routed message needs three
ids (request, decision, message); each read is a system call that also hands the GIL to the
store's writer thread, and the event loop then waits to get it back
(bench/bench_messages.py). Here the bytes come from the same source (``os.urandom``), read
4 KiB at a time; the strings are the same as ``str(uuid.uuid4())``.
"""

from __future__ import annotations

import base64
import os
import threading

_CHUNK = 4096


class _RandomBytes:
    """os.urandom, read ahead; thread-safe, and dropped in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            pos = self._pos
            if pos + n > len(self._buf):
                self._buf, pos = os.urandom(_CHUNK), 0
            self._pos = pos + n
            return self._buf[pos : pos + n]

    def reset(self) -> None:
        # A forked child must not hand out the bytes its parent also hands out.
        self._lock = threading.Lock()
        self._buf, self._pos = b"", 0


_random = _RandomBytes()
os.register_at_fork(after_in_child=_random.reset)

# The version (4) and variant (RFC 4122) bits, as uuid.UUID(bytes=..., version=4) sets them.
_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_SET = (0x8000 << 48) | (4 << 76)


def uuid4_hex() -> str:
    """``uuid.uuid4().hex``: 32 lowercase hex digits."""
    return f"{(int.from_bytes(_random.take(16)) & _CLEAR) | _SET:032x}"


def uuid4_str() -> str:
    """``str(uuid.uuid4())``: 8-4-4-4-12 lowercase hex digits."""
    h = uuid4_hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def token_urlsafe(n: int) -> str:
    """``secrets.token_urlsafe(n)``: ``n`` random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(_random.take(n)).rstrip(b"=").decode("ascii")


_HEX = frozenset("0123456789abcdef")


def valid_traceparent(value: str | None) -> str | None:
    """``value`` lowercased if it is a well-formed W3C ``traceparent``, else None."""
    value = (value or "").strip().lower()
    parts = value.split("-")
    if (
        len(parts) == 4
        and [len(p) for p in parts] == [2, 32, 16, 2]
        and set("".join(parts)) <= _HEX
        and parts[0] != "ff"
        and parts[1] != "0" * 32
        and parts[2] != "0" * 16
    ):
        return value
    return None


def traceparent(header: str | None, *, parent: str | None = None) -> str:
    """The caller's ``traceparent`` if well formed; else a new span of ``parent``'s trace
    (a call made on behalf of a task), else a new trace."""
    own = valid_traceparent(header)
    if own is not None:
        return own
    span = _random.take(8).hex()
    known = valid_traceparent(parent)
    if known is not None:
        return f"00-{known[3:35]}-{span}-01"
    return f"00-{_random.take(16).hex()}-{span}-01"
