"""A registry secret on the real engine: the container gets it, nothing of the hub's does.

``calc`` is registered with ``CALC_TOKEN: {secret: calc-token}``. Its container's
environment holds the value (``docker inspect`` shows it: that is the engine's record, not
the hub's), while the hub's logs (every logger, at DEBUG), its API and its database files
never do. A secret that cannot be read fails the task with ``secret_unavailable`` and
leaves no container.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from gateway.containers.backend import LABEL_HUB
from gateway.http.app import HUB
from gateway.logs import JsonFormatter
from tests.conftest import auth, make_settings
from tests.integration.conftest import RUN_ID, cleanup_hub, registry_file

pytestmark = pytest.mark.docker

VALUE = "tok-" + secrets.token_hex(12)
CALC_ENV = '    env:\n      CALC_MAX_DIGITS: "50"\n'


@pytest.fixture
def hub_log() -> Iterator[io.StringIO]:
    """Everything logged while the test runs, by any logger, as the hub's JSON lines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
async def secret_hub(
    tmp_path: Path,
    keys: dict[str, str],
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
    aiohttp_client: Any,
) -> AsyncIterator[Any]:
    """A hub on the real engine whose calc takes CALC_TOKEN from <state-dir>/secrets.json."""
    from gateway.http.app import create_app

    agents = registry_file(tmp_path, agent_images)
    text = agents.read_text()
    assert CALC_ENV in text
    agents.write_text(text.replace(CALC_ENV, CALC_ENV + "      CALC_TOKEN: {secret: calc-token}\n"))
    networks = [
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-int",
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-egr",
    ]
    settings = make_settings(
        tmp_path,
        agents_file=agents,
        network=networks[0],
        egress_network=networks[1],
        hub_id=f"test-{RUN_ID}-{secrets.token_hex(3)}",
    )
    try:
        client = await aiohttp_client(create_app(settings))
        yield client
        await client.close()
    finally:
        cleanup_hub(docker_api, settings.hub_id, networks)


def write_secrets(client: Any, data: dict[str, str], mode: int = 0o600) -> Path:
    path = client.app[HUB].settings.effective_secrets_file
    path.write_text(json.dumps(data))
    path.chmod(mode)
    return Path(path)


def containers_of(api: docker.APIClient, client: Any) -> list[dict[str, Any]]:
    hub_id = client.app[HUB].settings.hub_id
    return api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub_id}"]})


def database_bytes(client: Any) -> bytes:
    db = client.app[HUB].settings.db_path
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


async def test_the_container_gets_the_secret_and_the_hub_keeps_none(
    secret_hub: Any, keys: dict[str, str], docker_api: docker.APIClient, hub_log: io.StringIO
) -> None:
    path = write_secrets(secret_hub, {"calc-token": VALUE, "unused": "x"})
    resp = await secret_hub.post(
        "/v1/tasks",
        json={"capability": "code.eval", "input": {"expression": "6*7", "spin_s": 3}},
        headers=auth(keys["developer"]),
    )
    task = await resp.json()
    assert resp.status == 202, task
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not (found := containers_of(docker_api, secret_hub)):
        assert loop.time() < deadline, "no container started"
        await asyncio.sleep(0.05)
    try:
        env = docker_api.inspect_container(found[0]["Id"])["Config"]["Env"]
    except docker.errors.NotFound:
        gone = await secret_hub.get(f"/v1/tasks/{task['task_id']}", headers=auth(keys["developer"]))
        pytest.fail(f"the container went before it could be inspected: {await gone.json()}")
    done = await secret_hub.get(
        f"/v1/tasks/{task['task_id']}?wait=30", headers=auth(keys["developer"])
    )
    body = await done.json()
    agent = await secret_hub.get("/v1/agents/calc", headers=auth(keys["user"]))

    assert f"CALC_TOKEN={VALUE}" in env
    assert body["state"] == "succeeded", body
    assert body["result"]["value"] == 42
    assert "CALC_TOKEN" in body["result"]["sandbox"]["env_keys"]  # the agent saw it
    assert (await agent.json())["env"] == {"CALC_MAX_DIGITS": "***", "CALC_TOKEN": "***"}
    logged = hub_log.getvalue()
    assert '"msg": "dispatch allowed"' in logged  # the capture did see the hub's lines
    assert VALUE not in logged
    assert VALUE.encode() not in database_bytes(secret_hub)
    assert b"calc-token" not in database_bytes(secret_hub)  # nor the secret's name
    assert path.stat().st_mode & 0o777 == 0o600


async def test_a_secret_that_cannot_be_read_fails_the_task_and_starts_nothing(
    secret_hub: Any, keys: dict[str, str], docker_api: docker.APIClient, hub_log: io.StringIO
) -> None:
    async def run() -> dict[str, Any]:
        resp = await secret_hub.post(
            "/v1/tasks?wait=20",
            json={"capability": "code.eval", "input": {"expression": "1"}},
            headers=auth(keys["developer"]),
        )
        return await resp.json()  # type: ignore[no-any-return]

    path = secret_hub.app[HUB].settings.effective_secrets_file
    no_file = await run()
    write_secrets(secret_hub, {"calc-token": VALUE}, mode=0o644)
    exposed = await run()
    write_secrets(secret_hub, {"other": VALUE})
    missing = await run()

    for task in (no_file, exposed, missing):
        assert task["state"] == "failed", task
        assert task["error"]["code"] == "secret_unavailable"
        assert VALUE not in json.dumps(task)
    assert no_file["error"]["message"] == f"secrets file {path} does not exist"
    assert f"secrets file {path} has mode 0644" in exposed["error"]["message"]
    assert missing["error"]["message"] == f"secret calc-token not in {path}"
    assert containers_of(docker_api, secret_hub) == []
    assert VALUE not in hub_log.getvalue()
    # Fixed, the next start reads the file again: no reload or restart needed.
    write_secrets(secret_hub, {"calc-token": VALUE})
    assert (await run())["state"] == "succeeded"
