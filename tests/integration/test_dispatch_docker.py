"""Task dispatch end to end: HTTP API, real policies, real SQLite, real Docker containers."""

from __future__ import annotations

import asyncio
from typing import Any

import docker
import pytest

from gateway.containers.backend import LABEL_AGENT, LABEL_EXPIRES, LABEL_HUB, LABEL_TASK
from gateway.http.app import HUB
from tests.conftest import auth

pytestmark = pytest.mark.docker


def hub_containers(api: docker.APIClient, client: Any) -> list[dict[str, Any]]:
    hub_id = client.app[HUB].settings.hub_id
    return api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub_id}"]})


async def until_no_containers(api: docker.APIClient, client: Any, within_s: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while hub_containers(api, client):
        assert loop.time() < deadline, "containers still present"
        await asyncio.sleep(0.1)


async def test_echo_end_to_end(docker_hub: Any, keys: dict[str, str], docker_api: Any) -> None:
    resp = await docker_hub.post(
        "/v1/tasks?wait=30",
        json={"capability": "debug.echo", "input": {"msg": "hi", "n": [1, 2]}},
        headers=auth(keys["user"]),
    )
    body = await resp.json()
    assert resp.status == 200, body
    assert body["state"] == "succeeded", body
    assert body["result"] == {"echo": {"msg": "hi", "n": [1, 2]}, "agent": "echo"}
    assert body["container"]["name"].startswith("agw-echo-")
    await until_no_containers(docker_api, docker_hub)


async def test_wordstats_is_deterministic(docker_hub: Any, keys: dict[str, str]) -> None:
    text = (
        "Policy decides everything. The hub asks policy before it starts a container. "
        "Containers are cheap. Policy is code in git."
    )
    resp = await docker_hub.post(
        "/v1/tasks?wait=30",
        json={"capability": "text.summarize", "input": {"text": text, "top": 2}},
        headers=auth(keys["user"]),
    )
    body = await resp.json()
    assert body["state"] == "succeeded", body
    assert body["result"]["words"] == 20
    assert body["result"]["sentences"] == 4
    assert body["result"]["top_words"] == [
        {"word": "policy", "count": 3},
        {"word": "asks", "count": 1},
    ]
    assert body["result"]["summary"].startswith("Policy decides everything.")


async def test_policy_denial_starts_nothing(
    docker_hub: Any, keys: dict[str, str], docker_api: Any
) -> None:
    resp = await docker_hub.post(
        "/v1/tasks",
        json={"capability": "code.eval", "input": {"expression": "2+2"}},
        headers=auth(keys["user"]),
    )
    body = await resp.json()
    assert resp.status == 403
    assert body["error"]["code"] == "policy_denied"
    assert body["error"]["decision_id"]
    assert hub_containers(docker_api, docker_hub) == []
    listed = await (await docker_hub.get("/v1/tasks", headers=auth(keys["user"]))).json()
    assert listed["tasks"] == []


async def test_schema_violation_starts_nothing(
    docker_hub: Any, keys: dict[str, str], docker_api: Any
) -> None:
    resp = await docker_hub.post(
        "/v1/tasks",
        json={"capability": "text.stats", "input": {"txt": "typo"}},
        headers=auth(keys["user"]),
    )
    body = await resp.json()
    assert resp.status == 400
    assert {d["pointer"] for d in body["error"]["details"]} == {"/input/txt", "/input/text"}
    assert hub_containers(docker_api, docker_hub) == []


async def test_guardrails_visible_in_docker_inspect(
    docker_hub: Any, keys: dict[str, str], docker_api: Any
) -> None:
    resp = await docker_hub.post(
        "/v1/tasks",
        json={"capability": "code.eval", "input": {"expression": "1", "spin_s": 20}},
        headers=auth(keys["developer"]),
    )
    task = await resp.json()
    assert resp.status == 202, task
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not (found := hub_containers(docker_api, docker_hub)):
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    info = docker_api.inspect_container(found[0]["Id"])
    host = info["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["ReadonlyRootfs"] is True
    assert {"noexec", "nosuid", "nodev"} <= set(host["Tmpfs"]["/tmp"].split(","))
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["MemorySwap"] == 64 * 1024 * 1024
    assert host["PidsLimit"] == 32
    assert host["NanoCpus"] == 500_000_000
    assert info["Config"]["User"] == "65534:65534"
    labels = info["Config"]["Labels"]
    assert labels[LABEL_TASK] == task["task_id"]
    assert labels[LABEL_AGENT] == "calc"
    assert int(labels[LABEL_EXPIRES]) > 0
    assert info["Config"]["Entrypoint"][0] == "timeout"
    env_names = {e.split("=", 1)[0] for e in info["Config"]["Env"]}
    assert {"GATEWAY_URL", "AGENT_TASK_ID", "AGENT_NAME", "CALC_MAX_DIGITS"} <= env_names
    assert not any(n.startswith(("HOME_", "SSH_", "VIRTUAL_ENV")) for n in env_names)
    network = client_network(docker_hub)
    assert list(info["NetworkSettings"]["Networks"]) == [network]
    net = docker_api.inspect_network(network)
    assert net["Internal"] is True
    assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    cancel = await docker_hub.delete(
        f"/v1/tasks/{task['task_id']}", headers=auth(keys["developer"])
    )
    assert (await cancel.json())["state"] == "cancelled"
    await until_no_containers(docker_api, docker_hub)


def client_network(client: Any) -> str:
    return str(client.app[HUB].settings.network)


async def test_sandbox_as_seen_from_inside(docker_hub: Any, keys: dict[str, str]) -> None:
    resp = await docker_hub.post(
        "/v1/tasks?wait=30",
        json={"capability": "code.eval", "input": {"expression": "2**10"}},
        headers=auth(keys["developer"]),
    )
    body = await resp.json()
    assert body["state"] == "succeeded", body
    assert body["result"]["value"] == 1024
    inside = body["result"]["sandbox"]
    assert (inside["uid"], inside["gid"]) == (65534, 65534)
    # The write goes to a directory the uid owns, so only the read-only root can refuse it.
    assert inside["root_write"] == {
        "path": "/app/scratch/probe-write",
        "dir_owner": 65534,
        "error": "EROFS",
    }
    assert inside["root_read_only"] is True
    assert inside["memory_limit_bytes"] == 64 * 1024 * 1024
    assert inside["pids_limit"] == 32


async def test_timeout_marks_timed_out_and_removes_container(
    docker_hub: Any, keys: dict[str, str], docker_api: Any
) -> None:
    resp = await docker_hub.post(
        "/v1/tasks?wait=30",
        json={
            "capability": "code.eval",
            "input": {"expression": "1", "spin_s": 60},
            "timeout_s": 3,
        },
        headers=auth(keys["developer"]),
    )
    body = await resp.json()
    assert body["state"] == "timed_out", body
    assert body["error"]["code"] == "agent_timeout"
    await until_no_containers(docker_api, docker_hub)


async def test_cancel_removes_container(
    docker_hub: Any, keys: dict[str, str], docker_api: Any
) -> None:
    resp = await docker_hub.post(
        "/v1/tasks",
        json={"capability": "code.eval", "input": {"expression": "1", "spin_s": 60}},
        headers=auth(keys["developer"]),
    )
    task_id = (await resp.json())["task_id"]
    got = await docker_hub.get(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (await got.json())["state"] != "running":
        assert loop.time() < deadline
        await asyncio.sleep(0.1)
        got = await docker_hub.get(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))
    cancel = await docker_hub.delete(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))
    body = await cancel.json()
    assert body["state"] == "cancelled"
    assert hub_containers(docker_api, docker_hub) == []


async def test_idempotent_resubmission_runs_once(docker_hub: Any, keys: dict[str, str]) -> None:
    headers = {**auth(keys["user"]), "Idempotency-Key": "same-request"}
    body = {"capability": "debug.echo", "input": {"x": 1}}
    first, second = await asyncio.gather(
        docker_hub.post("/v1/tasks?wait=30", json=body, headers=headers),
        docker_hub.post("/v1/tasks?wait=30", json=body, headers=headers),
    )
    a, b = await first.json(), await second.json()
    assert a["task_id"] == b["task_id"]
    listed = await (await docker_hub.get("/v1/tasks", headers=auth(keys["user"]))).json()
    assert [t["task_id"] for t in listed["tasks"]] == [a["task_id"]]


async def test_missing_image_fails_task_with_reason(
    docker_hub: Any, keys: dict[str, str], tmp_path: Any
) -> None:
    hub = docker_hub.app[HUB]
    text = hub.settings.agents_file.read_text().replace(
        "agent-gateway/echo:", "agent-gateway/echo-missing:"
    )
    hub.settings.agents_file.write_text(text)
    await hub.reload()
    resp = await docker_hub.post(
        "/v1/tasks?wait=30",
        json={"capability": "debug.echo", "input": {}},
        headers=auth(keys["user"]),
    )
    body = await resp.json()
    assert body["state"] == "failed"
    assert body["error"]["code"] == "agent_unavailable"
    assert "image not found" in body["error"]["message"]
