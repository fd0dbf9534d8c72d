"""The agent registry: ``agents.yaml``, validated against ``schemas/agents.schema.json``.

An invalid file is refused with ``file:line`` and the reason; callers keep the last good
``Registry`` in force (loading builds a new immutable object and never mutates one).

An entry with ``protocol: mcp`` is an MCP server in a container (``gateway.agents.mcp``):
it has ``transport``, an allow-list of ``tools``, an ``isolation`` and an idle time instead of
capabilities and schemas (its tools bring their own). The default protocol is ``gateway``.

An entry with ``protocol: a2a`` is an A2A server in a container (``gateway.agents.a2a``): it
has capabilities, schemas and a port like a ``gateway`` agent, but no ``endpoint`` (the path
comes from its card, which must name the entry and cover its capabilities) and no ``pool``.

An ``env`` entry is a literal string or ``{secret: NAME}``, a secret resolved from the
secrets file when the container starts (``gateway.containers.secrets``). Outside the hub
(API, policy input, stored revisions) ``env`` shows the variables' names only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.bundle.schemas import SchemaSet
from gateway.errors import ConfigError, UnknownAgent, UnknownCapability
from gateway.yamlfile import line_of, read_yaml

REGISTRY_SCHEMA = "agents.schema.json"
_ENV_VALUE = re.compile(r"^/agents/\d+/env/[^/]+")
# What ``AgentSpec.to_json`` shows for every env value, literal or secret.
ENV_HIDDEN = "***"


@dataclass(frozen=True)
class Resources:
    """What an agent asks for; the dispatch policy decides what it gets."""

    memory: str = "128m"
    cpus: float = 0.5
    pids: int = 64

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory)

    def to_json(self) -> dict[str, Any]:
        return {
            "memory": self.memory,
            "memory_bytes": self.memory_bytes,
            "cpus": self.cpus,
            "pids": self.pids,
        }


def parse_memory(value: str) -> int:
    """Bytes in a Docker-style size such as ``64m`` or ``1g``."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    value = value.strip().lower()
    if value and value[-1] in units:
        return int(value[:-1]) * units[value[-1]]
    return int(value)


@dataclass(frozen=True)
class AgentSpec:
    """One entry of agents.yaml."""

    name: str
    image: str
    capabilities: tuple[str, ...]
    input_schema: str
    output_schema: str
    port: int
    endpoint: str = "/task"
    timeout_s: float = 60.0
    resources: Resources = field(default_factory=Resources)
    network: str = "internal"
    subscriptions: tuple[str, ...] = ()
    reuse: bool = False
    pool: MappingProxyType[str, float] = field(default_factory=lambda: MappingProxyType({}))
    env: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Variable -> the name of the secret (in the secrets file) it is set from.
    secret_env: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    labels: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    description: str = ""
    line: int = 0
    # protocol "mcp": an MCP server (gateway.agents.mcp); these fields are its own.
    protocol: str = "gateway"
    transport: str = "stdio"
    tools: tuple[str, ...] = ()
    isolation: str = "per_owner"
    idle_s: float = 300.0
    mcp_path: str = "/mcp"

    def to_json(self) -> dict[str, Any]:
        """The entry as policy input, API output and stored revisions see it: env values
        hidden (``{"NAME": "***"}``), as they may be credentials."""
        return {
            "name": self.name,
            "description": self.description,
            "image": self.image,
            "capabilities": list(self.capabilities),
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
            "port": self.port,
            "endpoint": self.endpoint,
            "timeout_s": self.timeout_s,
            "resources": self.resources.to_json(),
            "network": self.network,
            "subscriptions": list(self.subscriptions),
            "reuse": self.reuse,
            "pool": dict(self.pool),
            "env": {name: ENV_HIDDEN for name in sorted({*self.env, *self.secret_env})},
            "labels": dict(self.labels),
            "protocol": self.protocol,
            **(self._mcp_json() if self.protocol == "mcp" else {}),
        }

    def _mcp_json(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "tools": list(self.tools),
            "isolation": self.isolation,
            "idle_s": self.idle_s,
        }


