"""The Docker Swarm backend: each task's agent runs as a one-replica Swarm service.

The backend talks to a Swarm manager through docker-py (the same thread pool and
per-thread clients as ``gateway.containers.docker``, API version negotiated: Debian's
docker.io engine speaks 1.41, older than the client). It needs API 1.41, the first with a
service's ``CapabilityDrop``, ``Ulimits`` and ``Resources.Limits.Pids``, and refuses an
older engine rather than start services without them.

What a service gets (``service_spec``): one replica, restart condition ``none``, the TTL
wrapper (``timeout -s TERM -k 5 <ttl>s`` around the image's entrypoint, as the Docker
backend does), a numeric non-root user, every capability dropped, a read-only root with a
tmpfs ``/tmp`` (the engine mounts a service's tmpfs ``nosuid,nodev,noexec``), memory, CPU
and pids limits, the spec's labels on both the service and its container, a 1 MB json-file
log, no published ports and no virtual IP (``dnsrr``). Its network is an overlay the backend
creates: ``driver=overlay, internal=True, attachable=True, encrypted`` (IPsec between
nodes); the egress network is the same but not internal.

What a service cannot get is listed in ``guardrails.SWARM_EQUIVALENTS`` with what happens
instead: ``no-new-privileges`` (services take no security options), ``icc`` (an overlay
cannot isolate its containers from each other), ``memory-swap`` (the engine sets
memory+swap to twice the memory limit) and, on the egress network, ``host-firewall``. Each
is never silently dropped: ``start`` raises ``GuardrailUnenforceable`` naming the first
such guardrail unless the decision's sandbox lists it in ``swarm_acceptable``. Whatever
has no equivalent at all (another security option, a stdin-attached MCP server, tmpfs
options beyond ``rw,noexec,nosuid,nodev,size``) is refused the same way, always. A warm
pool's container has no such grant, so warm pools stay with the Docker backend, and
``update_limits`` (which would replace the service's task) is refused.

How hub and agents reach each other: over the overlay only. An internal overlay has no
interface on any host (no docker_gwbridge either): a hub running on the host can neither
reach an agent's address nor be reached by it. So the hub runs in a container attached to
the overlay (it is ``attachable`` for that: ``docker run --network agent-gateway-swarm``,
or a stack service on it), ``prepare`` finds the hub's own address on it (its container's
hostname among the network's containers, or ``agent_listen_host``), and agents call back at
that address. The hub reaches an agent at its task's address on the overlay
(``NetworksAttachments``), which is valid from any container on the network on any node.
The tests, whose process runs on the host, check the path from a container they attach to
the same overlay; the host firewall of the Docker backend has nothing to fence here.

Secrets and the JWT-SVID go in the service's environment, as with the Docker backend (the
agents and the SDK read env): Swarm secrets are files under ``/run/secrets`` and would
need a shell in every image plus a secret object per task. The values are therefore in the
service spec, which the managers keep in their Raft log (encrypted on disk) and show to
anyone holding the engine API, as ``docker inspect`` shows a container's env.

The handle's id is the service id: ``is_running``, ``attach``, ``remove`` and
``list_managed`` work on services (their task's state), so recovery and the orphan scan see
services the way they see containers.
"""

from __future__ import annotations

import contextlib
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import (
    ContainerSpec as ServiceContainerSpec,
)
from docker.types import (
    EndpointSpec,
    Mount,
    NetworkAttachmentConfig,
    Resources,
    RestartPolicy,
    TaskTemplate,
)

from gateway.containers import secrets
from gateway.containers.backend import LABEL_HUB, LABEL_MANAGED, ContainerHandle, ContainerSpec
from gateway.containers.docker import DockerBackend, check_user
from gateway.containers.guardrails import SWARM_EQUIVALENTS
from gateway.errors import AgentUnavailable, GuardrailUnenforceable
from gateway.logs import get_logger

