"""Container hardening against the real engine and the host's real iptables.

- from a container on an agent network, the host's other services are unreachable (the
  connection times out: the host firewall drops it), the hub's agent port is reachable, and
  it serves the agent routes only;
- the firewall rules are installed once, in order, whatever the number of hubs;
- an existing network with the wrong flags is refused, named, with the flag;
- an image whose user is root still runs as 65534:65534, and the read-only root check from
  inside would have seen a writable root.

Every container, network, image and firewall rule a test makes is removed, even when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import socket
import subprocess
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors
import pytest

from gateway.containers import firewall
from gateway.containers.backend import LABEL_HUB, LABEL_MANAGED
from gateway.containers.docker import DockerBackend
from gateway.errors import AgentUnavailable
from gateway.http.agent_app import Listeners, start_listeners
from gateway.http.app import HUB, create_app
from gateway.hub import Hub
from tests.conftest import auth, make_settings
from tests.integration.conftest import RUN_ID, TAG, cleanup_hub, registry_file

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

# Run in a short-lived container: try each (host, port), then, where a path is given, an
# HTTP GET on the connection; print one JSON outcome per target.
CONNECT = textwrap.dedent(
    """
    import json, socket, sys, time
    out = []
    for host, port, path in json.loads(sys.argv[1]):
        start = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                got = {"ok": True}
                if path:
                    s.sendall(f"GET {path} HTTP/1.0\\r\\nHost: hub\\r\\n\\r\\n".encode())
                    got["status"] = int(s.makefile("rb").readline().split()[1])
        except OSError as e:
            got = {"ok": False, "code": type(e).__name__}
        got["after_s"] = round(time.monotonic() - start, 2)
        out.append(got)
    print(json.dumps(out))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iptables_rules(chain: str) -> list[str]:
    done = subprocess.run(["iptables", "-w", "10", "-S", chain], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def unique_networks() -> list[str]:
    return [
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-int",
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-egr",
    ]


@dataclass
class Served:
    """A hub served as ``agent-gateway serve`` serves it, on its own networks."""

    hub: Hub
    listeners: Listeners
    port: int
    session: aiohttp.ClientSession
    keys: dict[str, str]
    api: docker.APIClient

    @property
    def gateway(self) -> str:
        return self.hub.facts["internal_gateway"]

    @property
    def bridges(self) -> list[str]:
        return self.hub.facts["bridges"].split(",")

    def networks(self) -> tuple[str, str]:
        s = self.hub.settings
        return s.network, s.egress_network

    async def run(self, image: str, network: str, script: str, *args: str) -> str:
        """Run ``python3 -c script args`` in a short-lived container; its stdout."""
        return await asyncio.to_thread(self._run, image, network, script, list(args))

    def _run(self, image: str, network: str, script: str, args: list[str]) -> str:
        created = self.api.create_container(
            image,
            command=["python3", "-c", script, *args],
            # Labelled as this hub's, so cleanup_hub removes it even if we do not get to.
            labels={LABEL_MANAGED: "true", LABEL_HUB: self.hub.settings.hub_id},
            host_config=self.api.create_host_config(network_mode=network),
        )
        try:
            self.api.start(created["Id"])
            status = self.api.wait(created["Id"], timeout=60)
            out = self.api.logs(created["Id"], stdout=True, stderr=False).decode()
            err = self.api.logs(created["Id"], stdout=False, stderr=True).decode()
            assert status["StatusCode"] == 0, err
            return out
        finally:
            self.api.remove_container(created["Id"], force=True)

    async def connect_from(
        self, image: str, network: str, targets: list[tuple[str, int, str | None]]
    ) -> list[dict[str, Any]]:
        out = await self.run(image, network, CONNECT, json.dumps(targets))
        return json.loads(out)  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path, keys: dict[str, str], images: dict[str, str], api: docker.APIClient
) -> AsyncIterator[Served]:
    networks = unique_networks()
    port = free_port()
    settings = make_settings(
        tmp_path,
        agents_file=registry_file(tmp_path, images),
        network=networks[0],
        egress_network=networks[1],
        hub_id=f"test-{RUN_ID}-{secrets.token_hex(3)}",
        port=port,
    )
    app = create_app(settings)
    listeners = None
    try:
        listeners = await start_listeners(app, host="127.0.0.1", port=port)
        hub = app[HUB]
        assert "internal_gateway" in hub.facts, await hub.status()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield Served(hub, listeners, port, session, keys, api)
    finally:
        if listeners is not None:
            await listeners.close()
        cleanup_hub(api, settings.hub_id, networks)


