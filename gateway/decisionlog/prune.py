"""The export file of a prune: written and made durable before anything is deleted.

``write_export`` writes the records a prune removes as JSON Lines (one record per line,
oldest first, as ``decisions export`` writes them), never over an existing file, checks
that they form one chain from where the log starts, and flushes the file and its folder to
disk before it returns the file's SHA-256: only then does ``DecisionLog.prune`` delete the
records, in one transaction with the checkpoint (``gateway.decisionlog.checkpoint``).
``read_export`` reads one back for ``decisions verify --export``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PruneError(Exception):
    """A prune was refused, or failed before deleting anything; the message says why."""


@dataclass(frozen=True)
class Export:
    """An export written: where, its SHA-256, and the chain it holds."""

    path: Path
    sha256: str
    count: int
    head_hash: str


def _fsync_dir(folder: Path) -> None:
    # The file's name is durable only once its folder is: without this a crash right after
    # the prune could leave the records deleted and the export gone.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(f: Any, records: Iterable[Mapping[str, Any]], first_seq: int, start_hash: str) -> Export:
    digest = hashlib.sha256()
    seq, prev = first_seq, start_hash
    count = 0
    for rec in records:
        if "malformed" in rec or rec.get("seq") != seq or rec.get("prev_hash") != prev:
            raise PruneError(
                f"record seq {rec.get('seq')} does not continue the chain at seq {seq}: "
                "the log changed or is damaged; nothing was deleted"
            )
        line = (json.dumps(rec, sort_keys=True) + "\n").encode("utf-8")
        digest.update(line)
        f.write(line)
        seq, prev, count = seq + 1, str(rec["hash"]), count + 1
    f.flush()
    os.fsync(f.fileno())
    return Export(path=Path(f.name), sha256=digest.hexdigest(), count=count, head_hash=prev)


def write_export(
    path: Path, records: Iterable[Mapping[str, Any]], *, first_seq: int, start_hash: str
) -> Export:
    """Write ``records`` (a chain from ``first_seq``, chained to ``start_hash``) to a new file
    at ``path``, durably; PruneError when it cannot (the partial file is removed)."""
    path = Path(path)
    try:
        f = open(path, "xb")  # noqa: SIM115 (closed below, removed on failure)
    except FileExistsError as e:
        raise PruneError(f"the export {path} exists: an export is never overwritten") from e
    except OSError as e:
        raise PruneError(f"cannot write the export {path}: {e.strerror or e}") from e
    try:
        with f:
            export = _write(f, records, first_seq, start_hash)
        _fsync_dir(path.parent.resolve())
    except BaseException as e:
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(e, OSError):
            raise PruneError(f"cannot write the export {path}: {e.strerror or e}") from e
        raise
    return Export(path=path, sha256=export.sha256, count=export.count, head_hash=export.head_hash)


def remove_export(path: Path) -> None:
    """Remove an export whose prune did not happen (its records are still in the log)."""
    with contextlib.suppress(OSError):
        Path(path).unlink()


def read_export(path: Path) -> tuple[list[dict[str, Any]], str]:
    """(the records of an export, oldest first; the file's SHA-256). OSError if unreadable.

    A line that is not a JSON object is kept as an empty record, so that ``verify`` names it
    at its position.
    """
    data = Path(path).read_bytes()
    records: list[dict[str, Any]] = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        records.append(rec if isinstance(rec, dict) else {})
    return records, hashlib.sha256(data).hexdigest()