log = get_logger(__name__)
MIN_API = (1, 41)
NO_NEW_PRIVILEGES = ("no-new-privileges:true", "no-new-privileges")
TMPFS_FLAGS = {"rw", "noexec", "nosuid", "nodev"}
SERVICE_LABEL = "com.docker.swarm.service.id"
# Task states after which a task never runs again (restart condition none).
ENDED = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
STOP_GRACE_NS = 1_000_000_000
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _refuse(guardrail: str, why: str) -> GuardrailUnenforceable:
    return GuardrailUnenforceable(
        f"the Swarm backend cannot enforce {guardrail}: {why}",
        details={"guardrail": guardrail, "backend": "swarm", "equivalent": why},
    )


def tmpfs_size(options: str) -> int:
    """The size in bytes of a tmpfs option string; GuardrailUnenforceable for any option a
    service's tmpfs mount cannot take (the engine's own are rw,nosuid,nodev,noexec)."""
    size = 64 * 1024**2
    for opt in filter(None, options.split(",")):
        if opt in TMPFS_FLAGS:
            continue
        key, _, value = opt.partition("=")
        number, unit = value.rstrip("kmgKMG"), value[len(value.rstrip("kmgKMG")) :].lower()
        if key != "size" or not number.isdigit() or unit not in UNITS:
            raise _refuse(f"tmpfs option {opt!r}", "a service's tmpfs takes only a size")
        size = int(number) * UNITS[unit]
    return size


def unenforced(spec: ContainerSpec, *, egress_network: str) -> list[str]:
    """The guardrails of ``spec`` a service can only replace by an equivalent (names from
    ``SWARM_EQUIVALENTS``); GuardrailUnenforceable for those it cannot replace at all."""
    gaps = ["icc", "memory-swap"]
    for opt in spec.security_opt:
        if opt not in NO_NEW_PRIVILEGES:
            raise _refuse(f"security option {opt!r}", "services take no security options")
        gaps.insert(0, "no-new-privileges")
    if spec.stdin:
        raise _refuse("stdin", "a service's stdin cannot be attached (stdio MCP servers)")
    if spec.network == egress_network:
        gaps.append("host-firewall")
    return gaps


def check_accepted(spec: ContainerSpec, *, egress_network: str) -> list[str]:
    """The equivalents ``spec`` will run with; GuardrailUnenforceable naming the first
    guardrail whose equivalent its sandbox did not accept (``swarm_acceptable``)."""
    gaps = unenforced(spec, egress_network=egress_network)
    for gap in gaps:
        if gap not in spec.accepted_equivalents:
            raise _refuse(
                gap,
                f"{SWARM_EQUIVALENTS[gap]}; the sandbox does not accept this "
                f"(add {gap!r} to sandbox.swarm_acceptable to allow it)",
            )
    return gaps


