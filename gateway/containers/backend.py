"""The container backend interface: what the routers need from a container engine.

Two implementations: the local Docker engine (``gateway.containers.docker``) and Docker
Swarm services (``gateway.containers.swarm``). Tests of the routers use a fake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

LABEL_PREFIX = "io.agent-gateway."
LABEL_HUB = LABEL_PREFIX + "hub"
LABEL_TASK = LABEL_PREFIX + "task"
LABEL_AGENT = LABEL_PREFIX + "agent"
LABEL_EXPIRES = LABEL_PREFIX + "expires"
LABEL_MANAGED = LABEL_PREFIX + "managed"
# The instance id bound into the container's JWT-SVID: which attempt of its task it runs.
LABEL_INSTANCE = LABEL_PREFIX + "instance"
# The agent whose warm pool a container belongs to (gateway.containers.pools): such a
# container has no task label, as labels cannot change once it runs.
LABEL_POOL = LABEL_PREFIX + "pool"
NONROOT_USER = "65534:65534"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one hardened agent container.

    Built only by ``gateway.containers.guardrails.build_spec`` from a policy decision, so
    nothing reaches the engine that the decision did not grant.
    """

    name: str
    image: str
    port: int
    env: dict[str, str]
    labels: dict[str, str]
    network: str
    memory_bytes: int
    nano_cpus: int
    pids_limit: int
    ttl_s: int
    # Variable -> secret name: set by the backend from the secrets file as it creates the
    # container, so the values never sit in a spec the hub keeps or logs.
    secret_env: dict[str, str] = field(default_factory=dict)
    read_only: bool = True
    # Numeric, so the image's /etc/passwd cannot map it to root; never the image's USER.
    user: str = NONROOT_USER
    tmpfs: dict[str, str] = field(
        default_factory=lambda: {"/tmp": "rw,noexec,nosuid,nodev,size=64m"}
    )
    cap_drop: tuple[str, ...] = ("ALL",)
    security_opt: tuple[str, ...] = ("no-new-privileges:true",)
    # stdin kept open (``docker run -i``): how the hub speaks to a stdio MCP server.
    stdin: bool = False
    # Guardrails a backend may replace by its documented equivalent (the sandbox's
    # ``swarm_acceptable``, ``guardrails.SWARM_EQUIVALENTS``); the Docker backend needs none.
    accepted_equivalents: frozenset[str] = frozenset()


# Sent to agents with the hostname of the container the hub means; the SDK answers 421 when
# it is not its own (gateway.sdk.agent), and the hub then treats it as unreachable.
CONTAINER_HEADER = "X-Gateway-Container"


@dataclass(frozen=True)
class ContainerHandle:
    """A started container and the address the hub reaches it at."""

    id: str
    name: str
    address: str
    port: int
    # The container's own hostname, sent with every probe and hand-off (CONTAINER_HEADER):
    # an address the engine gave to another container after this one died must not take
    # its task. None where the backend cannot know it (then nothing is checked).
    hostname: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.port}"


class ContainerBackend(Protocol):
    """A container engine, seen from the hub."""

    async def ping(self) -> None:
        """Raise AgentUnavailable when the engine cannot be reached."""
        ...

    async def prepare(self) -> dict[str, str]:
        """Create what containers need (networks); return facts such as the hub address."""
        ...

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        """Create and start a container; raise AgentUnavailable on engine errors."""
        ...

    async def attach(self, container_id: str, port: int) -> ContainerHandle:
        """A handle to an existing container (after a hub restart)."""
        ...

    async def is_running(self, container_id: str) -> bool:
        """Whether the container still runs (False when it exited or is gone)."""
        ...

    async def update_limits(
        self, container_id: str, *, memory_bytes: int, nano_cpus: int, pids_limit: int
    ) -> None:
        """Set a running container's memory, CPU and pids limits (a warm container tightened
        to its task's sandbox); AgentUnavailable when the engine refuses."""
        ...

    async def remove(self, container_id: str) -> None:
        """Stop (if needed) and remove a container; a missing one is not an error."""
        ...

    async def list_managed(self, hub_id: str | None = None) -> list[dict[str, Any]]:
        """Containers labelled as ours (optionally only this hub's): id, name, labels, state."""
        ...

    async def close(self) -> None:
        """Release clients and threads."""
        ...
