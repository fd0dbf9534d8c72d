"""Masking of logged inputs: erase or redact fields named by JSON pointers (RFC 6901).

``*`` matches any key or index; ``pointers_marked_secret`` finds the pointers an agent's
input schema marks ``"x-secret": true`` and ``SecretPointers`` keeps them per loaded schema
set. Masking works on a copy: the caller's input is never changed. Pure: no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

from gateway.errors import ConfigError

REDACTED = "**REDACTED**"
MaskAction = Literal["erase", "mask"]


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _parse_pointer(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ConfigError(f"masking rule {pointer!r} is not a JSON pointer (must start with /)")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _is_index(token: str, size: int) -> bool:
    return token.isdigit() and (token == "0" or not token.startswith("0")) and int(token) < size


def _expand(doc: Any, tokens: list[str]) -> list[tuple[Any, str | int, str]]:
    """Every existing (parent, key, concrete pointer) that ``tokens`` names in ``doc``."""
    found: list[tuple[Any, str | int, str]] = []

    def walk(node: Any, i: int, prefix: str) -> None:
        token = tokens[i]
        last = i == len(tokens) - 1
        if isinstance(node, dict):
            keys: list[str | int] = list(node) if token == "*" else [token] if token in node else []
        elif isinstance(node, list):
            if token == "*":
                keys = list(range(len(node)))
            else:
                keys = [int(token)] if _is_index(token, len(node)) else []
        else:
            return
        for key in keys:
            pointer = f"{prefix}/{_escape(str(key))}"
            if last:
                found.append((node, key, pointer))
            else:
                walk(node[key], i + 1, pointer)  # type: ignore[index]

    walk(doc, 0, "")
    return found


def _copy_json(value: Any) -> Any:
    """Copy the dicts and lists of a JSON-like value; scalars are immutable and shared."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    if isinstance(value, tuple | set | frozenset):
        return copy.deepcopy(value)
    return value


def parse_mask_rule(rule: str) -> tuple[str, MaskAction]:
    """``"mask:/p"``, ``"erase:/p"`` or a bare ``"/p"`` (mask) as (pointer, action)."""
    if rule.startswith("/"):
        action, pointer = "mask", rule
    else:
        action, _, pointer = rule.partition(":")
    if action not in ("mask", "erase"):
        raise ConfigError(f"masking rule {rule!r}: the action must be 'mask' or 'erase'")
    _parse_pointer(pointer)
    return pointer, "erase" if action == "erase" else "mask"


class Masker:
    """Erase or redact the fields of a decision input named by JSON-pointer rules."""

    def __init__(self, rules: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        """``rules`` maps a pointer (``*`` = any key or index) to ``"erase"`` or ``"mask"``."""
        items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        self.rules: list[tuple[str, list[str], str]] = []
        for pointer, action in items:
            if action not in ("erase", "mask"):
                raise ConfigError(
                    f"masking rule {pointer!r}: action must be erase or mask, not {action!r}"
                )
            self.rules.append((pointer, _parse_pointer(pointer), action))

    def with_pointers(self, pointers: Iterable[str], action: MaskAction = "mask") -> Masker:
        """A new Masker with extra pointers (e.g. from ``pointers_marked_secret``)."""
        extra = [(p, action) for p in pointers]
        return Masker([(p, a) for p, _, a in self.rules] + extra)

    def apply(self, document: Any) -> tuple[Any, list[str], list[str]]:
        """Return (masked copy, erased pointers, masked pointers); ``document`` is not touched."""
        # A full copy, so the logged input never aliases a live object that might change
        # after it was hashed; _copy_json is about 3x cheaper than copy.deepcopy here.
        doc = _copy_json(document)
        erased: list[str] = []
        masked: list[str] = []
        # Erasures first, so a field both erased and masked is reported once, as erased.
        for wanted in ("erase", "mask"):
            for _, tokens, action in self.rules:
                if action != wanted:
                    continue
                hits = _expand(doc, tokens)
                if action == "mask":
                    for parent, key, pointer in hits:
                        if pointer not in masked:
                            parent[key] = REDACTED
                            masked.append(pointer)
                    continue
                # Delete list items from the highest index down so earlier indexes stay valid.
                for parent, key, pointer in sorted(
                    hits, key=lambda h: h[1] if isinstance(h[1], int) else -1, reverse=True
                ):
                    del parent[key]
                    erased.append(pointer)
        return doc, sorted(erased), sorted(masked)


def _resolve_ref(schema: Mapping[str, Any], ref: str) -> Any:
    """The node a local reference (``#`` or ``#/a/b``) names in ``schema``, or None."""
    node: Any = schema
    for token in ref[2:].split("/") if ref != "#" else []:
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or token not in node:
            return None
        node = node[token]
    return node


def _subschemas(node: Mapping[str, Any], at: str) -> Iterator[tuple[Any, str]]:
    """(sub-schema, the pointer its values are at) for every branch a walk follows."""
    for name, sub in (node.get("properties") or {}).items():
        yield sub, f"{at}/{_escape(name)}"
    for sub in (node.get("patternProperties") or {}).values():
        yield sub, f"{at}/*"
    yield node.get("additionalProperties"), f"{at}/*"
    for i, sub in enumerate(node.get("prefixItems") or []):
        yield sub, f"{at}/{i}"
    yield node.get("items"), f"{at}/*"
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key) or []:
            yield sub, at
    for key in ("then", "else"):
        yield node.get(key), at


def pointers_marked_secret(schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Pointers (under ``prefix``) of the properties a JSON Schema marks ``"x-secret": true``.

    Follows properties, items, prefixItems, additional/pattern properties (as ``*``), the
    allOf/anyOf/oneOf/then/else branches and local ``#/...`` references.
    """
    found: list[str] = []
    seen_refs: set[str] = set()

    def walk(node: Any, at: str) -> None:
        if not isinstance(node, Mapping):
            return
        if node.get("x-secret") is True:
            if at and at not in found:
                found.append(at)
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and ref not in seen_refs:
            seen_refs.add(ref)  # a recursive schema would otherwise loop forever
            walk(_resolve_ref(schema, ref), at)
            seen_refs.discard(ref)
        for sub, sub_at in _subschemas(node, at):
            walk(sub, sub_at)

    walk(schema, prefix.rstrip("/"))
    return found


class SecretPointers:
    """``pointers_marked_secret`` of named schema documents, computed once per schema set.

    A reload brings a new ``documents`` mapping, which empties the cache; a missing or
    non-object document has no secret fields.
    """

    def __init__(self) -> None:
        self._of: Mapping[str, Any] | None = None
        self._cache: dict[tuple[str, str], tuple[str, ...]] = {}

    def of(self, documents: Mapping[str, Any], schema: str, prefix: str) -> tuple[str, ...]:
        """The x-secret pointers of ``documents[schema]``, under ``prefix``."""
        if self._of is not documents:
            self._of, self._cache = documents, {}
        key = (schema, prefix)
        found = self._cache.get(key)
        if found is None:
            doc = documents.get(schema)
            found = tuple(pointers_marked_secret(doc, prefix)) if isinstance(doc, Mapping) else ()
            self._cache[key] = found
        return found
