"""``limits.yaml``: quotas and rate limits, declared in git beside agents.yaml and policies.

The file is validated against ``schemas/limits.schema.json``; an invalid one is refused with
``file:line`` and the last good ``Limits`` stays in force (it is one part of the bundle's
generation, ``gateway.bundle.config``). Loading builds a new immutable object.

Resolution for an API caller, field by field: the caller's subject id under
``subjects.ids``, else the most generous value among its roles under ``subjects.roles``,
else ``subjects.default``. ``null`` means unlimited; a field left out is inherited (and
unlimited when ``default`` leaves it out too). Instances resolve the same way: the agent's
entry under ``instances.agents``, else ``instances.default``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from gateway.errors import ConfigError
from gateway.yamlfile import line_of, read_yaml

LIMITS_SCHEMA = "limits.schema.json"


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket: ``rate`` tokens a second refill a bucket of ``burst`` tokens."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1):
            raise ValueError(f"a rate needs rate > 0 and burst >= 1, not {self}")

    @property
    def window_s(self) -> int:
        """The window of the equivalent quota policy: how long an empty bucket takes to fill."""
        return max(1, math.ceil(self.burst / self.rate))

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "burst": self.burst}


def _more_generous(a: Any, b: Any) -> Any:
    """The larger of two limits of one kind; None (unlimited) beats any number."""
    if a is None or b is None:
        return None
    if isinstance(a, Rate):
        return Rate(max(a.rate, b.rate), max(a.burst, b.burst))
    return max(a, b)


@dataclass(frozen=True, slots=True)
class SubjectLimits:
    """What one API caller may do; None is unlimited.

    ``requests``: every API call (health, readiness, metrics and the description excepted);
    ``submit``: ``POST /v1/tasks``; ``pending``: its tasks waiting for a container;
    ``running``: its tasks holding a container at once (more wait, as pending).
    """

    requests: Rate | None = None
    submit: Rate | None = None
    pending: int | None = None
    running: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: (v.to_json() if isinstance(v := getattr(self, f.name), Rate) else v)
            for f in fields(self)
        }


@dataclass(frozen=True, slots=True)
class InstanceLimits:
    """What one agent instance (one container, one SVID) may do; None is unlimited."""

    messages: Rate | None = None

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages.to_json() if self.messages else None}


Override = Mapping[str, Any]  # the fields an entry sets (a None value: unlimited)


def _apply(base: Any, override: Override) -> Any:
    if not override:
        return base
    return type(base)(**{f.name: override.get(f.name, getattr(base, f.name)) for f in fields(base)})


@dataclass(frozen=True)
class Limits:
    """One loaded limits file (or none: everything unlimited)."""

    default: SubjectLimits = field(default_factory=SubjectLimits)
    roles: Mapping[str, Override] = field(default_factory=lambda: MappingProxyType({}))
    ids: Mapping[str, Override] = field(default_factory=lambda: MappingProxyType({}))
    instance_default: InstanceLimits = field(default_factory=InstanceLimits)
    agents: Mapping[str, Override] = field(default_factory=lambda: MappingProxyType({}))
    long_polls: int | None = None
    revision: str = ""
    source: str = ""
    # Resolved limits by (subject id, roles), filled on first use: the hot path is a lookup.
    _cache: dict[tuple[str | None, tuple[str, ...]], SubjectLimits] = field(
        default_factory=dict, compare=False, repr=False
    )

    def for_subject(self, subject_id: str | None, roles: Iterable[str] = ()) -> SubjectLimits:
        """The limits of an API caller (an anonymous one: ``None``, no roles)."""
        key = (subject_id, tuple(roles))
        found = self._cache.get(key)
        if found is None:
            found = self._resolve(subject_id, key[1])
            if len(self._cache) < 65536:  # anonymous callers are keyed by subject None
                self._cache[key] = found
        return found

    def _resolve(self, subject_id: str | None, roles: tuple[str, ...]) -> SubjectLimits:
        merged: dict[str, Any] = {}
        for role in roles:
            for name, value in self.roles.get(role, {}).items():
                merged[name] = _more_generous(merged[name], value) if name in merged else value
        resolved = _apply(self.default, merged)
        if subject_id is not None:
            resolved = _apply(resolved, self.ids.get(subject_id, {}))
        return resolved  # type: ignore[no-any-return]

    def for_instance(self, agent: str | None) -> InstanceLimits:
        """The limits of one instance of ``agent``."""
        override = self.agents.get(agent or "")
        if not override:
            return self.instance_default
        return _apply(self.instance_default, override)  # type: ignore[no-any-return]

    @property
    def enabled(self) -> bool:
        """Whether any limit is set at all."""
        return bool(self.source)

    def to_json(self) -> dict[str, Any]:
        """The limits in force, as ``/v1/status`` shows them."""

        def entries(m: Mapping[str, Override]) -> dict[str, Any]:
            return {
                k: {n: v.to_json() if isinstance(v, Rate) else v for n, v in o.items()}
                for k, o in m.items()
            }

        return {
            "source": self.source or None,
            "revision": self.revision or None,
            "subjects": {
                "default": self.default.to_json(),
                "roles": entries(self.roles),
                "ids": entries(self.ids),
            },
            "instances": {
                "default": self.instance_default.to_json(),
                "agents": entries(self.agents),
            },
            "hub": {"long_polls": self.long_polls},
        }


NO_LIMITS = Limits()


class SchemaChecker(Protocol):
    """What loading needs from the bundle's schemas (``gateway.bundle.schemas.SchemaSet``)."""

    def errors(self, ref: str, instance: Any, prefix: str = "") -> list[dict[str, str]]:
        """Every violation of schema ``ref`` by ``instance``."""
        ...

    def has(self, ref: str) -> bool:
        """Whether schema ``ref`` is loaded."""
        ...


def load_limits(path: Path, schemas: SchemaChecker, display: str | None = None) -> Limits:
    """Parse and validate limits.yaml; raise ConfigError with file:line on any problem."""
    path = Path(path)
    name = display or path.name
    raw, node, data = read_yaml(path, name)
    if not schemas.has(LIMITS_SCHEMA):
        raise ConfigError(f"missing schemas/{LIMITS_SCHEMA}", location=name)
    errors = schemas.errors(LIMITS_SCHEMA, data)
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(
            f"{first['pointer'] or '/'}: {first['message']}{more}",
            location=f"{name}:{line_of(node, first['pointer'])}",
        )
    subjects = data.get("subjects") or {}
    instances = data.get("instances") or {}
    return Limits(
        default=SubjectLimits(**_override(subjects.get("default"))),
        roles=_table(subjects.get("roles")),
        ids=_table(subjects.get("ids")),
        instance_default=InstanceLimits(**_override(instances.get("default"))),
        agents=_table(instances.get("agents")),
        long_polls=(data.get("hub") or {}).get("long_polls"),
        revision="sha256:" + hashlib.sha256(raw).hexdigest()[:16],
        source=name,
    )


def _override(entry: dict[str, Any] | None) -> dict[str, Any]:
    """An entry of the file as dataclass fields: buckets become ``Rate``s, null stays None."""
    return {
        k: Rate(float(v["rate"]), int(v["burst"])) if isinstance(v, dict) else v
        for k, v in (entry or {}).items()
    }


def _table(entries: dict[str, Any] | None) -> Mapping[str, Override]:
    return MappingProxyType({k: MappingProxyType(_override(v)) for k, v in (entries or {}).items()})
