"""The revision of a set of files kept in git: last commit, content hash, dirty flag.

The content hash makes uncommitted edits visible (the commit alone would not change) and
works outside a git checkout. git is run as a subprocess with a timeout, never through a
shell; a missing git, a directory that is not a checkout, or a git that hangs all mean
"no commit".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 5.0
SHORT = 12


@dataclass(frozen=True)
class Revision:
    """``commit`` is None outside git (``in_git`` False) or when the files were never committed."""

    commit: str | None
    content_hash: str
    dirty: bool
    in_git: bool = True

    def __str__(self) -> str:
        if self.commit:
            base = self.commit[:SHORT] + ("-dirty" if self.dirty else "")
        else:
            base = "uncommitted" if self.in_git else "nogit"
        return f"{base}+sha256:{self.content_hash[:SHORT]}"

    def to_json(self) -> dict[str, Any]:
        """The revision as a JSON-able dict, with its string form under ``revision``."""
        return {
            "revision": str(self),
            "commit": self.commit,
            "content_hash": self.content_hash,
            "dirty": self.dirty,
            "in_git": self.in_git,
        }


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _files(path: Path) -> Iterable[tuple[str, Path]]:
    """(name relative to the path's parent, file) for ``path`` and everything under it."""
    if path.is_file():
        yield path.name, path
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not _ignored(d)]
        base = Path(dirpath)
        for name in filenames:
            if _ignored(name):
                continue
            file = base / name
            if file.is_file():
                yield (Path(path.name) / file.relative_to(path)).as_posix(), file


def content_hash(paths: Iterable[Path]) -> str:
    """sha256 over the sorted relative names and contents of every file under ``paths``.

    Names are relative to each path's parent (``policies/a.rego``), so the hash does not
    depend on where the checkout lives.
    """
    entries: dict[str, Path] = {}
    for path in paths:
        entries.update(_files(Path(path)))
    h = hashlib.sha256()
    for name in sorted(entries):
        data = entries[name].read_bytes()
        # Length-prefixed so no two different file sets can produce the same byte stream.
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _git(args: list[str], cwd: Path) -> str | None:
    """git's stdout, or None when git is missing, fails or takes too long."""
    env = {
        **os.environ,
        # Read-only: "git status" would otherwise refresh and rewrite the index.
        "GIT_OPTIONAL_LOCKS": "0",
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
    }
    try:
        # Own session, so a timeout kills git and anything it started (hooks, helpers)
        # that would otherwise hold the pipes open and block us anyway.
        with subprocess.Popen(
            ["git", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        ) as proc:
            try:
                out, _ = proc.communicate(timeout=GIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return None
    except OSError:
        return None
    return out if proc.returncode == 0 else None


def revision_of(paths: list[Path], repo_root: Path | None = None) -> Revision:
    """The revision of ``paths``: last commit touching them, content hash, dirty flag."""
    resolved = [Path(p).resolve() for p in paths]
    digest = content_hash(resolved)
    if repo_root is None:
        start = resolved[0] if resolved else Path.cwd()
        while not start.is_dir() and start != start.parent:
            start = start.parent  # a file, or a path that does not exist yet
        top = _git(["rev-parse", "--show-toplevel"], start)
        if top is None:
            return Revision(None, digest, False, in_git=False)
        root = Path(top.strip())
    else:
        root = Path(repo_root).resolve()
    specs = ["--", *(str(p) for p in resolved)]
    status = _git(["status", "--porcelain", "--untracked-files=all", *specs], root)
    if status is None:
        # Not a checkout, or the paths are outside it.
        return Revision(None, digest, False, in_git=False)
    # "git log" fails in a repository without commits yet: that is "never committed".
    commit = (_git(["log", "-1", "--format=%H", *specs], root) or "").strip() or None
    return Revision(commit, digest, dirty=bool(status.strip()), in_git=True)


# The parts of a configuration generation, in the order a combined revision lists them.
REVISION_PARTS = ("policies", "schemas", "agents")


def combined_revision(*, policies: str, schemas: str, agents: str) -> str:
    """One string naming all three revisions (``policies=R schemas=R agents=R``).

    This is what every decision records as its ``revision``: the policy alone does not
    decide (the registry is policy data, the schemas gate the input), so all three are kept.
    """
    return f"policies={policies} schemas={schemas} agents={agents}"


def split_revision(revision: str) -> dict[str, str]:
    """The parts of a combined revision by name; a bare (older) revision is ``policies``."""
    parts: dict[str, str] = {}
    for token in revision.split():
        name, sep, value = token.partition("=")
        if sep and name in REVISION_PARTS:
            parts[name] = value
    if not parts and revision:
        parts["policies"] = revision
    return parts
