"""The HTTP API with a fake container backend: every error path and the task lifecycle.

Agents are the real example agents served in-process; only Docker is replaced (the same
paths run against real containers in tests/integration).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.http.app import HUB
from tests.conftest import auth

ECHO = {"capability": "debug.echo", "input": {"hello": "world"}}


async def test_submit_and_wait_returns_the_result(fake_hub: Any, keys: dict[str, str]) -> None:
    client, backend = fake_hub
    resp = await client.post("/v1/tasks?wait=10", json=ECHO, headers=auth(keys["user"]))
    body = await resp.json()
    assert resp.status == 200, body
    assert body["state"] == "succeeded"
    assert body["result"] == {"echo": {"hello": "world"}, "agent": "echo"}
    assert body["agent"] == "echo"
    assert [h["state"] for h in body["history"]] == [
        "pending",
        "dispatched",
        "running",
        "succeeded",
    ]
    assert len(backend.started) == 1
    spec = backend.started[0]
    assert spec.labels["io.agent-gateway.task"] == body["task_id"]
    assert spec.memory_bytes == 64 * 1024 * 1024
    await _until(lambda: len(backend.removed) == 1)


async def test_submit_without_wait_is_accepted_then_polled(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    client, _ = fake_hub
    resp = await client.post("/v1/tasks", json=ECHO, headers=auth(keys["user"]))
    assert resp.status == 202
    task_id = (await resp.json())["task_id"]
    assert resp.headers["Location"] == f"/v1/tasks/{task_id}"
    got = await client.get(f"/v1/tasks/{task_id}?wait=10", headers=auth(keys["user"]))
    assert (await got.json())["state"] == "succeeded"


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, ECHO, 401, "unauthorized"),
        ({"Authorization": "Bearer nonsense"}, ECHO, 401, "unauthorized"),
        ({"Authorization": "Basic abc"}, ECHO, 401, "unauthorized"),
        (
            {"Authorization": "Bearer agk_000000000000_" + "A" * 43},
            ECHO,
            401,
            "unauthorized",
        ),
    ],
    ids=["no key", "malformed key", "wrong scheme", "unknown key"],
)
async def test_authentication_errors(
    fake_hub: Any, headers: dict[str, str], body: Any, status: int, code: str
) -> None:
    client, backend = fake_hub
    resp = await client.post("/v1/tasks", json=body, headers=headers)
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert backend.started == []


async def test_forged_key_with_known_id_is_refused(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    real = keys["user"]
    forged = real[:-5] + ("AAAAA" if not real.endswith("AAAAA") else "BBBBB")
    resp = await client.post("/v1/tasks", json=ECHO, headers=auth(forged))
    assert resp.status == 401


@pytest.mark.parametrize(
    ("data", "ctype", "status", "code"),
    [
        (b'{"capability": ', "application/json", 400, "malformed_json"),
        (b"\xff\xfe", "application/json", 400, "malformed_json"),
        (b"capability=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"{}", "", 415, "unsupported_media_type"),
        (b'{"capability": "debug.echo"}', "application/json", 400, "schema_violation"),
        (b"[1, 2]", "application/json", 400, "schema_violation"),
        (
            b'{"capability": "debug.echo", "agent": "echo", "input": {}}',
            "application/json",
            400,
            "schema_violation",
        ),
        (b'{"capability": "no.such", "input": {}}', "application/json", 404, "unknown_capability"),
        (b'{"agent": "ghost", "input": {}}', "application/json", 404, "unknown_agent"),
        (
            b'{"capability": "debug.echo", "input": {}, "timeout_s": "soon"}',
            "application/json",
            400,
            "schema_violation",
        ),
    ],
    ids=[
        "truncated json",
        "not utf-8",
        "form body",
        "no content type",
        "missing input",
        "array body",
        "both agent and capability",
        "unknown capability",
        "unknown agent",
        "timeout wrong type",
    ],
)
async def test_bad_requests_get_precise_errors_and_start_nothing(
    fake_hub: Any, keys: dict[str, str], data: bytes, ctype: str, status: int, code: str
) -> None:
    client, backend = fake_hub
    headers = {**auth(keys["user"])}
    if ctype:
        headers["Content-Type"] = ctype
    resp = await client.post("/v1/tasks", data=data, headers=headers)
    body = await resp.json()
    assert resp.status == status, body
    assert body["error"]["code"] == code
    assert "Traceback" not in json.dumps(body)
    assert backend.started == []
    tasks = await client.get("/v1/tasks", headers=auth(keys["user"]))
    assert (await tasks.json())["tasks"] == []


async def test_schema_violation_lists_every_field_by_pointer(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    client, backend = fake_hub
    resp = await client.post(
        "/v1/tasks",
        json={"capability": "text.stats", "input": {"text": "", "top": 99, "extra": 1}},
        headers=auth(keys["user"]),
    )
    body = await resp.json()
    assert resp.status == 400
    pointers = sorted(d["pointer"] for d in body["error"]["details"])
    assert pointers == ["/input/extra", "/input/text", "/input/top"]
    assert backend.started == []


async def test_malformed_json_reports_line_and_column(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    resp = await client.post(
        "/v1/tasks",
        data=b'{\n  "capability": "debug.echo",\n  "input": {,}\n}',
        headers={**auth(keys["user"]), "Content-Type": "application/json"},
    )
    body = await resp.json()
    assert body["error"]["details"] == {"line": 3, "column": 13}


async def test_oversized_body_is_413(fake_hub: Any, keys: dict[str, str]) -> None:
    client, backend = fake_hub
    big = {"capability": "debug.echo", "input": {"blob": "x" * (1024 * 1024 + 10)}}
    resp = await client.post("/v1/tasks", json=big, headers=auth(keys["user"]))
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    assert backend.started == []


async def test_policy_denial_returns_reasons_and_decision_id(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    client, backend = fake_hub
    resp = await client.post(
        "/v1/tasks",
        json={"capability": "code.eval", "input": {"expression": "1+1"}},
        headers=auth(keys["user"]),
    )
    body = await resp.json()
    assert resp.status == 403
    err = body["error"]
    assert err["code"] == "policy_denied"
    assert err["details"]["reasons"] == [
        'capability "code.eval" requires one of the roles ["developer"]'
    ]
    assert backend.started == []
    # The auditor finds the same decision in the log.
    logged = await client.get(f"/v1/decisions/{err['decision_id']}", headers=auth(keys["auditor"]))
    record = await logged.json()
    assert logged.status == 200, record
    assert record["result"]["allow"] is False
    assert record["input"]["subject"]["id"] == "user"


async def test_developer_gets_the_restricted_sandbox(fake_hub: Any, keys: dict[str, str]) -> None:
    client, backend = fake_hub
    resp = await client.post(
        "/v1/tasks?wait=10",
        json={"capability": "code.eval", "input": {"expression": "6*7"}},
        headers=auth(keys["developer"]),
    )
    body = await resp.json()
    assert body["state"] == "succeeded", body
    assert body["result"]["value"] == 42
    spec = backend.started[0]
    assert (spec.memory_bytes, spec.pids_limit, spec.nano_cpus) == (64 * 2**20, 32, 500_000_000)


async def test_agent_error_fails_the_task_with_its_reason(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    client, _ = fake_hub
    resp = await client.post(
        "/v1/tasks?wait=10",
        json={"capability": "code.eval", "input": {"expression": "1/0"}},
        headers=auth(keys["developer"]),
    )
    body = await resp.json()
    assert body["state"] == "failed"
    assert body["error"]["code"] == "agent_error"
    assert body["error"]["details"]["agent_error"]["code"] == "bad_expression"


async def test_timeout_marks_task_timed_out_and_removes_container(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    client, backend = fake_hub
    resp = await client.post(
        "/v1/tasks?wait=10",
        json={
            "capability": "code.eval",
            "input": {"expression": "1", "spin_s": 5},
            "timeout_s": 0.5,
        },
        headers=auth(keys["developer"]),
    )
    body = await resp.json()
    assert body["state"] == "timed_out", json.dumps(body)
    assert body["error"]["code"] == "agent_timeout"
    await _until(lambda: backend.servers == {})


async def test_cancel_stops_the_container(fake_hub: Any, keys: dict[str, str]) -> None:
    client, backend = fake_hub
    resp = await client.post(
        "/v1/tasks",
        json={"capability": "code.eval", "input": {"expression": "1", "spin_s": 5}},
        headers=auth(keys["developer"]),
    )
    task_id = (await resp.json())["task_id"]
    await _until(lambda: len(backend.servers) == 1)
    cancel = await client.delete(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))
    body = await cancel.json()
    assert body["state"] == "cancelled"
    assert backend.servers == {}
    again = await client.delete(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "invalid_state"


async def test_idempotency_key_replays_and_conflicts(fake_hub: Any, keys: dict[str, str]) -> None:
    client, backend = fake_hub
    headers = {**auth(keys["user"]), "Idempotency-Key": "order-1"}
    first = await client.post("/v1/tasks?wait=10", json=ECHO, headers=headers)
    second = await client.post("/v1/tasks", json=ECHO, headers=headers)
    assert first.status == 200
    assert second.status == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert (await first.json())["task_id"] == (await second.json())["task_id"]
    assert len(backend.started) == 1
    other = await client.post("/v1/tasks", json={**ECHO, "input": {"other": 1}}, headers=headers)
    assert other.status == 409
    assert (await other.json())["error"]["code"] == "idempotency_conflict"
    # Each of the three calls was allowed and logged, whether its record went in with a new
    # task (the first) or on its own (the replay, the conflict); one dispatch decision.
    hub = client.app[HUB]
    api, _ = await hub.decisions.list(kind="api", limit=50)
    posts = [d for d in api if d["input"]["request"]["method"] == "POST"]
    assert len(posts) == 3 and all(d["result"]["allow"] for d in posts)
    dispatch, _ = await hub.decisions.list(kind="dispatch", limit=50)
    assert len(dispatch) == 1 and (await hub.decisions.verify()).ok


async def test_tasks_are_private_to_their_subject(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    resp = await client.post("/v1/tasks?wait=10", json=ECHO, headers=auth(keys["user"]))
    task_id = (await resp.json())["task_id"]
    other = await client.get(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))
    assert other.status == 404
    operator = await client.get(f"/v1/tasks/{task_id}", headers=auth(keys["operator"]))
    assert operator.status == 200


async def test_list_filters_and_paginates(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    ids = []
    for i in range(5):
        r = await client.post(
            "/v1/tasks?wait=10", json={**ECHO, "input": {"i": i}}, headers=auth(keys["user"])
        )
        ids.append((await r.json())["task_id"])
    page = await (await client.get("/v1/tasks?limit=2", headers=auth(keys["user"]))).json()
    assert [t["task_id"] for t in page["tasks"]] == ids[::-1][:2]
    nxt = await (
        await client.get(
            f"/v1/tasks?limit=2&cursor={page['next_cursor']}", headers=auth(keys["user"])
        )
    ).json()
    assert [t["task_id"] for t in nxt["tasks"]] == ids[::-1][2:4]
    filtered = await (
        await client.get("/v1/tasks?state=succeeded&agent=echo", headers=auth(keys["user"]))
    ).json()
    assert len(filtered["tasks"]) == 5
    bad = await client.get("/v1/tasks?state=bogus", headers=auth(keys["user"]))
    assert bad.status == 400
    bad_limit = await client.get("/v1/tasks?limit=x", headers=auth(keys["user"]))
    assert bad_limit.status == 400


async def test_engine_down_means_degraded_and_503(fake_hub: Any, keys: dict[str, str]) -> None:
    client, backend = fake_hub
    backend.fail_start = True
    hub = client.app[HUB]
    await hub.probe_engine()
    resp = await client.post("/v1/tasks", json=ECHO, headers=auth(keys["user"]))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert (await client.get("/readyz")).status == 503
    backend.fail_start = False
    await hub.probe_engine()
    assert (await client.get("/readyz")).status == 200


async def test_unknown_route_and_method(fake_hub: Any) -> None:
    client, _ = fake_hub
    assert (await (await client.get("/nope")).json())["error"]["code"] == "not_found"
    resp = await client.put("/v1/tasks")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_role_checks_on_admin_endpoints(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    assert (await client.get("/v1/status", headers=auth(keys["user"]))).status == 403
    assert (await client.get("/v1/decisions", headers=auth(keys["user"]))).status == 403
    status = await client.get("/v1/status", headers=auth(keys["operator"]))
    assert (await status.json())["mode"] == "normal"


async def test_every_route_is_in_openapi(fake_hub: Any) -> None:
    client, _ = fake_hub
    doc = await (await client.get("/openapi.json")).json()
    for route in client.app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical
        assert route.method.lower() in doc["paths"].get(path, {}), f"{route.method} {path}"


async def test_metrics_count_requests_and_decisions(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    await client.post("/v1/tasks?wait=10", json=ECHO, headers=auth(keys["user"]))
    text = await (await client.get("/metrics")).text()
    assert 'gateway_decisions_total{kind="dispatch",result="allow"} 1.0' in text
    assert 'gateway_tasks{state="succeeded"} 1.0' in text
    assert 'route="/v1/tasks"' in text


async def _until(check: Any, within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def test_output_breaking_its_schema_fails_the_task(
    tmp_path: Any, keys: dict[str, str], aiohttp_client: Any, config_copy: Any
) -> None:
    from gateway.http.app import create_app
    from tests.conftest import FakeBackend, make_settings

    root = config_copy()
    schema = root / "schemas" / "agents" / "echo.output.json"
    doc = json.loads(schema.read_text())
    doc["required"] = [*doc["required"], "signature"]
    schema.write_text(json.dumps(doc))
    settings = make_settings(
        tmp_path,
        agents_file=root / "agents.yaml",
        schemas_dir=root / "schemas",
        policies_dir=root / "policies",
    )
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    resp = await client.post("/v1/tasks?wait=10", json=ECHO, headers=auth(keys["user"]))
    body = await resp.json()
    assert body["state"] == "failed"
    assert body["error"]["code"] == "output_schema_violation"
    assert body["error"]["details"] == [
        {
            "pointer": "/output/signature",
            "keyword": "required",
            "message": '"signature" is a required property',
        }
    ]