@dataclass(frozen=True)
class Registry:
    """An immutable, validated registry with its content revision."""

    agents: MappingProxyType[str, AgentSpec]
    revision: str
    source: str

    def get(self, name: str) -> AgentSpec:
        """The agent called ``name``, or UnknownAgent."""
        try:
            return self.agents[name]
        except KeyError:
            raise UnknownAgent(
                f"no agent named {name!r} in the registry",
                details={"known": sorted(self.agents)},
            ) from None

    def with_capability(self, capability: str) -> list[AgentSpec]:
        """Agents offering ``capability`` in file order, or UnknownCapability when none do."""
        found = [a for a in self.agents.values() if capability in a.capabilities]
        if not found:
            raise UnknownCapability(
                f"no agent offers capability {capability!r}",
                details={
                    "known": sorted({c for a in self.agents.values() for c in a.capabilities})
                },
            )
        return found

    def to_json(self) -> dict[str, Any]:
        return {name: spec.to_json() for name, spec in self.agents.items()}


def load_registry(path: Path, schemas: SchemaSet, display: str | None = None) -> Registry:
    """Parse and validate agents.yaml; raise ConfigError with file:line on any problem."""
    path = Path(path)
    name = display or path.name
    raw, node, data = read_yaml(path, name)
    errors = schemas.errors(REGISTRY_SCHEMA, data)
    if errors:
        first = errors[0]
        line = line_of(node, first["pointer"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = first["message"]
        if _ENV_VALUE.match(first["pointer"]):
            # The validator's message quotes the value, which may be a credential.
            message = "an env value must be a string or {secret: NAME} (NAME: A-Z a-z 0-9 _ . -)"
        raise ConfigError(f"{first['pointer'] or '/'}: {message}{more}", location=f"{name}:{line}")

    agents: dict[str, AgentSpec] = {}
    for index, entry in enumerate(data["agents"]):
        line = line_of(node, f"/agents/{index}")
        where = f"{name}:{line}"
        if entry["name"] in agents:
            raise ConfigError(f"duplicate agent name {entry['name']!r}", location=where)
        for key in ("input_schema", "output_schema"):
            if key in entry and not schemas.has(entry[key]):
                raise ConfigError(
                    f"{key} {entry[key]!r} is not a schema under {schemas.root.name}/",
                    location=f"{name}:{line_of(node, f'/agents/{index}/{key}')}",
                )
        agents[entry["name"]] = _spec(entry, line)
    return Registry(
        agents=MappingProxyType(agents),
        revision="sha256:" + hashlib.sha256(raw).hexdigest()[:16],
        source=name,
    )


def _spec(entry: dict[str, Any], line: int) -> AgentSpec:
    res = entry.get("resources", {})
    defaults = Resources()
    return AgentSpec(
        name=entry["name"],
        image=entry["image"],
        capabilities=tuple(entry.get("capabilities", ())),
        input_schema=entry.get("input_schema", ""),
        output_schema=entry.get("output_schema", ""),
        port=entry.get("port", 0),
        endpoint=entry.get("endpoint", "/task"),
        timeout_s=float(entry.get("timeout_s", 60.0)),
        resources=Resources(
            memory=res.get("memory", defaults.memory),
            cpus=float(res.get("cpus", defaults.cpus)),
            pids=int(res.get("pids", defaults.pids)),
        ),
        network=entry.get("network", "internal"),
        subscriptions=tuple(entry.get("subscriptions", ())),
        reuse=bool(entry.get("reuse", False)),
        pool=MappingProxyType(dict(entry.get("pool", {}))),
        env=MappingProxyType({k: v for k, v in entry.get("env", {}).items() if isinstance(v, str)}),
        secret_env=MappingProxyType(
            {k: v["secret"] for k, v in entry.get("env", {}).items() if isinstance(v, dict)}
        ),
        labels=MappingProxyType(dict(entry.get("labels", {}))),
        description=entry.get("description", ""),
        line=line,
        protocol=entry.get("protocol", "gateway"),
        transport=entry.get("transport", "stdio"),
        tools=tuple(entry.get("tools", ())),
        isolation=entry.get("isolation", "per_owner"),
        idle_s=float(entry.get("idle_s", 300.0)),
        mcp_path=entry.get("mcp_path", "/mcp"),
    )