def service_spec(spec: ContainerSpec, command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """The arguments of ``APIClient.create_service`` for ``spec`` running ``command`` (the
    image's entrypoint and command) under the TTL wrapper, with ``env``."""
    container = ServiceContainerSpec(
        spec.image,
        # The TTL is enforced inside the container, so it holds even if the hub dies.
        command=["timeout", "-s", "TERM", "-k", "5", f"{spec.ttl_s}s"],
        args=command,
        env=env,
        user=check_user(spec.user),
        labels=dict(spec.labels),
        read_only=spec.read_only,
        cap_drop=list(spec.cap_drop),
        mounts=[
            Mount(target, None, type="tmpfs", tmpfs_size=tmpfs_size(options), tmpfs_mode=0o1777)
            for target, options in spec.tmpfs.items()
        ],
        init=False,
        # The hub removes a container it is done with, and the Docker backend kills it at
        # once; a service's default 10 s stop grace would hold every removal up.
        stop_grace_period=STOP_GRACE_NS,
    )
    resources = Resources(cpu_limit=spec.nano_cpus, mem_limit=spec.memory_bytes)
    # docker-py has no argument for it; the field is API 1.41's Resources.Limits.Pids.
    resources["Limits"]["Pids"] = spec.pids_limit
    template = TaskTemplate(
        container,
        resources=resources,
        restart_policy=RestartPolicy(condition="none"),
        networks=[NetworkAttachmentConfig(spec.network)],
        log_driver={"Name": "json-file", "Options": {"max-size": "1m", "max-file": "1"}},
    )
    return {
        "task_template": template,
        "name": spec.name,
        "labels": dict(spec.labels),
        # No virtual IP and no published port: the hub calls the task's own address.
        "endpoint_spec": EndpointSpec(mode="dnsrr"),
    }


def check_overlay(info: dict[str, Any], *, internal: bool) -> None:
    """Refuse a network that is not an attachable, encrypted overlay (internal if asked)."""
    name = info.get("Name")
    fix = f"remove it (docker network rm {name}) so the hub creates it, or configure another"
    problems = []
    if info.get("Driver") != "overlay":
        problems.append(f"driver {info.get('Driver')!r}, not 'overlay'")
    if internal and info.get("Internal") is not True:
        problems.append("not internal: its containers could reach any address")
    if info.get("Attachable") is not True:
        problems.append("not attachable: the hub's container cannot join it")
    if "encrypted" not in (info.get("Options") or {}):
        problems.append("not encrypted: traffic between nodes would be clear text")
    if problems:
        raise AgentUnavailable(f"network {name!r} is {'; '.join(problems)}; {fix}")


def task_address(task: dict[str, Any], network: str | None = None) -> str:
    """A task's IPv4 address on ``network`` (by name or id; any network when None)."""
    for attachment in task.get("NetworksAttachments") or []:
        net = attachment.get("Network") or {}
        if network in (None, net.get("ID"), (net.get("Spec") or {}).get("Name")):
            for address in attachment.get("Addresses") or []:
                return str(address).split("/")[0]
    return ""


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    # Nanosecond fractions are more than fromisoformat reads: seconds are enough here.
    return datetime.fromisoformat(stamp[:19]).replace(tzinfo=UTC).timestamp()


def _latest(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(tasks, key=lambda t: t.get("CreatedAt") or "", default=None)


class SwarmBackend(DockerBackend):
    """ContainerBackend on a Docker Swarm manager: one service per container."""

    def __init__(
        self,
        *,
        internal_network: str = "agent-gateway-swarm",
        egress_network: str = "agent-gateway-swarm-egress",
        agent_port: int,
        agent_address: str | None = None,
        workers: int = 4,
        api_timeout_s: int = 60,
        secrets_file: Path | None = None,
        start_timeout_s: float = 60.0,
        poll_s: float = 0.05,
    ) -> None:
        super().__init__(
            internal_network=internal_network,
            egress_network=egress_network,
            agent_port=agent_port,
            agent_address=agent_address,
            workers=workers,
            api_timeout_s=api_timeout_s,
            secrets_file=secrets_file,
        )
        self.start_timeout_s = start_timeout_s
        self.poll_s = poll_s

    async def ping(self) -> None:
        """AgentUnavailable unless the engine answers, speaks API 1.41+ and is a manager."""

        def run(c: docker.APIClient) -> None:
            c.ping()
            version = tuple(int(p) for p in str(c.api_version).split("."))
            if version < MIN_API:
                raise AgentUnavailable(
                    f"engine API {c.api_version} is older than 1.41: its services cannot "
                    "drop capabilities or limit pids"
                )
            swarm = c.info().get("Swarm") or {}
            if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
                raise AgentUnavailable(
                    "the engine is not a Swarm manager (docker swarm init, or point "
                    "DOCKER_HOST at a manager)"
                )

        await self._call("ping", run)

    async def prepare(self) -> dict[str, str]:
        """Create (or check) the overlay networks; return the hub's address on them.

        The hub must be attached to the internal overlay (its container's hostname is
        looked up among the network's containers) unless ``agent_address`` is given.
        """

        def ensure(c: docker.APIClient) -> dict[str, str]:
            facts: dict[str, str] = {}
            for name, internal in ((self.internal_network, True), (self.egress_network, False)):
                info = self._ensure_overlay(c, name, internal=internal)
                key = "internal_gateway" if internal else "egress_gateway"
                facts[key] = own_address(info) or ""
                facts[f"{key.split('_')[0]}_network_id"] = str(info.get("Id", ""))
            address = self.agent_address or facts["internal_gateway"]
            if not address:
                raise AgentUnavailable(
                    f"the hub is not attached to the overlay {self.internal_network!r}, so "
                    "agents cannot reach it: run the hub in a container on that network "
                    f"(docker run --network {self.internal_network} ...) or set its address"
                )
            facts["internal_gateway"] = address
            return facts

        return await self._call("prepare networks", ensure)

    def _ensure_overlay(self, c: docker.APIClient, name: str, *, internal: bool) -> Any:
        found = [n["Id"] for n in c.networks(names=[name]) if n["Name"] == name]
        ref = found[0] if found else name
        if not found:
            try:
                ref = c.create_network(
                    name,
                    driver="overlay",
                    internal=internal,
                    attachable=True,
                    options={"encrypted": ""},
                    check_duplicate=True,
                    labels={LABEL_MANAGED: "true"},
                )["Id"]
            except docker.errors.APIError as e:
                # Another hub created it between our look and our create.
                if e.status_code != 409:
                    raise
        # Just created, a network inspected by name may read as a stub without a driver for
        # a moment (measured on 20.10): wait for the manager's allocated record.
        deadline = time.monotonic() + 5.0
        info = c.inspect_network(ref)
        while not info.get("Driver") and time.monotonic() < deadline:
            time.sleep(self.poll_s or 0.05)
            info = c.inspect_network(ref)
        check_overlay(info, internal=internal)
        return info

    def enforceable(self, spec: ContainerSpec) -> None:
        """GuardrailUnenforceable when a service could not carry ``spec`` (checked when the
        dispatch is decided, so the refusal is the decision's, logged with its reason)."""
        check_accepted(spec, egress_network=self.egress_network)

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        """Create the service and wait for its task to run; its address on the overlay.

        GuardrailUnenforceable (nothing created) when the spec needs a guardrail a service
        cannot carry and its sandbox did not accept the equivalent.
        """
        accepted = check_accepted(spec, egress_network=self.egress_network)
        log.info(
            "service runs with Swarm equivalents",
            extra={"service": spec.name, "equivalents": accepted},
        )
        return await self._call(f"start {spec.name}", lambda c: self._run_service(c, spec))

    async def start_stdio(self, spec: ContainerSpec) -> Any:
        """Refused: a service's stdin cannot be attached."""
        raise _refuse("stdin", "a service's stdin cannot be attached (stdio MCP servers)")

    def _run_service(self, c: docker.APIClient, spec: ContainerSpec) -> ContainerHandle:
        config = self._image_config(c, spec.image)
        original = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
        if not original:
            raise AgentUnavailable(f"image {spec.image} has no entrypoint or command")
        # Before anything is created: a secret that cannot be read leaves no service.
        env = {**spec.env, **secrets.resolve_env(self.secrets_file, spec.secret_env)}
        sid = c.create_service(**service_spec(spec, original, env))["ID"]
        try:
            task = self._wait_running(c, sid, spec.name)
            address = task_address(task, spec.network)
            if not address:
                raise AgentUnavailable(f"service {spec.name} has no address on {spec.network}")
        except BaseException:
            self._remove_service(c, sid)
            raise
        return ContainerHandle(id=sid, name=spec.name, address=address, port=spec.port)

    def _wait_running(self, c: docker.APIClient, sid: str, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.start_timeout_s
        last = "no task yet"
        while time.monotonic() < deadline:
            task = _latest(c.tasks(filters={"service": sid}))
            if task is not None:
                status = task.get("Status") or {}
                state = status.get("State")
                if state == "running":
                    return task
                if state in ENDED:
                    raise AgentUnavailable(
                        f"service {name}: its task ended as {state} "
                        f"({status.get('Err') or status.get('Message') or 'no reason'})"
                    )
                last = f"{state}: {status.get('Err') or status.get('Message') or ''}".strip()
            time.sleep(self.poll_s)
        raise AgentUnavailable(
            f"service {name} not running after {self.start_timeout_s:g} s (task {last})"
        )

    async def attach(self, container_id: str, port: int) -> ContainerHandle:
        """A handle to a running service, its address read from its task."""

        def run(c: docker.APIClient) -> ContainerHandle:
            service = c.inspect_service(container_id)
            tasks = c.tasks(filters={"service": service["ID"], "desired-state": "running"})
            address = next((task_address(t) for t in tasks if task_address(t)), "")
            if not address:
                raise AgentUnavailable(f"service {container_id[:12]} has no running task")
            name = service["Spec"]["Name"]
            return ContainerHandle(id=service["ID"], name=name, address=address, port=port)

        return await self._call("attach", run)

    async def is_running(self, container_id: str) -> bool:
        def run(c: docker.APIClient) -> bool:
            try:
                tasks = c.tasks(filters={"service": container_id})
            except docker.errors.NotFound:
                return False
            return any((t.get("Status") or {}).get("State") == "running" for t in tasks)

        return await self._call("inspect", run)

    async def inspect(self, container_id: str) -> dict[str, Any]:
        """The service, its latest task and (on this node) the task's container."""

        def run(c: docker.APIClient) -> dict[str, Any]:
            service = c.inspect_service(container_id)
            task = _latest(c.tasks(filters={"service": service["ID"]}))
            status = (task or {}).get("Status") or {}
            cid = (status.get("ContainerStatus") or {}).get("ContainerID")
            container = None
            if cid:
                with contextlib.suppress(docker.errors.NotFound):
                    container = c.inspect_container(cid)
            return {"service": service, "task": task, "container": container}

        return await self._call("inspect", run)

    async def update_limits(
        self, container_id: str, *, memory_bytes: int, nano_cpus: int, pids_limit: int
    ) -> None:
        """Refused: changing a service's resources replaces its task (a new container)."""
        raise AgentUnavailable(
            "the Swarm backend cannot change a running service's limits (the engine would "
            "replace its task); warm pools need the Docker backend"
        )

    def _remove_service(self, c: docker.APIClient, sid: str) -> None:
        try:
            c.remove_service(sid)
        except docker.errors.NotFound:
            return
        # The engine stops the task's container seconds after it answers (3 s, 7 s on an
        # overlay, measured): on this node the container is force-removed, as the Docker
        # backend does; elsewhere its node's engine does it. Bounded wait so a caller sees
        # it gone.
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            left = c.containers(all=True, filters={"label": f"{SERVICE_LABEL}={sid}"})
            if not left:
                return
            for container in left:
                try:
                    c.remove_container(container["Id"], force=True)
                except docker.errors.APIError as e:
                    # Gone already, or the engine's own removal is under way.
                    if e.status_code not in (404, 409):
                        raise
            time.sleep(self.poll_s)
        log.warning("service's container outlived its removal", extra={"service": sid})

    async def remove(self, container_id: str) -> None:
        await self._call("remove", lambda c: self._remove_service(c, container_id))

    async def list_managed(self, hub_id: str | None = None) -> list[dict[str, Any]]:
        """Services labelled as ours: id, name, labels, their task's state, created time."""
        labels = [f"{LABEL_MANAGED}=true"]
        if hub_id:
            labels.append(f"{LABEL_HUB}={hub_id}")

        def run(c: docker.APIClient) -> list[dict[str, Any]]:
            services = c.services(filters={"label": labels})
            if not services:
                return []
            by_service: dict[str, list[dict[str, Any]]] = {}
            for t in c.tasks(filters={"service": [s["ID"] for s in services]}):
                by_service.setdefault(t.get("ServiceID", ""), []).append(t)
            found = []
            for s in services:
                tasks = by_service.get(s["ID"], [])
                states = [(t.get("Status") or {}).get("State") for t in tasks]
                latest = _latest(tasks)
                state = (
                    "running"
                    if "running" in states
                    else ((latest or {}).get("Status") or {}).get("State", "created")
                )
                found.append(
                    {
                        "id": s["ID"],
                        "name": s["Spec"]["Name"],
                        "labels": s["Spec"].get("Labels") or {},
                        "state": state,
                        "created": _epoch(s.get("CreatedAt")),
                    }
                )
            return found

        return await self._call("list services", run)


def own_address(network: dict[str, Any]) -> str | None:
    """This process's container's IPv4 address on ``network`` (an inspected network), found
    by its hostname (a container's is its id's prefix); None when not on it."""
    host = socket.gethostname()
    for cid, entry in (network.get("Containers") or {}).items():
        if host and (cid.startswith(host) or entry.get("Name") == host):
            return str(entry.get("IPv4Address", "")).split("/")[0] or None
    return None
