"""The secrets file: a JSON or YAML mapping of secret name to value, for agents' ``env``.

An agents.yaml entry ``env: {TOKEN: {secret: NAME}}`` sets ``TOKEN`` from ``NAME`` here.
The Docker backend reads the file on its worker thread just before it creates a container,
so a changed secret reaches the next container without a reload and the value is held only
for that call. The file must be readable by its owner alone (mode 0600). Every error names
the file and the secret, never a value (not even a YAML error's excerpt of the file).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import SecretUnavailable


def read_secrets(path: Path) -> dict[str, str]:
    """The file's NAME -> value mapping; SecretUnavailable if unreadable, open to others,
    or not a mapping of names to strings."""
    try:
        # Checked on the open descriptor, so the file read is the file whose mode was checked.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretUnavailable(f"secrets file {path} does not exist") from None
    except OSError as e:
        raise SecretUnavailable(f"cannot open secrets file {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SecretUnavailable(f"secrets file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecretUnavailable(
                f"secrets file {path} has mode {mode:04o}: it must be readable by its owner "
                f"only (chmod 600 {path})"
            )
        text = f.read().decode("utf-8", errors="replace")
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise SecretUnavailable(f"secrets file {path} is not a mapping of names to values")
    secrets: dict[str, str] = {}
    for name, value in data.items():
        # Strings only: YAML would read an unquoted 0123 as the number 83.
        if not isinstance(value, str):
            raise SecretUnavailable(f"secret {name!r} in {path} is not a string (quote it)")
        secrets[str(name)] = value
    return secrets


def _parse(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}" if mark else ""
        raise SecretUnavailable(f"secrets file {path} is not valid JSON or YAML{where}") from None
    except yaml.YAMLError:
        raise SecretUnavailable(f"secrets file {path} is not valid JSON or YAML") from None


def resolve_env(path: Path | None, wanted: Mapping[str, str]) -> dict[str, str]:
    """Variable -> value for each variable -> secret name in ``wanted``; SecretUnavailable
    naming every secret the file lacks."""
    if not wanted:
        return {}
    if path is None:
        raise SecretUnavailable(
            f"env {', '.join(sorted(wanted))} names a secret but no secrets file is set"
        )
    secrets = read_secrets(path)
    missing = sorted({name for name in wanted.values() if name not in secrets})
    if missing:
        raise SecretUnavailable(
            f"secret{'s' if len(missing) > 1 else ''} {', '.join(missing)} not in {path}",
            details={"missing": missing, "file": str(path)},
        )
    return {var: secrets[name] for var, name in wanted.items()}