@pytest.fixture
async def served(
    tmp_path: Path, keys: dict[str, str], agent_images: dict[str, str], docker_api: Any
) -> AsyncIterator[Served]:
    async with serve(tmp_path, keys, agent_images, docker_api) as s:
        yield s


@pytest.fixture
async def host_service() -> AsyncIterator[int]:
    """A TCP server on every host address (0.0.0.0), on a random port; its port."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "0.0.0.0", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_host_services_are_unreachable_from_agent_networks_but_the_hub_is(
    served: Served, host_service: int, agent_images: dict[str, str]
) -> None:
    image, gateway, port = agent_images["probe"], served.gateway, served.port
    # The host itself reaches the service at the bridge address: only the firewall is left
    # between it and a container.
    with socket.create_connection((gateway, host_service), timeout=3):
        pass
    targets: list[tuple[str, int, str | None]] = [
        (gateway, host_service, None),
        (gateway, port, "/healthz"),
        (gateway, port, "/v1/status"),
        (gateway, port, "/v1/agents"),
    ]
    for network in served.networks():
        service, health, status, agents = await served.connect_from(image, network, targets)
        # Dropped, not refused: the SYN never gets an answer, so the attempt times out.
        assert service["ok"] is False and service["code"] == "TimeoutError", (network, service)
        assert service["after_s"] >= 2.9, service
        assert health == {"ok": True, "status": 200, "after_s": health["after_s"]}, network
        assert (status["status"], agents["status"]) == (404, 404), network

    # Without the hub's rules for these bridges the same service answers: the test can fail.
    firewall.remove(served.bridges, ipt=firewall.Iptables())
    (service,) = await served.connect_from(image, served.networks()[0], targets[:1])
    assert service["ok"] is True, service


async def test_firewall_rules_are_installed_once_and_in_order(served: Served) -> None:
    bridges, gateway, port = served.bridges, served.gateway, served.port
    assert len(bridges) == 2
    await served.hub.backend.prepare()  # a second start of the same hub
    other = free_port()
    # Another hub on the same networks, on another port: both ports stay open.
    firewall.install(bridges, gateway, other, ipt=firewall.Iptables())

    rules = iptables_rules(firewall.CHAIN)[1:]  # after "-N AGENT-GATEWAY-INPUT"
    assert "--ctstate RELATED,ESTABLISHED" in rules[0], rules
    assert rules[-1] == f"-A {firewall.CHAIN} -m comment --comment agent-gateway -j DROP"
    assert sum("-j DROP" in r for r in rules) == 1
    for bridge in bridges:
        for p in (port, other):
            mine = [r for r in rules if f"-i {bridge} " in r and f"--dport {p} " in r]
            assert mine == [
                f"-A {firewall.CHAIN} -d {gateway}/32 -i {bridge} -p tcp -m tcp --dport {p} "
                "-m comment --comment agent-gateway -j ACCEPT"
            ], rules
        jumps = [r for r in iptables_rules("INPUT") if f"-i {bridge} " in r]
        assert jumps == [
            f"-A INPUT -i {bridge} -m comment --comment agent-gateway -j {firewall.CHAIN}"
        ]


@pytest.fixture
def bad_network(docker_api: docker.APIClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A pre-created network with the flags of ``request.param``; removed afterwards."""
    name = f"agw-{RUN_ID}-{secrets.token_hex(2)}-bad"
    docker_api.create_network(name, driver="bridge", **request.param)
    try:
        yield name
    finally:
        cleanup_hub(docker_api, "none", [name])


ICC = "com.docker.network.bridge.enable_icc"


