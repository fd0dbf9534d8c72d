"""YAML files a user edits, read so that every error can name its ``file:line``.

``agents.yaml`` and ``limits.yaml`` are both read here: the document, and the node tree that
maps a JSON pointer (from a schema violation) back to the line it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigError


def read_yaml(path: Path, name: str) -> tuple[bytes, yaml.Node | None, Any]:
    """(bytes, node tree, document) of the file at ``path``; ConfigError at ``name:line:col``.

    An empty file is an error too: a registry or limits file with nothing in it is a mistake.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", location=name) from e
    text = raw.decode("utf-8", errors="replace")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise ConfigError(f"invalid YAML: {e.problem or e.context}", location=where) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", location=name) from e
    if data is None:
        raise ConfigError("the file is empty", location=f"{name}:1")
    return raw, node, data


def line_of(node: yaml.Node | None, pointer: str) -> int:
    """1-based line of the deepest YAML node on JSON ``pointer`` that exists."""
    current = node
    if current is None:
        return 1
    for raw in pointer.split("/")[1:]:
        key = raw.replace("~1", "/").replace("~0", "~")
        nxt: yaml.Node | None = None
        if isinstance(current, yaml.MappingNode):
            for k, v in current.value:
                if getattr(k, "value", None) == key:
                    nxt = v if not isinstance(v, yaml.ScalarNode) else k
                    break
        elif (
            isinstance(current, yaml.SequenceNode)
            and key.isdigit()
            and int(key) < len(current.value)
        ):
            nxt = current.value[int(key)]
        if nxt is None:
            break
        current = nxt
    return current.start_mark.line + 1
