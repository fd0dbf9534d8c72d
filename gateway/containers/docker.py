"""The Docker backend: the ``docker`` SDK run on a dedicated thread pool.

The SDK is synchronous and its thread safety is undocumented, so each worker thread keeps
its own client. The client negotiates the API version with the engine (Debian's docker.io
speaks an older API than the docker CLI on the same machine). Every Docker or transport
error leaves this module as ``AgentUnavailable``. The env a spec takes from secrets is read
from the secrets file here, as the container is created (``gateway.containers.secrets``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests

from gateway.containers import firewall, secrets
from gateway.containers.backend import (
    LABEL_HUB,
    LABEL_MANAGED,
    ContainerHandle,
    ContainerSpec,
)
from gateway.errors import AgentUnavailable
from gateway.logs import get_logger

T = TypeVar("T")
log = get_logger(__name__)
IMAGE_CACHE_S = 30.0
CLOSE_WAIT_S = 15.0
ICC = "com.docker.network.bridge.enable_icc"


def check_user(user: str) -> str:
    """``user`` if it is a numeric ``uid:gid`` with neither 0; AgentUnavailable otherwise.

    A name would be resolved inside the image (whose /etc/passwd may map it to 0), so only
    numbers are trusted.
    """
    uid, sep, gid = user.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit() and int(uid) and int(gid)):
        raise AgentUnavailable(f"refusing to run a container as {user!r}: not a non-zero uid:gid")
    return user


def check_network(info: dict[str, Any], *, internal: bool) -> None:
    """Refuse a network whose flags would let containers reach more than the hub."""
    name = info.get("Name")
    fix = f"remove it (docker network rm {name}) so the hub creates it, or configure another"
    if info.get("Driver") != "bridge":
        raise AgentUnavailable(
            f"network {name!r} has driver {info.get('Driver')!r}, not 'bridge'; {fix}"
        )
    if internal and info.get("Internal") is not True:
        raise AgentUnavailable(
            f"network {name!r} is not internal (Internal=false): its containers could reach "
            f"any address; {fix}"
        )
    icc = (info.get("Options") or {}).get(ICC)
    if icc != "false":
        raise AgentUnavailable(
            f"network {name!r} allows inter-container traffic ({ICC}="
            f"{icc if icc is not None else 'unset, i.e. true'}); {fix}"
        )
    if info.get("EnableIPv6"):
        raise AgentUnavailable(
            f"network {name!r} has IPv6 enabled (EnableIPv6=true), which the hub's host "
            f"firewall rules (IPv4) do not cover; {fix}"
        )


class DockerBackend:
    """ContainerBackend on a local (or ``DOCKER_HOST``) Docker engine."""

    def __init__(
        self,
        *,
        internal_network: str = "agent-gateway-internal",
        egress_network: str = "agent-gateway-egress",
        agent_port: int,
        agent_address: str | None = None,
        workers: int = 4,
        api_timeout_s: int = 60,
        iptables: str = "iptables",
        secrets_file: Path | None = None,
    ) -> None:
        self.internal_network = internal_network
        self.egress_network = egress_network
        # Where containers reach the hub (address defaults to the internal network's
        # gateway): the only host port the firewall lets them connect to.
        self.agent_port = agent_port
        self.agent_address = agent_address
        self._iptables = firewall.Iptables(iptables)
        self.secrets_file = secrets_file
        self._api_timeout_s = api_timeout_s
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="docker")
        self._images: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # -- plumbing

    def _client(self) -> docker.APIClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = docker.from_env(version="auto", timeout=self._api_timeout_s).api
            self._local.client = client
        return client

    async def _call(self, what: str, func: Callable[[docker.APIClient], T]) -> T:
        loop = asyncio.get_running_loop()

        def run() -> T:
            return func(self._client())

        try:
            return await loop.run_in_executor(self._executor, run)
        except docker.errors.ImageNotFound as e:
            raise AgentUnavailable(
                f"{what}: image not found ({e.explanation}); build it with "
                "'agent-gateway images build'"
            ) from e
        except docker.errors.APIError as e:
            raise AgentUnavailable(f"{what}: Docker engine error: {e.explanation or e}") from e
        except (docker.errors.DockerException, requests.RequestException, OSError) as e:
            raise AgentUnavailable(f"{what}: Docker engine unreachable: {e}") from e

    # -- interface

    async def ping(self) -> None:
        """Raise AgentUnavailable when the engine does not answer."""
        await self._call("ping", lambda c: c.ping())

    async def prepare(self) -> dict[str, str]:
        """Create (or check) the internal and egress networks, fence the host off from them
        with firewall rules, and return the hub's addresses on them.

        A network of the configured name with the wrong flags, or a firewall that cannot be
        set up, is an AgentUnavailable (the hub starts degraded with it as the reason).
        """

        def ensure(c: docker.APIClient) -> dict[str, str]:
            facts: dict[str, str] = {}
            bridges: list[str] = []
            for name, internal in ((self.internal_network, True), (self.egress_network, False)):
                found = [n for n in c.networks(names=[name]) if n["Name"] == name]
                if not found:
                    try:
                        c.create_network(
                            name,
                            driver="bridge",
                            internal=internal,
                            check_duplicate=True,
                            # Containers reach each other only through the hub.
                            options={ICC: "false"},
                            labels={LABEL_MANAGED: "true"},
                        )
                    except docker.errors.APIError as e:
                        # Another hub created it between our look and our create.
                        if e.status_code != 409:
                            raise
                info = c.inspect_network(name)
                check_network(info, internal=internal)
                bridge = firewall.bridge_interface(info)
                if not firewall.interface_exists(bridge):
                    raise AgentUnavailable(
                        f"network {name!r}: its bridge {bridge} is not an interface of this "
                        "host, so the hub cannot fence it off (is the engine remote?)"
                    )
                bridges.append(bridge)
                configs = (info.get("IPAM") or {}).get("Config") or [{}]
                facts[f"{'internal' if internal else 'egress'}_gateway"] = configs[0].get(
                    "Gateway", ""
                )
            address = self.agent_address or facts["internal_gateway"]
            if not address:
                raise AgentUnavailable(f"network {self.internal_network!r} has no gateway address")
            firewall.install(bridges, address, self.agent_port, ipt=self._iptables)
            facts["bridges"] = ",".join(bridges)
            return facts

        return await self._call("prepare networks", ensure)

    def _image_config(self, c: docker.APIClient, image: str) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            cached = self._images.get(image)
        if cached and now - cached[0] < IMAGE_CACHE_S:
            return cached[1]
        config = c.inspect_image(image).get("Config") or {}
        with self._lock:
            self._images[image] = (now, config)
        return config

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        """Create and start the container, and read back its address on the network."""
        handle, _ = await self._call(f"start {spec.name}", lambda c: self._run(c, spec))
        return handle

    async def start_stdio(self, spec: ContainerSpec) -> tuple[ContainerHandle, socket.socket, Any]:
        """Start the container with its stdin open (``docker run -i``), attached before it
        starts so no output is lost: the handle, the attach socket (stdin in, Docker's
        multiplexed stdout and stderr out) and the engine client's object that owns it."""
        stdin_spec = dataclasses.replace(spec, stdin=True)
        handle, attached = await self._call(
            f"start {spec.name}", lambda c: self._run(c, stdin_spec, attach=True)
        )
        assert attached is not None
        raw = getattr(attached, "_sock", attached)
        if not isinstance(raw, socket.socket):
            await self.remove(handle.id)
            raise AgentUnavailable("attaching to a container's stdio needs a local engine socket")
        # Our own descriptor: the engine client's objects may be collected and close theirs.
        return handle, raw.dup(), attached

    def _run(
        self, c: docker.APIClient, spec: ContainerSpec, *, attach: bool = False
    ) -> tuple[ContainerHandle, Any]:
        config = self._image_config(c, spec.image)
        original = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
        if not original:
            raise AgentUnavailable(f"image {spec.image} has no entrypoint or command")
        # Never the image's USER: a root image runs as the spec's numeric user too.
        user = check_user(spec.user)
        # Before anything is created: a secret that cannot be read leaves no container.
        environment = {
            **spec.env,
            **secrets.resolve_env(self.secrets_file, spec.secret_env),
        }
        host_config = c.create_host_config(
            cap_drop=list(spec.cap_drop),
            security_opt=list(spec.security_opt),
            read_only=spec.read_only,
            tmpfs=dict(spec.tmpfs),
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            nano_cpus=spec.nano_cpus,
            pids_limit=spec.pids_limit,
            network_mode=spec.network,
            restart_policy={"Name": "no"},
            log_config={"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}},
        )
        created = c.create_container(
            spec.image,
            name=spec.name,
            # The TTL is enforced inside the container, so it holds even if the hub dies.
            entrypoint=["timeout", "-s", "TERM", "-k", "5", f"{spec.ttl_s}s"],
            command=original,
            environment=environment,
            labels=spec.labels,
            user=user,
            host_config=host_config,
            networking_config=c.create_networking_config(
                {spec.network: c.create_endpoint_config()}
            ),
            detach=True,
            stdin_open=spec.stdin,
        )
        cid = created["Id"]
        attached: Any = None
        try:
            if attach:
                attached = c.attach_socket(
                    cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
                )
            c.start(cid)
            info = c.inspect_container(cid)
            address = info["NetworkSettings"]["Networks"][spec.network]["IPAddress"]
            if not address:
                raise AgentUnavailable(f"container {spec.name} has no address")
        except BaseException:
            if attached is not None:
                attached.close()
            c.remove_container(cid, force=True)
            raise
        handle = ContainerHandle(
            id=cid,
            name=spec.name,
            address=address,
            port=spec.port,
            hostname=(info.get("Config") or {}).get("Hostname") or None,
        )
        return handle, attached

    async def attach(self, container_id: str, port: int) -> ContainerHandle:
        """A handle to a running container, read back from the engine."""

        def run(c: docker.APIClient) -> ContainerHandle:
            info = c.inspect_container(container_id)
            networks = info["NetworkSettings"]["Networks"] or {}
            address = next((n["IPAddress"] for n in networks.values() if n.get("IPAddress")), "")
            if not address:
                raise AgentUnavailable(f"container {container_id[:12]} has no address")
            return ContainerHandle(
                id=info["Id"],
                name=info["Name"].lstrip("/"),
                address=address,
                port=port,
                hostname=(info.get("Config") or {}).get("Hostname") or None,
            )

        return await self._call("attach", run)

    async def is_running(self, container_id: str) -> bool:
        def run(c: docker.APIClient) -> bool:
            try:
                return bool(c.inspect_container(container_id)["State"]["Running"])
            except docker.errors.NotFound:
                return False

        return await self._call("inspect", run)

    async def inspect(self, container_id: str) -> dict[str, Any]:
        """The engine's full description of a container (for tests and operators)."""
        return await self._call("inspect", lambda c: c.inspect_container(container_id))

    async def update_limits(
        self, container_id: str, *, memory_bytes: int, nano_cpus: int, pids_limit: int
    ) -> None:
        """Tighten a running container's limits (``docker update``), read back to check.

        Raw API call: docker-py's ``update_container`` knows neither NanoCpus nor PidsLimit.
        """

        def run(c: docker.APIClient) -> None:
            body = {
                "Memory": memory_bytes,
                "MemorySwap": memory_bytes,
                "NanoCpus": nano_cpus,
                "PidsLimit": pids_limit,
            }
            url = c._url("/containers/{0}/update", container_id)
            c._raise_for_status(c._post_json(url, data=body))
            host = c.inspect_container(container_id)["HostConfig"]
            got = (host.get("Memory"), host.get("NanoCpus"), host.get("PidsLimit"))
            if got != (memory_bytes, nano_cpus, pids_limit):
                raise AgentUnavailable(f"engine did not apply the limits: {got}")

        await self._call(f"update {container_id[:12]}", run)

    async def remove(self, container_id: str) -> None:
        def run(c: docker.APIClient) -> None:
            try:
                c.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                # "removal already in progress" means someone else is doing our job.
                if e.status_code != 409:
                    raise

        await self._call("remove", run)

    async def list_managed(self, hub_id: str | None = None) -> list[dict[str, Any]]:
        labels = [f"{LABEL_MANAGED}=true"]
        if hub_id:
            labels.append(f"{LABEL_HUB}={hub_id}")

        def run(c: docker.APIClient) -> list[dict[str, Any]]:
            return [
                {
                    "id": item["Id"],
                    "name": (item.get("Names") or ["?"])[0].lstrip("/"),
                    "labels": item.get("Labels") or {},
                    "state": item.get("State"),
                    "created": item.get("Created"),
                }
                for item in c.containers(all=True, filters={"label": labels})
            ]

        return await self._call("list containers", run)

    async def close(self) -> None:
        # Each worker owns its client; the sockets go with the threads. Calls not begun are
        # dropped, those under way may finish (bounded): a process that exits between a
        # create and its start leaves a container in "Created", where no TTL ever runs.
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(
            None, lambda: self._executor.shutdown(wait=True, cancel_futures=True)
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), CLOSE_WAIT_S)
