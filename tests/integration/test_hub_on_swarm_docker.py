"""Two hubs from the gateway's image on one PostgreSQL, on a one-node swarm
(``--backend swarm``): echo tasks end to end, each agent a Swarm service, hubs and agents
talking over the overlay only. The layout of deploy/compose.yaml, as plain containers.

The hubs run as containers (their image built as tests/integration/test_gateway_image_docker.py
builds it) with the engine's socket, attached to the agents' internal overlay and to a
store overlay where PostgreSQL is. The agents' overlay is made by the test before the hubs
start, since a hub finds its own address on it (``gateway.containers.swarm.own_address``).
No postgres image can be pulled here, so PostgreSQL is Debian's package in an image built
from the local base image (cached like the gateway's). An internal network publishes no
port, so each hub is also on the default bridge, for its API port only, which the test (on
the host) calls. What each agent's service did is read afterwards from the engine's event
stream: its container started on the agents' overlay and on no other network; and the
services, their containers, the networks and the images are gone at the end.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from gateway.containers.backend import LABEL_HUB
from gateway.containers.swarm import SERVICE_LABEL
from gateway.settings import DEFAULT_BASE_IMAGE
from tests.integration.conftest import RUN_ID, build_image, registry_file
from tests.integration.test_gateway_image_docker import (  # noqa: F401 (fixture)
    exec_in,
    free_port,
    gateway_image,
    http,
    wait_ready,
)
from tests.integration.test_swarm_docker import _remove_network, swarm  # noqa: F401 (fixture)

pytestmark = pytest.mark.docker

HUB_PORT = 8080
SOCK = "/var/run/docker.sock"
TEST_LABEL = {"io.agent-gateway.test": RUN_ID}
PG_IMAGE = f"agent-gateway/test-postgres:test-{RUN_ID}"
PG_DOCKERFILE = b"""\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; \\
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \\
    rm -rf /var/lib/apt/lists/*
USER postgres
"""
# A throwaway cluster on the store overlay, which only the hubs join: trust, as the store
# tests' own cluster (gateway.store.pg_server) trusts its socket.
PG_COMMAND = (
    "set -e; bin=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1); "
    "$bin/initdb -D /tmp/pg -U gateway --auth=trust >/dev/null; "
    "echo 'host all all 0.0.0.0/0 trust' >> /tmp/pg/pg_hba.conf; "
    "exec $bin/postgres -D /tmp/pg -k /tmp -c listen_addresses='*'"
)


@pytest.fixture(scope="module", autouse=True)
def images_removed(docker_api: docker.APIClient) -> Iterator[None]:
    """Set up before the image fixtures, so torn down after them: their tags must be gone."""
    yield
    for ref in (f"agent-gateway:test-{RUN_ID}", PG_IMAGE):
        with pytest.raises(docker.errors.ImageNotFound):
            docker_api.inspect_image(ref)


@pytest.fixture(scope="module")
def postgres_image(docker_api: docker.APIClient) -> Iterator[str]:
    """Debian's PostgreSQL on the local base image; removed after (parents kept, the cache)."""
    base = os.environ.get("AGENT_GATEWAY_BASE_IMAGE", DEFAULT_BASE_IMAGE)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(PG_DOCKERFILE)
        tar.addfile(info, io.BytesIO(PG_DOCKERFILE))
    buf.seek(0)
    try:
        build_image(buf, PG_IMAGE, base, timeout_s=600)
        yield PG_IMAGE
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_image(PG_IMAGE, force=True, noprune=True)


def events(api: docker.APIClient, since: float, until: float, **filters: Any) -> list[Any]:
    """The engine's events between two times (epoch seconds), decoded."""
    return list(api.events(since=since, until=until, filters=filters, decode=True))


def overlay(api: docker.APIClient, name: str) -> str:
    """An internal, attachable, encrypted overlay (the flags the Swarm backend checks)."""
    return str(
        api.create_network(
            name,
            driver="overlay",
            internal=True,
            attachable=True,
            options={"encrypted": ""},
            labels=TEST_LABEL,
        )["Id"]
    )


def remove_networks(api: docker.APIClient, names: list[str]) -> list[str]:
    """Remove the networks named ``names``; those still listed after (a removed overlay
    lingers on the node for a moment)."""
    for name in names:
        for net in api.networks(names=[name]):
            if net["Name"] == name:
                _remove_network(api, net["Id"])
    for _ in range(75):
        left = [n["Name"] for n in api.networks() if n["Name"] in names]
        if not left:
            break
        time.sleep(0.2)
    return left


def run_postgres(api: docker.APIClient, image: str, name: str, network: str) -> str:
    """Start PostgreSQL on ``network`` and wait until it accepts connections."""
    c = api.create_container(
        image,
        ["sh", "-c", PG_COMMAND],
        name=name,
        labels=TEST_LABEL,
        host_config=api.create_host_config(network_mode=network),
    )["Id"]
    api.start(c)
    deadline = time.monotonic() + 30
    while True:
        run = api.exec_create(
            c,
            [
                "sh",
                "-c",
                "$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)"
                "/pg_isready -q -h 127.0.0.1 -d postgres",
            ],
        )
        api.exec_start(run["Id"])
        if api.exec_inspect(run["Id"])["ExitCode"] == 0:
            return c
        if time.monotonic() > deadline or not api.inspect_container(c)["State"]["Running"]:
            logs = api.logs(c, tail=30).decode(errors="replace")
            pytest.fail(f"PostgreSQL did not start; its log:\n{logs}", pytrace=False)
        time.sleep(0.3)


def run_hub(
    api: docker.APIClient,
    image: str,
    *,
    hub_id: str,
    port: int,
    networks: list[str],
    store: str,
    config: Path,
) -> str:
    """Start a hub container with ``--backend swarm`` on the agents' overlay and the store
    overlay, its API published on the host's ``port``."""
    c = api.create_container(
        image,
        name=f"agw-hub-{hub_id}",
        command=[
            "serve",
            "--backend=swarm",
            "--host=0.0.0.0",
            f"--port={HUB_PORT}",
            f"--hub-id={hub_id}",
            f"--store={store}",
            f"--network={networks[0]}",
            f"--egress-network={networks[1]}",
            "--keys=/config/keys/keys.json",
            "--agents=/config/agents.yaml",
            "--schemas=/app/schemas",
            "--policies=/app/policies",
            "--limits=/app/limits.yaml",
        ],
        ports=[HUB_PORT],
        labels=TEST_LABEL,
        host_config=api.create_host_config(
            # The default bridge carries the published API port (an internal overlay
            # publishes none); the agents see the hub on the overlay only.
            port_bindings={HUB_PORT: ("127.0.0.1", port)},
            group_add=[str(os.stat(SOCK).st_gid)],
            cap_drop=["ALL"],
            binds={
                SOCK: {"bind": SOCK, "mode": "rw"},
                str(config / "agents.yaml"): {"bind": "/config/agents.yaml", "mode": "ro"},
                # The API keys both hubs accept (a Swarm secret in deploy/compose.yaml).
                str(config / "keys"): {"bind": "/config/keys", "mode": "rw"},
            },
        ),
    )["Id"]
    api.connect_container_to_network(c, networks[0])
    api.connect_container_to_network(c, networks[2])
    api.start(c)
    return c


def echo(url: str, key: str, word: str) -> dict[str, Any]:
    """Submit an echo task with ?wait; its finished record."""
    # The keys file is re-read by mtime at most once a second.
    deadline = time.monotonic() + 10
    while True:
        status, body = http(
            "POST",
            f"{url}/v1/tasks?wait=45",
            {"capability": "debug.echo", "input": {"w": word}},
            key,
        )
        if status != 401 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200, body
    assert body["state"] == "succeeded", body
    assert body["result"] == {"echo": {"w": word}, "agent": "echo"}
    return dict(body)


def check_service(
    api: docker.APIClient,
    since: float,
    until: float,
    task: dict[str, Any],
    hub_id: str,
    overlay_id: str,
) -> None:
    """The task's agent was a service of ``hub_id``, its container on the overlay only."""
    service_id = (task.get("container") or {}).get("id")
    assert service_id, f"the task records no agent: {task}"
    made = events(api, since, until, type="service", service=service_id)
    assert {e["Action"] for e in made} >= {"create", "remove"}, made
    started = [
        e
        for e in events(api, since, until, type="container", event="start")
        if e["Actor"]["Attributes"].get(SERVICE_LABEL) == service_id
    ]
    assert len(started) == 1, started
    agent = started[0]["Actor"]
    assert agent["Attributes"][LABEL_HUB] == hub_id
    assert agent["Attributes"]["io.agent-gateway.task"] == task["task_id"]
    # No bridge, no ingress, no docker_gwbridge: the overlay is the only way between it
    # and its hub.
    joined = {
        e["Actor"]["ID"]
        for e in events(api, since, until, type="network", event="connect")
        if e["Actor"]["Attributes"].get("container") == agent["ID"]
    }
    assert joined == {overlay_id}, joined


def test_two_hub_containers_on_postgresql_run_echo_tasks_as_swarm_services(
    swarm: None,  # noqa: F811 (fixture)
    gateway_image: str,  # noqa: F811 (fixture)
    postgres_image: str,
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
    tmp_path: Path,
) -> None:
    suffix = f"{RUN_ID}-{secrets.token_hex(2)}"
    hub_ids = [f"test-{RUN_ID}-swarmhub{i}-{secrets.token_hex(2)}" for i in (1, 2)]
    networks = [f"agw-swarm-{suffix}-int", f"agw-swarm-{suffix}-egr", f"agw-swarm-{suffix}-pg"]
    urls = [f"http://127.0.0.1:{free_port()}" for _ in hub_ids]
    registry_file(tmp_path, agent_images).chmod(0o644)
    # Written by the CLI in a hub's container (its user, uid 10001), read by both hubs.
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys").chmod(0o777)
    containers: list[str] = []
    try:
        overlay_id = overlay(docker_api, networks[0])
        overlay(docker_api, networks[2])
        pg_name = f"agw-pg-{suffix}"
        containers.append(run_postgres(docker_api, postgres_image, pg_name, networks[2]))
        store = f"postgresql://gateway@{pg_name}:5432/postgres"
        for hub_id, url in zip(hub_ids, urls, strict=True):
            port = int(url.rsplit(":", 1)[1])
            containers.append(
                run_hub(
                    docker_api,
                    gateway_image,
                    hub_id=hub_id,
                    port=port,
                    networks=networks,
                    store=store,
                    config=tmp_path,
                )
            )
        for c, url in zip(containers[1:], urls, strict=True):
            wait_ready(docker_api, c, url)
        key = exec_in(
            docker_api,
            containers[1],
            [
                "agent-gateway",
                "keys",
                "create",
                "--keys=/config/keys/keys.json",
                "--subject=alice",
                "--roles=user,operator",
            ],
        ).strip()
        assert key, "keys create printed no key"

        since = time.time() - 1
        tasks = [echo(url, key, secrets.token_hex(4)) for url in urls]
        # One state: each hub answers for the other's task.
        for task, url in zip(tasks, reversed(urls), strict=True):
            status, fetched = http("GET", f"{url}/v1/tasks/{task['task_id']}", key=key)
            assert status == 200 and fetched["result"] == task["result"], fetched

        # Both hubs see both alive in the store they share.
        for url in urls:
            status, info = http("GET", f"{url}/v1/status", key=key)
            assert status == 200, info
            alive = {h["id"] for h in (info["cluster"] or {}).get("hubs", []) if h["alive"]}
            assert alive == set(hub_ids), info["cluster"]

        # The agents were services of the hub that ran their task, removed once it ended.
        deadline = time.monotonic() + 20
        while any(
            docker_api.services(filters={"label": f"{LABEL_HUB}={h}"})
            or docker_api.containers(all=True, filters={"label": f"{LABEL_HUB}={h}"})
            for h in hub_ids
        ):
            assert time.monotonic() < deadline, "an agent's service or container is left"
            time.sleep(0.2)
        until = time.time() + 1
        for task, hub_id in zip(tasks, hub_ids, strict=True):
            check_service(docker_api, since, until, task, hub_id, overlay_id)
    finally:
        for c in reversed(containers):
            with contextlib.suppress(docker.errors.APIError):
                docker_api.remove_container(c, force=True, v=True)
        # Whatever the hubs left (nothing, when they work) goes too, then the overlays.
        for h in hub_ids:
            for s in docker_api.services(filters={"label": f"{LABEL_HUB}={h}"}):
                with contextlib.suppress(docker.errors.APIError):
                    docker_api.remove_service(s["ID"])
            for c in docker_api.containers(all=True, filters={"label": f"{LABEL_HUB}={h}"}):
                with contextlib.suppress(docker.errors.APIError):
                    docker_api.remove_container(c["Id"], force=True)
        left = remove_networks(docker_api, networks)
    assert not left, f"networks left behind: {left}"