@pytest.mark.parametrize(
    ("bad_network", "flag"),
    [
        ({"internal": False, "options": {ICC: "false"}}, "is not internal (Internal=false)"),
        ({"internal": True}, f"{ICC}=unset, i.e. true"),
        ({"internal": True, "options": {ICC: "true"}}, f"{ICC}=true"),
    ],
    indirect=["bad_network"],
    ids=["not-internal", "icc-unset", "icc-true"],
)
async def test_an_existing_network_with_wrong_flags_is_refused(
    bad_network: str,
    flag: str,
    tmp_path: Path,
    keys: dict[str, str],
    docker_api: docker.APIClient,
    aiohttp_client: Any,
) -> None:
    before = docker_api.inspect_network(bad_network)
    egress = f"agw-{RUN_ID}-{secrets.token_hex(2)}-egr"
    backend = DockerBackend(internal_network=bad_network, egress_network=egress, agent_port=1)
    try:
        with pytest.raises(AgentUnavailable, match=f"network '{bad_network}'") as e:
            await backend.prepare()
        assert flag in e.value.message

        # The hub starts degraded with that reason and dispatches nothing.
        settings = make_settings(tmp_path, network=bad_network, egress_network=egress)
        client = await aiohttp_client(create_app(settings))
        ready = await client.get("/readyz")
        body = await ready.json()
        assert ready.status == 503 and bad_network in body["reason"] and flag in body["reason"]
        resp = await client.post(
            "/v1/tasks", json={"capability": "debug.echo", "input": {}}, headers=auth(keys["user"])
        )
        assert resp.status == 503, await resp.json()
        await client.close()
    finally:
        await backend.close()
        cleanup_hub(docker_api, "none", [egress])
    after = docker_api.inspect_network(bad_network)
    assert (after["Internal"], after["Options"]) == (before["Internal"], before["Options"])
    bridge = firewall.bridge_interface(after)
    assert not [r for r in iptables_rules("INPUT") if f"-i {bridge} " in r]


@pytest.fixture
def root_calc(docker_api: docker.APIClient, agent_images: dict[str, str]) -> Iterator[str]:
    """The calc image with ``USER root``, built for this test and removed after it."""
    ref = f"agent-gateway/calc-root:{TAG}"
    client = docker.from_env(version="auto")
    try:
        dockerfile = f"FROM {agent_images['calc']}\nUSER root\n"
        client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=ref, rm=True, pull=False)
        yield ref
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_image(ref, force=True)
        client.close()


async def test_a_root_image_runs_as_65534_with_a_read_only_root(
    tmp_path: Path,
    keys: dict[str, str],
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
    root_calc: str,
) -> None:
    assert docker_api.inspect_image(root_calc)["Config"]["User"] == "root"
    async with serve(tmp_path, keys, {**agent_images, "calc": root_calc}, docker_api) as s:
        resp = await s.session.post(
            "/v1/tasks?wait=30",
            json={"capability": "code.eval", "input": {"expression": "6*7"}},
            headers=auth(keys["developer"]),
        )
        body = await resp.json()
    assert body["state"] == "succeeded", body
    inside = body["result"]["sandbox"]
    assert (inside["uid"], inside["gid"]) == (65534, 65534)
    assert inside["root_write"]["error"] == "EROFS" and inside["root_read_only"] is True


async def test_the_read_only_check_would_see_a_writable_root(
    docker_api: docker.APIClient, agent_images: dict[str, str]
) -> None:
    """calc's check, run as the hub's uid without a read-only root, writes: so its EROFS in
    the hub's containers is the read-only root's doing, not the permissions'."""
    script = "import json, agent; print(json.dumps(agent.root_write()))"
    outcomes = {}
    for read_only in (False, True):
        created = docker_api.create_container(
            agent_images["calc"],
            command=["python3", "-c", script],
            user="65534:65534",
            # Labelled like a test hub's, so the session's leftover check removes it too.
            labels={LABEL_MANAGED: "true", LABEL_HUB: f"test-{RUN_ID}-read-only-check"},
            host_config=docker_api.create_host_config(network_mode="none", read_only=read_only),
        )
        try:
            docker_api.start(created["Id"])
            assert docker_api.wait(created["Id"], timeout=60)["StatusCode"] == 0
            out = docker_api.logs(created["Id"], stdout=True, stderr=False).decode()
            outcomes[read_only] = json.loads(out)
        finally:
            docker_api.remove_container(created["Id"], force=True)
    assert outcomes[False] == {
        "path": "/app/scratch/probe-write",
        "dir_owner": 65534,
        "error": None,
    }
    assert outcomes[True]["error"] == "EROFS"
