"""The Swarm backend on a real one-node swarm: guardrails, overlay, refusals, an echo task.

The session makes the engine a one-node swarm if it is not one (``docker swarm init
--advertise-addr 127.0.0.1``) and leaves it at the end only if it made it and no service
of anyone else's runs on it. The test process runs on the host, which an internal overlay
does not reach, so the hub's side of each exchange runs in a container attached to the
overlay, as the hub does in a Swarm deployment (``gateway.containers.swarm``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import docker
import docker.errors
import pytest

from gateway.bundle.registry import AgentSpec
from gateway.containers.backend import LABEL_HUB, ContainerSpec
from gateway.containers.guardrails import build_spec
from gateway.containers.swarm import SERVICE_LABEL, SwarmBackend
from gateway.errors import GuardrailUnenforceable
from tests.integration.conftest import RUN_ID

ACCEPT = ["no-new-privileges", "icc", "memory-swap"]
SANDBOX = {
    "network": "internal",
    "memory_bytes": 96 * 2**20,
    "cpus": 0.5,
    "pids": 48,
    "read_only_root": True,
    "mounts": [],
    "swarm_acceptable": ACCEPT,
}
# The hub's address on the overlay, as GATEWAY_URL: no hub runs in these tests.
HUB_STAND_IN = "10.254.0.2"


@pytest.fixture(scope="session")
def swarm(docker_api: docker.APIClient) -> Iterator[None]:
    """The engine as a Swarm manager for the session; left as found."""
    state = (docker_api.info().get("Swarm") or {}).get("LocalNodeState")
    made = False
    if state == "inactive":
        docker_api.init_swarm(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
        made = True
    elif state != "active" or not docker_api.info()["Swarm"].get("ControlAvailable"):
        pytest.fail(f"the engine is a swarm {state!r} node, not a manager", pytrace=False)
    try:
        yield
    finally:
        # Someone else's service on a swarm we made: leaving would kill it, so stay.
        if made and not docker_api.services():
            docker_api.leave_swarm(force=True)


@pytest.fixture
async def backend(
    swarm: None, docker_api: docker.APIClient
) -> AsyncIterator[tuple[SwarmBackend, str]]:
    """A Swarm backend on fresh overlays and a hub id; its services and networks go after."""
    suffix = f"{RUN_ID}-{secrets.token_hex(2)}"
    networks = [f"agw-swarm-{suffix}-int", f"agw-swarm-{suffix}-egr"]
    hub_id = f"test-{RUN_ID}-swarm-{secrets.token_hex(2)}"
    b = SwarmBackend(
        internal_network=networks[0],
        egress_network=networks[1],
        agent_port=8080,
        agent_address=HUB_STAND_IN,
    )
    try:
        await b.ping()
        await b.prepare()
        yield b, hub_id
    finally:
        for service in await b.list_managed(hub_id):
            await b.remove(service["id"])
        await b.close()
        for name in networks:
            for net in docker_api.networks(names=[name]):
                if net["Name"] == name:
                    _remove_network(docker_api, net["Id"])
        # A removed overlay lingers on the node until the manager's removal reaches it.
        for _ in range(75):
            left = [n["Name"] for n in docker_api.networks() if n["Name"] in networks]
            if not left:
                break
            await asyncio.sleep(0.2)
        assert not left, f"networks left behind: {left}"


def _remove_network(api: docker.APIClient, nid: str) -> None:
    # An overlay is in use for a moment after its last task's container went.
    for _ in range(50):
        try:
            api.remove_network(nid)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            time.sleep(0.2)
    api.remove_network(nid)


def echo_spec(images: dict[str, str], hub_id: str, network: str, **sandbox: Any) -> ContainerSpec:
    agent = AgentSpec(
        name="echo",
        image=images["echo"],
        capabilities=("debug.echo",),
        input_schema="a.json",
        output_schema="b.json",
        port=8000,
    )
    return build_spec(
        agent=agent,
        sandbox={**SANDBOX, **sandbox},
        task_id=secrets.token_hex(18),
        hub_id=hub_id,
        networks={"internal": network, "egress": network + "-x"},
        timeout_s=60,
        ttl_grace_s=10,
        gateway_url=f"http://{HUB_STAND_IN}:8080",
    )


def _get(url: str) -> None:
    urllib.request.urlopen(url, timeout=2).close()


def on_overlay(network: str, image: str, script: str) -> str:
    """Run ``python3 -c script`` in a throwaway container attached to ``network``."""
    client = docker.from_env(version="auto")
    try:
        out = client.containers.run(
            image,
            ["python3", "-c", script],
            network=network,
            remove=True,
            user="65534:65534",
            read_only=True,
            cap_drop=["ALL"],
            labels={"io.agent-gateway.test": RUN_ID},
        )
    finally:
        client.close()
    return out.decode().strip()


async def test_a_service_gets_every_guardrail_a_service_can_carry(
    backend: tuple[SwarmBackend, str], agent_images: dict[str, str]
) -> None:
    b, hub_id = backend
    spec = echo_spec(agent_images, hub_id, b.internal_network)
    handle = await b.start(spec)
    assert await b.is_running(handle.id)
    found = await b.inspect(handle.id)
    template = found["service"]["Spec"]["TaskTemplate"]
    c = template["ContainerSpec"]
    assert c["CapabilityDrop"] == ["ALL"] and c["ReadOnly"] is True
    assert c["User"] == "65534:65534"
    assert template["Resources"]["Limits"] == {
        "NanoCPUs": 500_000_000,
        "MemoryBytes": 96 * 2**20,
        "Pids": 48,
    }
    assert template["RestartPolicy"]["Condition"] == "none"
    assert found["service"]["Spec"]["Mode"] == {"Replicated": {"Replicas": 1}}
    assert found["service"]["Spec"]["Labels"][LABEL_HUB] == hub_id

    # What the engine made of it: the task's container.
    container = found["container"]
    host = container["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (96 * 2**20, 5 * 10**8, 48)
    # The documented memory-swap equivalent: twice the memory, not equal to it.
    assert host["MemorySwap"] == 2 * 96 * 2**20
    assert not host.get("SecurityOpt")  # the no-new-privileges gap the sandbox accepted
    config = container["Config"]
    assert config["User"] == "65534:65534"
    assert config["Entrypoint"] == ["timeout", "-s", "TERM", "-k", "5", "70s"]
    assert config["Labels"]["io.agent-gateway.task"] == spec.labels["io.agent-gateway.task"]
    assert config["Labels"]["io.agent-gateway.expires"] == spec.labels["io.agent-gateway.expires"]

    api = docker.from_env(version="auto").api
    try:
        run = api.exec_create(
            container["Id"], ["sh", "-c", "grep ' /tmp ' /proc/mounts; cat /proc/1/status"]
        )
        out = api.exec_start(run).decode()
    finally:
        api.close()
    assert "nosuid,nodev,noexec" in out.splitlines()[0]
    status = dict(line.split(":\t", 1) for line in out.splitlines()[1:] if ":\t" in line)
    assert status["CapBnd"] == status["CapEff"] == "0000000000000000"
    assert status["NoNewPrivs"] == "0"  # the gap is real: hence the sandbox's acceptance


async def test_the_overlay_is_internal_encrypted_and_the_only_way_in(
    backend: tuple[SwarmBackend, str], agent_images: dict[str, str], docker_api: docker.APIClient
) -> None:
    b, hub_id = backend
    info = docker_api.inspect_network(b.internal_network)
    assert (info["Driver"], info["Scope"], info["Internal"], info["Attachable"]) == (
        "overlay",
        "swarm",
        True,
        True,
    )
    assert "encrypted" in info["Options"]
    handle = await b.start(echo_spec(agent_images, hub_id, b.internal_network))
    # The host (this process) gets no answer from the agent (here the host's default route
    # may lead to a proxy that accepts any connection, so the test asks for the agent's 200) ...
    with pytest.raises(OSError):
        await asyncio.to_thread(_get, handle.base_url + "/health")
    # ... and a container on the overlay has no way out.
    script = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 53), timeout=2); print('reached')\n"
        "except OSError as e:\n"
        "    print('blocked', e.errno)\n"
    )
    assert on_overlay(b.internal_network, agent_images["echo"], script).startswith("blocked")


async def test_a_sandbox_that_demands_no_new_privileges_is_refused(
    backend: tuple[SwarmBackend, str], agent_images: dict[str, str], docker_api: docker.APIClient
) -> None:
    b, hub_id = backend
    spec = echo_spec(agent_images, hub_id, b.internal_network, swarm_acceptable=[])
    with pytest.raises(GuardrailUnenforceable) as e:
        await b.start(spec)
    assert e.value.details["guardrail"] == "no-new-privileges"
    assert e.value.to_json()["error"]["code"] == "guardrail_unenforceable"
    assert not docker_api.services(filters={"name": spec.name})
    assert await b.list_managed(hub_id) == []


async def test_an_echo_task_round_trips_and_removal_leaves_nothing(
    backend: tuple[SwarmBackend, str], agent_images: dict[str, str], docker_api: docker.APIClient
) -> None:
    b, hub_id = backend
    handle = await b.start(echo_spec(agent_images, hub_id, b.internal_network))
    assert [s["id"] for s in await b.list_managed(hub_id)] == [handle.id]
    assert (await b.attach(handle.id, 8000)).address == handle.address
    word = secrets.token_hex(4)
    script = (
        "import json, time, urllib.request\n"
        f"url = {handle.base_url!r}\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        urllib.request.urlopen(url + '/health', timeout=1); break\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        f"body = json.dumps({{'input': {{'word': {word!r}}}}}).encode()\n"
        "req = urllib.request.Request(url + '/task', data=body,\n"
        "    headers={'Content-Type': 'application/json'})\n"
        "print(urllib.request.urlopen(req, timeout=10).read().decode())\n"
    )
    answer = json.loads(on_overlay(b.internal_network, agent_images["echo"], script))
    assert answer == {"output": {"echo": {"word": word}, "agent": "echo"}}

    await b.remove(handle.id)
    assert not await b.is_running(handle.id)
    assert await b.list_managed(hub_id) == []
    assert not docker_api.containers(all=True, filters={"label": f"{SERVICE_LABEL}={handle.id}"})
    await b.remove(handle.id)  # a missing service is not an error


@pytest.fixture(autouse=True)
def _no_helper_left(docker_api: docker.APIClient) -> Iterator[None]:
    yield
    label = f"io.agent-gateway.test={RUN_ID}"
    for c in docker_api.containers(all=True, filters={"label": label}):
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_container(c["Id"], force=True)
