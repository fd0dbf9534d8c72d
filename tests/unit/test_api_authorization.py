"""API authorization through policies/api.rego, over HTTP on a real hub (fake containers).

Each case is a call a reviewer tried or would try; the decision log must show the denials and
every state-changing call (kind ``api``).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.http.app import HUB, create_app
from gateway.settings import REPO_ROOT
from tests.conftest import FakeBackend, auth, make_settings

SPIN = {"capability": "code.eval", "input": {"expression": "1", "spin_s": 20}}
ECHO = {"capability": "debug.echo", "input": {"hello": "world"}}


async def _running_task(client: Any, key: str, backend: FakeBackend) -> str:
    resp = await client.post("/v1/tasks", json=SPIN, headers=auth(key))
    assert resp.status == 202, await resp.text()
    task_id = (await resp.json())["task_id"]
    for _ in range(200):
        if backend.servers:
            break
        await asyncio.sleep(0.02)
    return str(task_id)


async def _api_decisions(client: Any) -> list[dict[str, Any]]:
    hub = client.app[HUB]
    records, _ = await hub.decisions.list(kind="api", limit=500)
    return records


async def test_an_auditor_cannot_cancel_someone_elses_task(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    # The hole a review found: DELETE by a read-only auditor answered 200.
    client, backend = fake_hub
    task_id = await _running_task(client, keys["developer"], backend)
    resp = await client.delete(f"/v1/tasks/{task_id}", headers=auth(keys["auditor"]))
    body = await resp.json()
    assert resp.status == 403, body
    assert body["error"]["code"] == "forbidden"
    assert body["error"]["decision_id"]
    assert "needs one of the roles" in body["error"]["message"]
    task = await client.get(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))
    assert (await task.json())["state"] in ("dispatched", "running")
    assert len(backend.servers) == 1
    logged = await client.app[HUB].decisions.get(body["error"]["decision_id"])
    assert logged["kind"] == "api"
    assert logged["result"]["allow"] is False
    assert logged["input"]["resource"]["owner"] == "developer"
    assert logged["input"]["request"]["route"] == "/v1/tasks/{task_id}"


async def test_another_user_is_told_the_task_does_not_exist(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    client, backend = fake_hub
    task_id = await _running_task(client, keys["developer"], backend)
    for method in ("get", "delete"):
        resp = await getattr(client, method)(f"/v1/tasks/{task_id}", headers=auth(keys["user"]))
        body = await resp.json()
        assert resp.status == 404, (method, body)
        assert body["error"]["code"] == "unknown_task"
        assert body["error"]["message"] == f"no task {task_id!r}"
    assert len(backend.servers) == 1


async def test_the_owner_and_an_operator_may_cancel(fake_hub: Any, keys: dict[str, str]) -> None:
    client, backend = fake_hub
    mine = await _running_task(client, keys["developer"], backend)
    resp = await client.delete(f"/v1/tasks/{mine}", headers=auth(keys["developer"]))
    assert resp.status == 200
    assert (await resp.json())["history"][-1]["detail"] == "cancelled by developer"
    theirs = await _running_task(client, keys["developer"], backend)
    resp = await client.delete(f"/v1/tasks/{theirs}", headers=auth(keys["operator"]))
    assert resp.status == 200
    assert (await resp.json())["history"][-1]["detail"] == "cancelled by operator"
    cancels = [
        d
        for d in await _api_decisions(client)
        if d["input"]["request"]["method"] == "DELETE" and d["result"]["allow"]
    ]
    assert {d["subject"] for d in cancels} == {"developer", "operator"}


async def test_list_shows_own_tasks_unless_the_policy_grants_all(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    client, _ = fake_hub
    for key in ("user", "developer"):
        resp = await client.post("/v1/tasks?wait=10", json=ECHO, headers=auth(keys[key]))
        assert resp.status == 200
    own = await (await client.get("/v1/tasks", headers=auth(keys["user"]))).json()
    assert {t["subject"] for t in own["tasks"]} == {"user"}
    everyone = await (await client.get("/v1/tasks", headers=auth(keys["auditor"]))).json()
    assert {t["subject"] for t in everyone["tasks"]} == {"user", "developer"}
    nobody = await client.get("/v1/tasks", headers=auth(keys["nobody"]))
    assert nobody.status == 403


async def test_roles_in_a_body_or_query_grant_nothing(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    resp = await client.post(
        "/v1/admin/mode?roles=operator",
        json={"mode": "degraded", "roles": ["operator"], "subject": {"roles": ["admin"]}},
        headers=auth(keys["user"]),
    )
    assert resp.status == 403
    assert client.app[HUB].mode == "normal"


@pytest.mark.parametrize(
    ("method", "path", "role", "status"),
    [
        ("get", "/v1/status", "user", 403),
        ("get", "/v1/status", "operator", 200),
        ("get", "/v1/decisions", "operator", 403),
        ("get", "/v1/decisions", "auditor", 200),
        ("get", "/v1/decisions/verify", "auditor", 200),
        ("get", "/v1/decisions/verify", "user", 403),
        ("post", "/v1/admin/reload", "auditor", 403),
        ("post", "/v1/admin/identity/rotate", "user", 403),
        ("get", "/v1/agents", "nobody", 200),
        ("get", "/v1/agents", None, 401),
        ("get", "/v1/tasks", None, 401),
        ("get", "/healthz", None, 200),
        ("get", "/openapi.json", None, 200),
        ("get", "/audit", None, 200),
    ],
)
async def test_route_table(
    fake_hub: Any, keys: dict[str, str], method: str, path: str, role: str | None, status: int
) -> None:
    client, _ = fake_hub
    headers = auth(keys[role]) if role else {}
    resp = await getattr(client, method)(path, headers=headers)
    assert resp.status == status, await resp.text()
    if status in (401, 403):
        body = await resp.json()
        assert body["error"]["decision_id"], body


async def test_what_is_logged(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    await client.get("/healthz")  # anonymous allowed read: not logged
    await client.get("/v1/agents", headers=auth(keys["user"]))  # allowed read: logged
    await client.get("/v1/status", headers=auth(keys["user"]))  # denial: logged
    await client.post("/v1/tasks?wait=10", json=ECHO, headers=auth(keys["user"]))  # change
    routes = [
        (d["input"]["request"]["route"], d["result"]["allow"]) for d in await _api_decisions(client)
    ]
    assert ("/healthz", True) not in routes
    assert ("/v1/agents", True) in routes
    assert ("/v1/status", False) in routes
    assert ("/v1/tasks", True) in routes


async def test_allowed_reads_are_not_logged_when_turned_off(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    app = create_app(make_settings(tmp_path, log_api_reads=False), backend=FakeBackend())
    client = await aiohttp_client(app)
    await client.get("/v1/agents", headers=auth(keys["user"]))
    await client.get("/v1/status", headers=auth(keys["user"]))
    routes = [
        (d["input"]["request"]["route"], d["result"]["allow"]) for d in await _api_decisions(client)
    ]
    assert routes == [("/v1/status", False)]


async def test_an_api_policy_that_fails_denies_every_call(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any, config_copy: Any
) -> None:
    # Fail closed: a policy that errors at evaluation time (not at load) is a deny with the
    # reason, logged, even for the public routes.
    root = config_copy()
    api = root / "policies" / "api.rego"
    api.write_text(
        api.read_text()
        .replace(
            'call := sprintf("%s %s", [input.request.method, input.request.route])',
            'call := sprintf("%s %s", [input.request.method, input.request.route])\n\n'
            "boom := x if {\n\tinput.request.route\n"
            '\tx := 1 / count([r | some r in input.subject.roles; r == "none"])\n}',
        )
        .replace('"scope": scope,', '"scope": scope,\n\t"boom": boom,')
    )
    settings = make_settings(
        tmp_path,
        agents_file=root / "agents.yaml",
        schemas_dir=root / "schemas",
        policies_dir=root / "policies",
    )
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    resp = await client.get("/v1/agents", headers=auth(keys["user"]))
    body = await resp.json()
    assert resp.status == 403, body
    assert re.search(r"policy error", body["error"]["message"]), body
    # Public routes too: with no key the deny is a 401, and nothing is served.
    health = await client.get("/healthz")
    assert health.status == 401, await health.text()
    logged = await client.app[HUB].decisions.get(body["error"]["decision_id"])
    assert logged["result"]["allow"] is False


def test_readme_role_table_matches_the_policy() -> None:
    """The README's role table is checked against what api.rego decides for each role."""
    from gateway.bundle.config import load_config
    from gateway.identity.apikeys import KNOWN_ROLES
    from gateway.policy.engine import API_QUERY

    config = load_config(
        agents_file=REPO_ROOT / "agents.yaml",
        schemas_dir=REPO_ROOT / "schemas",
        policies_dir=REPO_ROOT / "policies",
    )
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("<!-- api-roles -->")[1].split("<!-- /api-roles -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 15, "the role table lost rows"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        method, route = cells[0].strip("`").split(" ", 1)
        documented = {r.strip("` ") for r in cells[1].split(",")}
        allowed = set()
        for role in ("anonymous", *KNOWN_ROLES):
            subject = (
                {"authenticated": False, "roles": []}
                if role == "anonymous"
                else {"authenticated": True, "id": "s", "roles": [role], "key_id": "k"}
            )
            resource = {"kind": "task", "id": "t", "owner": "s", "state": "running"}
            request: dict[str, Any] = {"method": method, "route": route, "params": {}}
            if method == "A2A":  # a JSON-RPC method of POST /a2a/{agent}
                request = {
                    "method": "POST",
                    "route": "/a2a/{agent}",
                    "params": {"agent": "echo", "method": route},
                    "protocol": "a2a",
                }
            decision = config.policy.evaluate(
                API_QUERY, {"subject": subject, "request": request, "resource": resource}
            )
            if decision.allow:
                allowed.add(role)
        assert allowed == documented, (row, sorted(allowed))
