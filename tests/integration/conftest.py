"""Fixtures for tests against a real Docker engine, real images and the real policies.

Each session builds the example agents under a unique tag and removes them at the end; each
hub gets its own networks and hub id, and everything labelled with that id is removed after
the test even when it fails. With ``CI=true`` a missing engine fails the tests instead of
skipping them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from gateway.containers import firewall
from gateway.containers.backend import LABEL_HUB, LABEL_MANAGED
from gateway.containers.images import build_examples, example_agents
from gateway.settings import DEFAULT_BASE_IMAGE
from tests.conftest import REPO, make_settings

RUN_ID = secrets.token_hex(3)
TAG = f"test-{RUN_ID}"


def _engine_or_skip() -> docker.APIClient:
    try:
        client = docker.from_env(version="auto", timeout=30).api
        client.ping()
        return client
    except Exception as e:
        message = f"no Docker engine reachable: {e}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: Docker tests must run, not skip)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def docker_api() -> Iterator[docker.APIClient]:
    """A low-level client to the real engine (fails under CI when there is none)."""
    client = _engine_or_skip()
    yield client
    client.close()


@pytest.fixture(scope="session")
def agent_images(docker_api: docker.APIClient) -> Iterator[dict[str, str]]:
    """Build every example agent as ``agent-gateway/<name>:test-<run>``; remove them after."""
    base = os.environ.get("AGENT_GATEWAY_BASE_IMAGE", DEFAULT_BASE_IMAGE)
    try:
        docker_api.inspect_image(base)
    except docker.errors.ImageNotFound:
        pytest.fail(f"base image {base} is missing: run scripts/build-base-image.sh", pytrace=False)
    built = build_examples(base_image=base, tag=TAG)
    try:
        yield {name: f"agent-gateway/{name}:{TAG}" for name in built}
    finally:
        for name in example_agents():
            with contextlib.suppress(docker.errors.APIError):
                docker_api.remove_image(f"agent-gateway/{name}:{TAG}", force=True)


def build_image(context: Any, tag: str, base: str, *, timeout_s: int) -> None:
    """Build ``tag`` from a tar ``context`` on the local base image, never pulling; the test
    fails with the build log's tail when the engine reports an error."""
    client = docker.from_env(version="auto", timeout=timeout_s).api
    log: list[str] = []
    try:
        for chunk in client.build(
            fileobj=context,
            custom_context=True,
            buildargs={"BASE_IMAGE": base},
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
        ):
            log.append(str(chunk.get("stream") or chunk.get("error") or ""))
            if "error" in chunk:
                pytest.fail(f"building {tag} failed:\n{''.join(log)[-3000:]}", pytrace=False)
    finally:
        client.close()


def cleanup_hub(api: docker.APIClient, hub_id: str, networks: list[str]) -> list[str]:
    """Remove every container labelled with ``hub_id``, the networks and their firewall
    rules; return the containers that were left."""
    leftovers = []
    for c in api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub_id}"]}):
        leftovers.append(c["Names"][0])
        try:
            api.remove_container(c["Id"], force=True)
        except docker.errors.APIError as e:
            if e.status_code not in (404, 409):  # gone, or removal already in progress
                raise
    for name in networks:
        for net in api.networks(names=[name]):
            if net["Name"] == name:
                # The hub's host firewall rules for this bridge go with the network.
                firewall.remove([firewall.bridge_interface(net)], ipt=firewall.Iptables())
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_network(net["Id"])
    return leftovers


def registry_file(tmp_path: Path, images: dict[str, str]) -> Path:
    """agents.yaml with the images swapped for this run's tags."""
    text = (REPO / "agents.yaml").read_text()
    for name, ref in images.items():
        text = text.replace(f"agent-gateway/{name}:dev", ref)
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    return path


@pytest.fixture
async def docker_hub(
    tmp_path: Path,
    keys: dict[str, str],
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
    aiohttp_client: Any,
) -> AsyncIterator[Any]:
    """A hub on the real engine, as an aiohttp test client; cleans up after itself."""
    from gateway.http.app import create_app

    networks = [
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-int",
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-egr",
    ]
    settings = make_settings(
        tmp_path,
        agents_file=registry_file(tmp_path, agent_images),
        network=networks[0],
        egress_network=networks[1],
        hub_id=f"test-{RUN_ID}-{secrets.token_hex(3)}",
    )
    app = create_app(settings)
    try:
        client = await aiohttp_client(app)
        yield client
        await client.close()
    finally:
        cleanup_hub(docker_api, settings.hub_id, networks)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_containers(docker_api_lazy: Any) -> Iterator[None]:
    """After the whole session, no container made by a test hub may remain."""
    yield
    api = docker_api_lazy()
    if api is None:
        return
    left = api.containers(all=True, filters={"label": [f"{LABEL_MANAGED}=true"]})
    ours = [c for c in left if c.get("Labels", {}).get(LABEL_HUB, "").startswith(f"test-{RUN_ID}")]
    for c in ours:
        api.remove_container(c["Id"], force=True)
    assert not ours, f"containers left behind: {[c['Names'] for c in ours]}"


@pytest.fixture(scope="session")
def docker_api_lazy() -> Any:
    clients: list[docker.APIClient] = []

    def get() -> docker.APIClient | None:
        if not clients:
            try:
                c = docker.from_env(version="auto").api
                c.ping()
                clients.append(c)
            except Exception:
                return None
        return clients[0]

    return get
