"""JSON Schema validation (draft 2020-12) for every document the hub accepts.

All ``*.json`` files under ``schemas/`` are loaded into one ``jsonschema_rs`` registry, each
under ``https://agent-gateway.local/schemas/<relative path>`` (unless it declares its own
``$id``), so a ``$ref`` between files works with ordinary relative paths. ``jsonschema-rs``
was chosen over ``jsonschema`` after measuring (see bench/bench_schema.py): about 100x
faster with the same 2020-12 semantics.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema_rs

from gateway.errors import ConfigError, SchemaViolation

BASE_URI = "https://agent-gateway.local/schemas/"
MAX_REPORTED_ERRORS = 50


def json_pointer(parts: list[str | int] | tuple[str | int, ...]) -> str:
    """RFC 6901 pointer for a path of keys and indexes ("" is the whole document)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def load_json_file(path: Path, display: str | None = None) -> Any:
    """Parse a JSON file, turning a syntax error into a ConfigError with file:line:col."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", location=name) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON: {e.msg}", location=f"{name}:{e.lineno}:{e.colno}") from e


@dataclass
class SchemaSet:
    """The loaded schemas: compiled validators by reference, plus their source files."""

    root: Path
    documents: dict[str, Any]
    registry: jsonschema_rs.Registry
    _validators: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> SchemaSet:
        """Load and check every schema under ``root``; raise ConfigError on the first bad file."""
        root = Path(root)
        documents: dict[str, Any] = {}
        resources: list[tuple[str, Any]] = []
        for path in sorted(root.rglob("*.json")):
            rel = path.relative_to(root).as_posix()
            display = f"{root.name}/{rel}"
            doc = load_json_file(path, display)
            if not isinstance(doc, dict | bool):
                raise ConfigError("a schema must be a JSON object or boolean", location=display)
            if isinstance(doc, dict):
                _check_metaschema(doc, display, path)
                doc.setdefault("$id", BASE_URI + rel)
            documents[rel] = doc
            resources.append((BASE_URI + rel, doc))
        try:
            registry = jsonschema_rs.Registry(resources)
        except Exception as e:  # the library raises its own ReferencingError and ValueErrors
            raise ConfigError(
                f"unresolvable $ref: {e}", location=_ref_location(root, str(e))
            ) from e
        schemas = cls(root=root, documents=documents, registry=registry)
        # Compile everything now so a dangling $ref is a load error, not a request error.
        for rel in documents:
            schemas.validator(rel)
        return schemas

    def validator(self, ref: str) -> Any:
        """The compiled validator for a schema, by its path relative to ``schemas/``."""
        cached = self._validators.get(ref)
        if cached is not None:
            return cached
        doc = self.documents.get(ref)
        if doc is None:
            raise ConfigError(f"no schema {ref!r} under {self.root.name}/")
        try:
            compiled = jsonschema_rs.validator_for(doc, registry=self.registry)
        except Exception as e:
            raise ConfigError(f"cannot compile: {e}", location=f"{self.root.name}/{ref}") from e
        self._validators[ref] = compiled
        return compiled

    def has(self, ref: str) -> bool:
        """Whether a schema with this relative path is loaded."""
        return ref in self.documents

    def errors(self, ref: str, instance: Any, prefix: str = "") -> list[dict[str, str]]:
        """Every violation of schema ``ref`` by ``instance``: pointer, keyword and message."""
        found: list[dict[str, str]] = []
        for err in self.validator(ref).iter_errors(instance):
            parts = list(err.instance_path)
            kind = err.kind
            # "required" and "additional properties" are reported on the parent object;
            # point at the member that is missing or unexpected.
            if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
                parts.append(kind.property)
            elif (
                isinstance(
                    kind,
                    jsonschema_rs.ValidationErrorKind.AdditionalProperties
                    | jsonschema_rs.ValidationErrorKind.UnevaluatedProperties,
                )
                and kind.unexpected
            ):
                parts.append(kind.unexpected[0])
            found.append(
                {
                    "pointer": prefix + json_pointer(parts),
                    "keyword": str(err.schema_path[-1]) if err.schema_path else "",
                    "message": err.message,
                }
            )
            if len(found) >= MAX_REPORTED_ERRORS:
                break
        return found

    def validate(self, ref: str, instance: Any, *, prefix: str = "", what: str = "") -> None:
        """Raise SchemaViolation listing every failing field when ``instance`` is invalid."""
        if self.validator(ref).is_valid(instance):
            return
        errors = self.errors(ref, instance, prefix)
        label = what or ref
        raise SchemaViolation(
            f"{label} does not match its schema ({len(errors)} error"
            f"{'s' if len(errors) != 1 else ''})",
            details=errors,
        )


def _ref_location(root: Path, message: str) -> str:
    """file:line of the ``$ref`` naming the resource a registry error says is missing."""
    match = re.search(r"Resource '([^']+)'", message)
    if match:
        target = match.group(1).rsplit("/", 1)[-1].split("#", 1)[0]
        for path in sorted(root.rglob("*.json")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if '"$ref"' in line and target and target in line:
                    return f"{root.name}/{path.relative_to(root).as_posix()}:{number}"
    return root.name


def line_of_pointer(text: str, pointer: str) -> int | None:
    """The line of the member a JSON pointer names in a JSON text (object keys only).

    Each key is searched for after the previous one, which finds the right member unless an
    earlier sibling's subtree repeats the key; array indexes keep the parent's line.
    """
    pos, line = 0, 1 if text else None
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if token.isdigit():
            continue
        match = re.compile(re.escape(json.dumps(token)) + r"\s*:").search(text, pos)
        if match is None:
            break
        pos = match.start()
        line = text.count("\n", 0, pos) + 1
    return line


def _check_metaschema(doc: dict[str, Any], display: str, path: Path | None = None) -> None:
    declared = doc.get("$schema")
    if declared not in (None, "https://json-schema.org/draft/2020-12/schema"):
        raise ConfigError(
            f"$schema {declared!r} is not draft 2020-12 "
            "(https://json-schema.org/draft/2020-12/schema)",
            location=display,
        )
    try:
        jsonschema_rs.meta.validate(doc)
    except jsonschema_rs.ValidationError as e:
        pointer = json_pointer(list(e.instance_path))
        location = display
        if path is not None:
            line = line_of_pointer(path.read_text(encoding="utf-8"), pointer)
            location = f"{display}:{line}" if line else display
        raise ConfigError(
            f"not a valid JSON Schema at {pointer or '/'}: {e.message}", location=location
        ) from e
