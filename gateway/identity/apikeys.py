"""API keys for users: subject and roles, stored hashed in a JSON keys file.

A key looks like ``agk_<id>_<secret>``. Only its SHA-256 is stored; keys are 256-bit random
so a fast hash is the right tool (as for GitHub tokens), and lookup is by the public id so a
wrong key costs one constant-time comparison.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, Unauthorized

KEY_RE = re.compile(r"^agk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
KNOWN_ROLES = ("user", "developer", "egress", "auditor", "operator", "admin")


@dataclass(frozen=True)
class Subject:
    """An authenticated caller."""

    id: str
    roles: tuple[str, ...]
    key_id: str

    def has(self, role: str) -> bool:
        """Whether the caller holds ``role`` (``admin`` holds every role)."""
        return role in self.roles or "admin" in self.roles

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "roles": list(self.roles), "key_id": self.key_id}


@dataclass(frozen=True)
class KeyRecord:
    id: str
    subject: str
    roles: tuple[str, ...]
    sha256: str
    created_at: str


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The keys file, loaded into memory; writes are atomic (temp file + rename)."""

    def __init__(self, path: Path, records: dict[str, KeyRecord] | None = None) -> None:
        self.path = Path(path)
        self._records = records or {}
        self._mtime = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def refresh(self, *, every_s: float = 1.0) -> None:
        """Pick up keys added by ``agent-gateway keys create`` while the hub runs.

        Checks the file's mtime at most every ``every_s``; a broken file keeps the old keys.
        """
        now = time.monotonic()
        if now - self._checked < every_s:
            return
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        try:
            fresh = KeyStore.load(self.path)
        except ConfigError:
            return
        self._records, self._mtime = fresh._records, mtime

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """Read the keys file; a missing file is an empty store, a broken one a ConfigError."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid JSON: {e.msg}", location=f"{path}:{e.lineno}") from e
        records: dict[str, KeyRecord] = {}
        for i, raw in enumerate(doc.get("keys", []) if isinstance(doc, dict) else []):
            try:
                rec = KeyRecord(
                    id=str(raw["id"]),
                    subject=str(raw["subject"]),
                    roles=tuple(str(r) for r in raw["roles"]),
                    sha256=str(raw["sha256"]),
                    created_at=str(raw.get("created_at", "")),
                )
            except (KeyError, TypeError) as e:
                raise ConfigError(f"key #{i} is missing {e}", location=str(path)) from e
            records[rec.id] = rec
        return cls(path, records)

    def __len__(self) -> int:
        return len(self._records)

    def create(self, subject: str, roles: list[str]) -> str:
        """Add a key for ``subject`` with ``roles``, save, and return the key (shown once)."""
        if not subject or len(subject) > 128:
            raise ValueError("subject must be 1 to 128 characters")
        for role in roles:
            if not ROLE_RE.match(role):
                raise ValueError(f"role {role!r} is not a valid role name")
        key_id = secrets.token_hex(6)
        key = f"agk_{key_id}_{secrets.token_urlsafe(32)}"
        self._records[key_id] = KeyRecord(
            id=key_id,
            subject=subject,
            roles=tuple(dict.fromkeys(roles)),
            sha256=_digest(key),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        self.save()
        return key

    def save(self) -> None:
        """Write the file atomically with mode 0600."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "version": 1,
            "keys": [
                {
                    "id": r.id,
                    "subject": r.subject,
                    "roles": list(r.roles),
                    "sha256": r.sha256,
                    "created_at": r.created_at,
                }
                for r in self._records.values()
            ],
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def subject_of(self, key_id: str | None, subject_id: str) -> Subject:
        """``subject_id`` with the roles its key ``key_id`` holds now (none once revoked)."""
        self.refresh(every_s=0)
        rec = self._records.get(key_id or "")
        if rec is None or rec.subject != subject_id:
            return Subject(id=subject_id, roles=(), key_id=key_id or "")
        return Subject(id=rec.subject, roles=rec.roles, key_id=rec.id)

    def authenticate(self, key: str | None) -> Subject:
        """The subject owning ``key``, or Unauthorized saying what is wrong."""
        self.refresh()
        if not key:
            raise Unauthorized("missing API key (send 'Authorization: Bearer <key>')")
        match = KEY_RE.match(key)
        if not match:
            raise Unauthorized("malformed API key")
        rec = self._records.get(match.group(1))
        if rec is None or not hmac.compare_digest(rec.sha256, _digest(key)):
            raise Unauthorized("unknown or revoked API key")
        return Subject(id=rec.subject, roles=rec.roles, key_id=rec.id)
