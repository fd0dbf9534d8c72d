"""The OpenAPI document: self-contained, every bound the handlers enforce, every status."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.bundle.schemas import SchemaSet
from gateway.errors import ERROR_CODES
from gateway.http.agent_app import agent_routes, create_agent_app
from gateway.http.agent_openapi import agent_paths
from gateway.http.app import HUB
from gateway.http.openapi import openapi_document
from gateway.http.openapi_parts import inline_schemas
from gateway.settings import Settings
from gateway.store import TERMINAL_STATES
from tests.conftest import REPO, auth

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
DOC_URI = "urn:agent-gateway:openapi"


@pytest.fixture(scope="module")
def schemas() -> SchemaSet:
    return SchemaSet.load(REPO / "schemas")


@pytest.fixture(scope="module")
def doc(schemas: SchemaSet) -> dict[str, Any]:
    return openapi_document(settings=Settings(max_wait_s=7.5), schemas=schemas.documents)


def _refs(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                yield from _refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _refs(value, f"{where}/{i}")


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(_keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_keys(v) for v in node))
    return set()


def _resolve(doc: Any, ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} does not point inside the document"
    node = doc
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and token in node, f"{ref}: no {token!r}"
        node = node[token]
    return node


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def _validator(doc: dict[str, Any], name: str) -> Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"{DOC_URI}#/components/schemas/{name}"}, registry=registry
    )


def test_every_ref_resolves_inside_the_document(doc: dict[str, Any]) -> None:
    refs = list(_refs(doc))
    assert len(refs) > 50
    for where, ref in refs:
        assert _resolve(doc, ref) is not None, where
    # The inlined schemas keep no $id or $schema of their own: their $refs would resolve
    # against that $id instead of this document.
    for name, schema in doc["components"]["schemas"].items():
        assert not {"$id", "$schema"} & _keys(schema), name


def test_the_body_schemas_are_inlined_from_schemas(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    bodies = {
        ("/v1/tasks", "post"): "TaskSubmission",
        ("/v1/messages", "post"): "MessageEnvelope",
        ("/v1/tasks/{task_id}/result", "post"): "TaskResultReport",
        ("/v1/admin/mode", "post"): "ModeRequest",
    }
    for (path, method), name in bodies.items():
        body = doc["paths"][path][method]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{name}"}
    assert schemas["TaskSubmission"]["title"].startswith("Task submission envelope")
    # The envelope's agent name is common.json's, brought in with it.
    assert schemas["MessageEnvelope"]["properties"]["to"] == {
        "$ref": "#/components/schemas/schemas.common/$defs/agent_name"
    }
    assert "agent_name" in schemas["schemas.common"]["$defs"]


@pytest.mark.parametrize(
    ("name", "rel", "instance"),
    [
        ("TaskSubmission", "task.schema.json", {"capability": "debug.echo", "input": {}}),
        ("TaskSubmission", "task.schema.json", {"agent": "echo", "input": {}}),
        ("TaskSubmission", "task.schema.json", {"agent": "Not A Name", "input": {}}),
        ("TaskSubmission", "task.schema.json", {"capability": "x"}),
        ("TaskSubmission", "task.schema.json", {"capability": "x", "agent": "y", "input": 1}),
        (
            "MessageEnvelope",
            "messages/envelope.schema.json",
            {"type": "request", "to": "echo", "kind": "ping", "payload": {}},
        ),
        (
            "MessageEnvelope",
            "messages/envelope.schema.json",
            {"type": "request", "to": "BAD", "kind": "ping", "payload": {}},
        ),
        (
            "MessageEnvelope",
            "messages/envelope.schema.json",
            {"type": "event", "topic": "Not.A.Topic", "kind": "notice", "payload": {}},
        ),
        ("TaskResultReport", "task.result.schema.json", {"output": 1}),
        ("TaskResultReport", "task.result.schema.json", {"error": {"code": "X", "message": ""}}),
    ],
)
def test_inlined_schemas_accept_what_the_files_accept(
    doc: dict[str, Any], schemas: SchemaSet, name: str, rel: str, instance: Any
) -> None:
    expected = schemas.validator(rel).is_valid(instance)
    assert _validator(doc, name).is_valid(instance) == expected


def test_inlining_follows_ids_anchors_and_relative_paths() -> None:
    documents = {
        "a.json": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "properties": {"b": {"$ref": "sub/b.json#item"}, "self": {"$ref": "#/$defs/x"}},
            "$defs": {"x": {"type": "integer"}},
        },
        "sub/b.json": {
            "$id": "https://example.com/b.json",
            "$defs": {"item": {"$anchor": "item", "$ref": "c.json#/$defs/c"}},
        },
        "sub/c.json": {"$id": "https://example.com/c.json", "$defs": {"c": {"type": "string"}}},
        "unused.json": {"type": "null"},
    }
    out = inline_schemas(documents, ["a.json"])
    assert sorted(out) == ["schemas.a", "schemas.sub.b", "schemas.sub.c"]
    assert out["schemas.a"]["properties"] == {
        "b": {"$ref": "#/components/schemas/schemas.sub.b/$defs/item"},
        "self": {"$ref": "#/components/schemas/schemas.a/$defs/x"},
    }
    assert out["schemas.sub.b"]["$defs"]["item"]["$ref"] == (
        "#/components/schemas/schemas.sub.c/$defs/c"
    )
    assert "$schema" not in out["schemas.a"] and "$id" not in out["schemas.sub.b"]
    whole = {"components": {"schemas": out}}
    for _, ref in _refs(whole):
        _resolve(whole, ref)


def _params(doc: dict[str, Any], path: str, method: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p["schema"] for p in doc["paths"][path][method].get("parameters", [])}


def test_parameters_carry_the_handlers_bounds(doc: dict[str, Any]) -> None:
    wait = {"type": "number", "minimum": 0, "maximum": 7.5}
    assert _params(doc, "/v1/tasks", "post")["wait"] == wait
    assert _params(doc, "/v1/tasks/{task_id}", "get")["wait"] == wait
    assert _params(doc, "/v1/messages", "post")["wait"] == wait
    assert _params(doc, "/v1/tasks", "post")["Idempotency-Key"] == {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
    }
    for path in ("/v1/tasks", "/v1/decisions"):
        params = _params(doc, path, "get")
        assert params["limit"] == {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
        assert params["cursor"] == {"type": "string", "pattern": "^[0-9]{1,18}$"}
    states = _params(doc, "/v1/tasks", "get")["state"]["enum"]
    assert set(states) == {"pending", "dispatched", "running", *TERMINAL_STATES}
    assert _params(doc, "/v1/decisions", "get")["decision"]["enum"] == [
        "allow",
        "deny",
        "true",
        "false",
    ]
    # Every other parameter is a free-text filter or an id: bounded by its type only.
    free = {"agent", "subject", "kind", "since", "until", "task_id", "name", "decision_id"}
    bounded = {"enum", "maximum", "maxLength", "pattern"}
    for path, method, op in _operations(doc):
        for p in op.get("parameters", []):
            assert p["name"] in free or bounded & set(p["schema"]), f"{method} {path} {p}"


def _statuses(op: dict[str, Any]) -> set[int]:
    return {int(s) for s in op["responses"]}


def test_every_operation_lists_every_status_it_can_answer(doc: dict[str, Any]) -> None:
    for path, method, op in _operations(doc):
        label = f"{method.upper()} {path}"
        statuses = _statuses(op)
        assert {405, 500} <= statuses, label
        if "security" in op:
            assert {401, 403, 429, 503} <= statuses, label
        if "requestBody" in op:
            assert {400, 413, 415} <= statuses, label
        for status, response in op["responses"].items():
            response = _resolve(doc, response["$ref"]) if "$ref" in response else response
            assert response["content"], f"{label} {status}"
            assert "X-Request-Id" in response["headers"], f"{label} {status}"
            # /mcp and /a2a/{agent} answer JSON-RPC errors, as MCP and A2A require.
            if (
                int(status) >= 400
                and path not in ("/mcp", "/a2a/{agent}")
                and not (path == "/readyz" and status == "503")
            ):
                schema = response["content"]["application/json"]["schema"]
                assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}
    assert {404, 409} <= _statuses(doc["paths"]["/v1/tasks/{task_id}"]["delete"])
    assert 422 in _statuses(doc["paths"]["/v1/admin/reload"]["post"])
    assert {502, 504} <= _statuses(doc["paths"]["/v1/messages"]["post"])


def _codes(doc: dict[str, Any], status: int) -> list[str]:
    op = doc["paths"]["/v1/tasks"]["post"]
    response = _resolve(doc, op["responses"][str(status)]["$ref"])
    schema = response["content"]["application/json"]["schema"]
    return schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"]


def test_each_error_status_lists_its_codes(doc: dict[str, Any]) -> None:
    assert _codes(doc, 403) == sorted(c for c, s in ERROR_CODES.items() if s == 403)
    assert "forbidden" in _codes(doc, 403) and "policy_denied" in _codes(doc, 403)
    assert _codes(doc, 429) == ["too_many_requests"]
    assert _codes(doc, 503) == ["degraded", "store_unavailable"]
    # Every status the error classes use has its response component.
    documented = {
        int(s)
        for _, _, op in _operations(doc)
        for s in op["responses"]
        if int(s) >= 400 and "$ref" in op["responses"][s]
    }
    assert set(ERROR_CODES.values()) <= documented


def test_response_headers_are_documented(doc: dict[str, Any]) -> None:
    def headers(path: str, method: str, status: int) -> dict[str, Any]:
        response = doc["paths"][path][method]["responses"][str(status)]
        return (_resolve(doc, response["$ref"]) if "$ref" in response else response)["headers"]

    assert headers("/v1/tasks", "post", 202)["Location"]["required"] is True
    assert "Idempotent-Replayed" in headers("/v1/tasks", "post", 200)
    too_many = headers("/v1/tasks", "get", 429)
    assert too_many["Retry-After"]["required"] is True
    assert {"RateLimit", "RateLimit-Policy"} <= set(too_many)
    assert "Retry-After" in headers("/v1/tasks", "post", 503)
    assert headers("/readyz", "get", 503)["Retry-After"]["required"] is True
    assert headers("/v1/status", "get", 405)["Allow"]["required"] is True
    assert headers("/v1/status", "get", 401)["WWW-Authenticate"]["required"] is True


async def test_every_agent_listener_route_is_described(fake_hub: Any) -> None:
    client, _ = fake_hub
    doc = openapi_document(settings=client.app[HUB].settings)
    served = agent_routes(create_agent_app(client.app[HUB]))
    assert ("POST", "/mcp") in served and ("DELETE", "/mcp") in served
    for method, path in served:
        assert method.lower() in doc["paths"].get(path, {}), f"{method} {path}"
    # /mcp is an agent route: described with the agent routes, taking agents' SVIDs (the
    # agent listener's only credential) as well as API keys.
    agent_mcp = agent_paths(7.5)["/mcp"]
    assert set(agent_mcp) == {"post", "delete"}
    for method in ("post", "delete"):
        assert agent_mcp[method] == doc["paths"]["/mcp"][method]
        assert {"svid": []} in agent_mcp[method]["security"]
        assert "agent listener" in agent_mcp[method]["description"]


async def test_the_hub_serves_its_own_document(fake_hub: Any) -> None:
    client, _ = fake_hub
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    served = await resp.json()
    hub = client.app[HUB]
    assert served == openapi_document(settings=hub.settings, schemas=hub.config.schemas.documents)
    assert _params(served, "/v1/tasks", "post")["wait"]["maximum"] == hub.settings.max_wait_s
    for where, ref in _refs(served):
        assert _resolve(served, ref) is not None, where


async def test_the_documented_bounds_are_the_handlers(fake_hub: Any, keys: dict[str, str]) -> None:
    client, _ = fake_hub
    doc = await (await client.get("/openapi.json")).json()
    headers = auth(keys["operator"])
    top = _params(doc, "/v1/tasks/{task_id}", "get")["wait"]["maximum"]
    # At the bound the request passes validation (an unknown task); past it, 400.
    assert (await client.get(f"/v1/tasks/none?wait={top}", headers=headers)).status == 404
    assert (await client.get(f"/v1/tasks/none?wait={top + 0.5}", headers=headers)).status == 400
    assert (await client.get("/v1/tasks/none?wait=-0.1", headers=headers)).status == 400
    limit = _params(doc, "/v1/tasks", "get")["limit"]
    for path in ("/v1/tasks", "/v1/decisions"):
        ok = [f"limit={limit['minimum']}", f"limit={limit['maximum']}", "cursor=" + "9" * 18]
        bad = [
            f"limit={limit['minimum'] - 1}",
            f"limit={limit['maximum'] + 1}",
            "limit=2.5",
            "cursor=" + "9" * 19,
            "cursor=%C2%B2",  # "²": str.isdigit() says yes, int() says no
            "cursor=-1",
        ]
        for query in ok:
            resp = await client.get(f"{path}?{query}", headers=auth(keys["auditor"]))
            assert resp.status == 200, f"{path}?{query}"
        for query in bad:
            resp = await client.get(f"{path}?{query}", headers=auth(keys["auditor"]))
            assert resp.status == 400, f"{path}?{query}"
    for state in _params(doc, "/v1/tasks", "get")["state"]["enum"]:
        assert (await client.get(f"/v1/tasks?state={state}", headers=headers)).status == 200
    assert (await client.get("/v1/tasks?state=lost", headers=headers)).status == 400
    longest = _params(doc, "/v1/tasks", "post")["Idempotency-Key"]["maxLength"]
    body = {"capability": "no.such", "input": {}}
    for key, status in (("k" * longest, 404), ("k" * (longest + 1), 400)):
        resp = await client.post(
            "/v1/tasks", json=body, headers={**auth(keys["user"]), "Idempotency-Key": key}
        )
        assert resp.status == status, len(key)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/tasks", "GET, HEAD, POST"),
        ("PATCH", "/v1/tasks/abc", "DELETE, GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("GET", "/v1/admin/reload", "POST"),
    ],
)
async def test_405_says_which_methods_the_path_allows(
    fake_hub: Any, method: str, path: str, allow: str
) -> None:
    client, _ = fake_hub
    resp = await client.request(method, path)
    assert resp.status == 405
    assert resp.headers["Allow"] == allow
    body = await resp.json()
    assert body["error"]["code"] == "method_not_allowed"
    assert body["error"]["details"] == {"allowed": allow.split(", ")}
