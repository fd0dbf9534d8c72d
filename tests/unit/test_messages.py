"""Agent-to-agent messages through the hub, with the fake backend.

The example agents run in-process with the real SDK, each with the environment its container
would get (``GATEWAY_URL``, ``AGENT_SVID``...), so they call the hub over real HTTP. Every
message type and every bad input of issue 3 is covered here; tests/integration repeats the
message types between real containers.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.agents.instances import Instance
from gateway.containers.backend import LABEL_AGENT, LABEL_TASK, ContainerHandle, ContainerSpec
from gateway.errors import AgentUnavailable
from gateway.http.app import HUB
from gateway.hub import Hub
from gateway.identity.apikeys import KeyStore
from gateway.identity.svid import SvidIssuer
from tests.conftest import REPO, FakeBackend, auth, load_example, make_settings
from tests.messaging import AUDIENCE, TRUST_DOMAIN, bad_tokens, claims, svid_auth, until

pytestmark = pytest.mark.timeout(60)


@dataclass
class AgentEnvBackend(FakeBackend):
    """FakeBackend whose agents see the environment their container would get."""

    gateway_url: str = ""
    agents: dict[str, Any] = field(default_factory=dict)
    _n: Any = field(default_factory=lambda: itertools.count(1))

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        if self.fail_start:
            raise AgentUnavailable("fake engine is down")
        self.started.append(spec)
        agent = load_example(spec.labels[LABEL_AGENT])
        # The hub points containers at the internal network; here it is the test server.
        agent.env = {**spec.env, "GATEWAY_URL": self.gateway_url}
        server = agent.serve_in_thread()
        cid = f"fake-msg{next(self._n)}"
        self.servers[cid] = server
        self.labels[cid] = dict(spec.labels)
        self.ports[cid] = server.server_port
        self.agents[spec.labels[LABEL_TASK]] = agent
        return ContainerHandle(id=cid, name=spec.name, address="127.0.0.1", port=server.server_port)


@dataclass
class Ctx:
    """A hub with the agent-env backend, and helpers to drive it."""

    client: Any
    backend: AgentEnvBackend
    keys: dict[str, str]
    state_dir: Path

    @property
    def hub(self) -> Hub:
        return self.client.app[HUB]

    async def start(self, agent: str, input: Any, *, key: str = "developer") -> str:
        """Submit a task and return its id once its instance answers (for holding agents)."""
        resp = await self.client.post(
            "/v1/tasks", json={"agent": agent, "input": input}, headers=auth(self.keys[key])
        )
        body = await resp.json()
        assert resp.status == 202, body
        return str(body["task_id"])

    async def running(self, task_id: str) -> Instance:
        inst = await until(
            lambda: (i := self.hub.instances.for_task(task_id)) and i.handle and i,
            what=f"instance of {task_id}",
        )
        return inst  # type: ignore[no-any-return]

    async def probe(
        self, hold_s: float = 8, expect: int = 1, *, key: str = "developer", **extra: Any
    ) -> Instance:
        """A probe holding for messages (a task of ``key``'s subject); its running instance."""
        task_id = await self.start(
            "probe", {"hold_s": hold_s, "expect_messages": expect, **extra}, key=key
        )
        return await self.running(task_id)

    def token(self, inst: Instance) -> str:
        return inst.env["AGENT_SVID"]

    async def send(self, inst_or_token: Instance | str, envelope: Any, query: str = "") -> Any:
        token = inst_or_token if isinstance(inst_or_token, str) else self.token(inst_or_token)
        resp = await self.client.post(
            "/v1/messages" + query, json=envelope, headers=svid_auth(token)
        )
        return resp.status, await resp.json()

    async def task(self, task_id: str, wait: float = 15) -> dict[str, Any]:
        resp = await self.client.get(
            f"/v1/tasks/{task_id}?wait={wait}", headers=auth(self.keys["operator"])
        )
        return await resp.json()  # type: ignore[no-any-return]

    async def message_decisions(self) -> list[dict[str, Any]]:
        records, _ = await self.hub.decisions.list(kind="message", limit=500)
        return records


def received_by(ctx: Ctx, inst: Instance) -> list[dict[str, Any]]:
    agent = ctx.backend.agents[inst.task_id]
    return list(agent._message.__globals__["received"])


@pytest.fixture
async def make_ctx(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> AsyncIterator[Callable[..., Awaitable[Ctx]]]:
    made: list[Ctx] = []

    async def make(**settings: Any) -> Ctx:
        backend = AgentEnvBackend()
        from gateway.http.app import create_app

        s = make_settings(tmp_path, **settings)
        client = await aiohttp_client(create_app(s, backend=backend))
        backend.gateway_url = str(client.make_url("")).rstrip("/")
        made.append(Ctx(client, backend, keys, s.state_dir))
        return made[-1]

    yield make
    for ctx in made:
        await ctx.client.close()
    made.clear()
    # The hub is garbage now; collect it here, on the thread that made its regorus engine
    # (unsendable), not later in whichever agent thread happens to trigger a collection.
    gc.collect()


@pytest.fixture
async def ctx(make_ctx: Callable[..., Awaitable[Ctx]]) -> AsyncIterator[Ctx]:
    yield await make_ctx()


def ping(to: str, **payload: Any) -> dict[str, Any]:
    return {"type": "request", "to": to, "kind": "ping", "payload": payload}


NOTICE = {"text": "hello"}


# --- identities ---------------------------------------------------------------------------


async def test_container_starts_with_an_svid_bound_to_its_instance(ctx: Ctx) -> None:
    task_id = await ctx.start("echo", {"x": 1}, key="user")
    task = await ctx.task(task_id)
    assert task["state"] == "succeeded"
    (spec,) = ctx.backend.started
    token = spec.env["AGENT_SVID"]  # in the spec handed to the engine: minted before start
    claims = jwt.decode(token, options={"verify_signature": False})
    header = jwt.get_unverified_header(token)
    stored = await ctx.hub.store.get_task(task_id)

    bundle = await (await ctx.client.get("/v1/identity/bundle")).json()

    assert header["alg"] == "ES256"
    assert claims["sub"] == f"spiffe://{TRUST_DOMAIN}/agent/echo"
    assert claims["aud"] == [AUDIENCE]
    assert claims["gw_instance"] == stored.instance_id
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert [k["use"] for k in bundle["keys"]] == ["jwt-svid"]
    assert bundle["keys"][0]["kid"] == header["kid"]
    key = jwt.PyJWK(bundle["keys"][0]).key
    assert jwt.decode(token, key, algorithms=["ES256"], audience=AUDIENCE)["sub"] == claims["sub"]
    assert set(spec.env) == {
        "GATEWAY_URL",
        "AGENT_NAME",
        "AGENT_PORT",
        "AGENT_TASK_ID",
        "AGENT_SVID",
    }


async def test_token_of_a_stopped_container_is_refused(ctx: Ctx) -> None:
    target = await ctx.probe()
    task_id = await ctx.start("echo", {}, key="user")
    inst = await until(lambda: ctx.hub.instances.for_task(task_id), what="echo instance")
    token = ctx.token(inst)
    assert (await ctx.task(task_id))["state"] == "succeeded"
    await until(lambda: ctx.hub.instances.for_task(task_id) is None)

    status, body = await ctx.send(token, ping("probe"))
    renew = await ctx.client.post("/v1/identity/renew", headers=svid_auth(token))

    assert status == 401
    assert body["error"]["code"] == "token_revoked"
    assert "no longer running" in body["error"]["message"]
    assert renew.status == 401
    assert received_by(ctx, target) == []


async def test_renew_gives_a_new_token_for_the_same_instance(ctx: Ctx) -> None:
    probe = await ctx.probe()
    old = ctx.token(probe)

    resp = await ctx.client.post("/v1/identity/renew", headers=svid_auth(old))
    body = await resp.json()

    assert resp.status == 200, body
    new = jwt.decode(body["token"], options={"verify_signature": False})
    before = jwt.decode(old, options={"verify_signature": False})
    assert new["sub"] == before["sub"] == body["spiffe_id"]
    assert new["gw_instance"] == before["gw_instance"] == probe.instance_id
    assert new["jti"] != before["jti"]
    assert body["expires_at"] == new["exp"]
    # The new token works, and it dies with the container like the old one.
    other = await ctx.probe()
    status, reply = await ctx.send(body["token"], ping("probe", n=1))
    assert status == 200, reply
    assert reply["from"]["agent"] == "probe"
    assert len(received_by(ctx, other)) == 1


async def test_renew_needs_a_token_of_this_hub(ctx: Ctx) -> None:
    no_token = await ctx.client.post("/v1/identity/renew")
    api_key = await ctx.client.post("/v1/identity/renew", headers=auth(ctx.keys["user"]))
    assert no_token.status == 401
    assert (await no_token.json())["error"]["code"] == "unauthorized"
    assert (await api_key.json())["error"]["code"] == "invalid_token"


async def test_sdk_renews_before_expiry_and_on_demand(ctx: Ctx) -> None:
    from gateway.sdk import GatewayClient

    probe = await ctx.probe()
    url = ctx.backend.gateway_url
    # renew_before_s above the token's whole lifetime: every use renews first.
    client = GatewayClient(url, ctx.token(probe), renew_before_s=10_000)

    first = await asyncio.to_thread(lambda: client.token)
    explicit = await asyncio.to_thread(client.renew)
    bundle = await asyncio.to_thread(client.bundle)

    assert first != ctx.token(probe)
    assert explicit not in (first, ctx.token(probe))
    assert bundle["keys"][0]["use"] == "jwt-svid"


# --- every bad input: a clear JSON error and nothing routed ---------------------------------


async def test_bad_tokens_are_refused_and_nothing_is_routed(ctx: Ctx) -> None:
    target = await ctx.probe()
    sender = await ctx.probe(expect=0)
    cases = bad_tokens(ctx.state_dir, sender)
    before = len(await ctx.message_decisions())
    for name, (header, code) in cases.items():
        headers = {"Authorization": header} if header is not None else {}
        resp = await ctx.client.post("/v1/messages", json=ping("probe"), headers=headers)
        body = await resp.json()
        assert resp.status == 401, (name, body)
        assert body["error"]["code"] == code, (name, body)
        assert body["error"]["message"], name
        assert resp.headers["WWW-Authenticate"].startswith("Bearer"), name
    assert received_by(ctx, target) == []
    assert len(await ctx.message_decisions()) == before  # refused before policy: no decision
    assert set(cases) >= {
        "no token",
        "malformed",
        "expired",
        "unknown key",
        "alg none",
        "hs256 with the public key as secret",
        "wrong audience",
        "wrong trust domain",
        "missing exp",
    }


async def test_bad_token_messages_name_the_defect(ctx: Ctx) -> None:
    sender = await ctx.probe(expect=0)
    cases = bad_tokens(ctx.state_dir, sender)
    expected = {
        "alg none": "alg 'none' is not allowed",
        "hs256 with the public key as secret": "alg 'HS256' is not allowed",
        "wrong audience": "audience",
        "wrong trust domain": "trust domain 'evil.example' is not trusted",
        "missing exp": "no exp claim",
        "unknown key": "unknown key id",
        "unknown key under our kid": "signature is invalid",
        "expired": "expired",
    }
    for name, fragment in expected.items():
        resp = await ctx.client.post(
            "/v1/messages", json=ping("probe"), headers={"Authorization": cases[name][0] or ""}
        )
        assert fragment in (await resp.json())["error"]["message"], name


@pytest.mark.parametrize(
    ("envelope", "status", "code", "pointer"),
    [
        (ping("ghost"), 404, "unknown_agent", None),
        (
            {"type": "event", "topic": "nobody.listens", "kind": "notice", "payload": NOTICE},
            404,
            "unknown_topic",
            None,
        ),
        (
            {"type": "request", "to": "probe", "kind": "no.such.kind", "payload": {}},
            404,
            "unknown_message_kind",
            None,
        ),
        (
            {"type": "request", "to": "wordstats", "kind": "text.stats", "payload": {"text": 5}},
            400,
            "schema_violation",
            "/payload/text",
        ),
        (
            {
                "type": "event",
                "to": "probe",
                "topic": "notices",
                "kind": "notice",
                "payload": NOTICE,
            },
            400,
            "schema_violation",
            "/to",
        ),
        (
            {"type": "delegate", "to": "echo", "kind": "ping", "payload": {"input": {}}},
            400,
            "schema_violation",
            "/kind",
        ),
        ({"type": "shout", "kind": "ping", "payload": {}}, 400, "schema_violation", "/type"),
        ([1, 2], 400, "schema_violation", ""),
        (ping("calc"), 403, "policy_denied", None),
        ({**ping("probe"), "task_id": "not-in-my-lineage"}, 403, "policy_denied", None),
        (
            {"type": "event", "topic": "notices", "kind": "ping", "payload": {}},
            403,
            "policy_denied",
            None,
        ),
        (ping("echo"), 409, "agent_not_running", None),
    ],
    ids=[
        "unknown agent",
        "unknown topic",
        "unknown kind",
        "payload breaks its schema",
        "event naming a recipient",
        "delegate with another kind",
        "unknown type",
        "not an object",
        "protected target (policy)",
        "task outside the lineage (policy)",
        "kind not allowed on topic (policy)",
        "target not running",
    ],
)
async def test_bad_messages_are_refused_and_nothing_is_routed(
    ctx: Ctx, envelope: Any, status: int, code: str, pointer: str | None
) -> None:
    target = await ctx.probe()
    sender = await ctx.probe(expect=0)

    got, body = await ctx.send(sender, envelope)

    assert got == status, body
    assert body["error"]["code"] == code
    if pointer is not None:
        assert pointer in [d["pointer"] for d in body["error"]["details"]]
    if code == "policy_denied":
        assert body["error"]["details"]["reasons"]
        record = await ctx.hub.decisions.get(body["error"]["decision_id"])
        assert record["kind"] == "message" and record["result"]["allow"] is False
    assert received_by(ctx, target) == []
    assert len(ctx.backend.started) == 2  # no container started for a refused message


async def test_request_timeout_is_504_and_nothing_is_queued(ctx: Ctx) -> None:
    target = await ctx.probe(expect=2)
    sender = await ctx.probe(expect=0)
    status, body = await ctx.send(sender, {**ping("probe", sleep_s=1.5), "timeout_s": 0.3})
    assert status == 504
    assert body["error"]["code"] == "agent_timeout"
    # The late message was handed over once and is not redelivered.
    await asyncio.sleep(1.5)
    assert len(received_by(ctx, target)) == 1


# --- request / reply -------------------------------------------------------------------------


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def test_key_rotation_keeps_issued_tokens_valid(
    ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    old_sender = await ctx.probe(expect=0, hold_s=20)
    target = await ctx.probe(expect=1, hold_s=20)
    old_kid = _kid(ctx.token(old_sender))
    url = str(ctx.client.make_url("/")).rstrip("/")

    refused = await ctx.client.post(
        "/v1/admin/identity/rotate", headers=auth(ctx.keys["developer"])
    )
    assert refused.status == 403
    assert ctx.hub.identities.issuer.kid == old_kid  # a refused call rotated nothing

    rc = await asyncio.to_thread(
        main, ["identity", "rotate", "--url", url, "--key", ctx.keys["operator"]]
    )
    rotated = json.loads(capsys.readouterr().out)
    assert rc == 0
    new_kid = rotated["kid"]
    assert new_kid != old_kid and rotated["previous_kid"] == old_kid
    assert rotated["published"] == [old_kid, new_kid]
    bundle = await (await ctx.client.get("/v1/identity/bundle")).json()
    assert [k["kid"] for k in bundle["keys"]] == [old_kid, new_kid]

    # A token signed before the rotation still sends and renews; what is minted now,
    # for a new container or by a renewal, is signed with the new key.
    status, reply = await ctx.send(old_sender, ping("probe", n=1))
    assert status == 200, reply
    assert reply["reply"] == {"echo": {"n": 1}, "agent": "probe", "task_id": target.task_id}
    renew = await ctx.client.post("/v1/identity/renew", headers=svid_auth(ctx.token(old_sender)))
    renewed = (await renew.json())["token"]
    assert renew.status == 200 and _kid(renewed) == new_kid
    new_sender = await ctx.probe(expect=0, hold_s=20)
    assert _kid(ctx.token(new_sender)) == new_kid
    status, reply = await ctx.send(new_sender, ping("probe", n=2))
    assert status == 200, reply
    assert reply["reply"]["echo"] == {"n": 2}

    # The new key is the signing key after a restart too, and the old one is still trusted.
    issuer = SvidIssuer(ctx.state_dir / "svid-keys", TRUST_DOMAIN, AUDIENCE)
    assert issuer.kid == new_kid
    assert [k["kid"] for k in issuer.jwks()["keys"]] == [old_kid, new_kid]


async def test_request_reply_between_two_running_agents(ctx: Ctx) -> None:
    target = await ctx.probe()
    sender = await ctx.probe(expect=0)

    status, body = await ctx.send(sender, {**ping("probe", n=7), "correlation_id": "c-1"})

    assert status == 200, body
    assert body["reply"] == {"echo": {"n": 7}, "agent": "probe", "task_id": target.task_id}
    assert body["from"] == {"agent": "probe", "spiffe_id": f"spiffe://{TRUST_DOMAIN}/agent/probe"}
    assert body["correlation_id"] == "c-1"
    (got,) = received_by(ctx, target)
    assert got["from_task"] == sender.task_id  # the hub names the sender, not the envelope
    assert got["type"] == "request" and got["payload"] == {"n": 7}
    record = await ctx.hub.decisions.get(body["decision_id"])
    assert record["path"] == "gateway/messages/decision"
    assert record["subject"] == f"spiffe://{TRUST_DOMAIN}/agent/probe"
    assert record["agent"] == "probe"
    assert record["task_id"] == sender.task_id
    source = record["input"]["source"]
    assert source["instance_id"] == sender.instance_id and source["local"] is True
    assert ctx.token(sender) not in json.dumps(record)  # only the verified id reaches policy


def test_example_agents_answer_messages() -> None:
    """echo and wordstats answer through the SDK's @agent.message (no task needed)."""
    message = {
        "type": "request",
        "kind": "text.stats",
        "payload": {"text": "Hubs route. Hubs decide.", "top": 1},
        "from": {"agent": "coordinator", "spiffe_id": "x", "task_id": "t"},
    }
    status, body = load_example("wordstats").handle_message(message)
    assert status == 200
    assert body["reply"]["top_words"] == [{"word": "hubs", "count": 2}]
    status, body = load_example("wordstats").handle_message({**message, "kind": "ping"})
    assert status == 422 and body["error"]["code"] == "bad_kind"
    status, body = load_example("echo").handle_message({**message, "kind": "ping"})
    assert body["reply"]["from"] == "coordinator"


# --- events and broadcasts -------------------------------------------------------------------


async def test_event_reaches_every_running_subscriber_but_the_sender(ctx: Ctx) -> None:
    a, b, c = await ctx.probe(expect=0), await ctx.probe(), await ctx.probe()
    status, body = await ctx.send(
        a, {"type": "event", "topic": "notices", "kind": "notice", "payload": NOTICE}
    )
    assert status == 202, body
    assert body["delivered"] == 2 and body["recipients"] == 2
    for inst in (b, c):
        (got,) = received_by(ctx, inst)
        assert got["topic"] == "notices" and got["from_task"] == a.task_id
    assert received_by(ctx, a) == []


async def test_broadcast_reaches_running_agents_the_policy_allows(ctx: Ctx) -> None:
    a, b = await ctx.probe(expect=0), await ctx.probe()
    status, body = await ctx.send(a, {"type": "broadcast", "kind": "notice", "payload": NOTICE})
    assert status == 202, body
    assert body["delivered"] == 1 and body["refused"] == []
    assert len(body["decision_ids"]) == 1
    assert received_by(ctx, b)[0]["type"] == "broadcast"


# --- tenancy: a message reaches only instances of the sender's owner ---------------------------


@pytest.fixture
def second_tenant(keys: dict[str, str], tmp_path: Path) -> str:
    """A key of another subject ("mallory") with the same roles as "developer" (made before
    the hub starts: list this fixture before ``ctx``)."""
    keys["mallory"] = KeyStore.load(tmp_path / "keys.json").create("mallory", ["user", "developer"])
    return "mallory"


async def test_an_event_reaches_only_the_senders_owner(second_tenant: str, ctx: Ctx) -> None:
    # Before tenancy, any agent's event reached every subscribed instance of any user.
    sender, mine = await ctx.probe(expect=0), await ctx.probe()
    theirs = await ctx.probe(expect=0, key=second_tenant)
    status, body = await ctx.send(
        sender, {"type": "event", "topic": "notices", "kind": "notice", "payload": NOTICE}
    )
    assert status == 202, body
    assert (body["delivered"], body["recipients"]) == (1, 1)
    assert len(received_by(ctx, mine)) == 1
    assert received_by(ctx, theirs) == []
    (record,) = [
        d for d in await ctx.message_decisions() if d["decision_id"] == body["decision_id"]
    ]
    owners = {i["instance_id"]: i["owner"] for i in record["input"]["target"]["instances"]}
    assert owners == {mine.instance_id: "developer", theirs.instance_id: "mallory"}
    assert record["result"]["deliver_to"] == [mine.instance_id]
    assert record["input"]["source"]["owner"] == "developer"


async def test_a_broadcast_skips_other_owners(second_tenant: str, ctx: Ctx) -> None:
    sender, mine = await ctx.probe(expect=0), await ctx.probe()
    theirs = await ctx.probe(expect=0, key=second_tenant)
    status, body = await ctx.send(
        sender, {"type": "broadcast", "kind": "notice", "payload": NOTICE}
    )
    assert status == 202, body
    assert body["delivered"] == 1
    assert received_by(ctx, theirs) == [] and len(received_by(ctx, mine)) == 1


async def test_a_request_to_another_owners_instance_is_not_delivered(
    second_tenant: str, ctx: Ctx
) -> None:
    sender = await ctx.probe(expect=0)
    theirs = await ctx.probe(expect=0, key=second_tenant)
    status, body = await ctx.send(sender, ping("probe", hi=1))
    # The same answer as when no probe runs at all: nothing leaks about other owners.
    assert status == 409, body
    assert body["error"]["code"] == "agent_not_running"
    assert body["error"]["decision_id"]
    assert received_by(ctx, theirs) == []
    # Its own owner's instance answers.
    mine = await ctx.probe()
    status, body = await ctx.send(sender, ping("probe", hi=2))
    assert status == 200, body
    assert len(received_by(ctx, mine)) == 1 and received_by(ctx, theirs) == []


async def test_broadcast_refused_everywhere_is_403(
    make_ctx: Callable[..., Awaitable[Ctx]], config_copy: Callable[[], Path]
) -> None:
    root = config_copy()
    data = json.loads((root / "policies" / "data.json").read_text())
    for route in data["config"]["messages"]["routes"]:
        route["types"] = [t for t in route["types"] if t != "broadcast"]
    (root / "policies" / "data.json").write_text(json.dumps(data))
    ctx = await make_ctx(agents_file=root / "agents.yaml", policies_dir=root / "policies")
    a, b = await ctx.probe(expect=0), await ctx.probe()

    status, body = await ctx.send(a, {"type": "broadcast", "kind": "notice", "payload": NOTICE})

    assert status == 403
    assert body["error"]["code"] == "policy_denied"
    assert list(body["error"]["details"]["refused"]) == ["probe"]
    assert received_by(ctx, b) == []


# --- delegation ------------------------------------------------------------------------------


async def test_delegate_creates_a_linked_child_task_and_returns_its_result(ctx: Ctx) -> None:
    parent = await ctx.probe(expect=0)
    other = await ctx.probe(expect=0)
    envelope = {
        "type": "delegate",
        "to": "echo",
        "kind": "task.delegate",
        "payload": {"input": {"part": 1}, "timeout_s": 10},
    }

    status, body = await ctx.send(parent, envelope, "?wait=10")

    assert status == 200, body
    assert body["state"] == "succeeded"
    assert body["result"] == {"echo": {"part": 1}, "agent": "echo"}
    assert body["parent_id"] == parent.task_id
    child = await ctx.hub.store.get_task(body["task_id"])
    assert child.parent_id == parent.task_id
    assert child.subject == "developer"  # on behalf of the user who started the parent
    assert child.labels is not None
    assert child.labels["delegated_by"] == f"spiffe://{TRUST_DOMAIN}/agent/probe"
    dispatch = await ctx.hub.decisions.get(body["decision_id"])
    assert dispatch["kind"] == "dispatch" and dispatch["input"]["task"]["labels"]["parent_task"]
    message = await ctx.hub.decisions.get(body["message_decision_id"])
    assert message["kind"] == "message" and message["allow"] is True
    # The delegating agent may poll its child with its SVID; another agent may not.
    mine = await ctx.client.get(
        f"/v1/tasks/{body['task_id']}", headers=svid_auth(ctx.token(parent))
    )
    theirs = await ctx.client.get(
        f"/v1/tasks/{body['task_id']}", headers=svid_auth(ctx.token(other))
    )
    assert (await mine.json())["result"] == body["result"]
    assert theirs.status == 404
    assert (await theirs.json())["error"]["code"] == "unknown_task"


async def test_delegate_without_wait_is_202_and_pollable(ctx: Ctx) -> None:
    parent = await ctx.probe(expect=0)
    status, body = await ctx.send(
        parent,
        {"type": "delegate", "to": "echo", "kind": "task.delegate", "payload": {"input": {}}},
    )
    assert status == 202 and body["state"] == "pending"
    resp = await ctx.client.get(
        f"/v1/tasks/{body['task_id']}?wait=10", headers=svid_auth(ctx.token(parent))
    )
    assert (await resp.json())["state"] == "succeeded"


async def test_delegated_input_goes_through_the_dispatch_path(ctx: Ctx) -> None:
    parent = await ctx.probe(expect=0)
    delegate = {"type": "delegate", "to": "wordstats", "kind": "task.delegate"}

    status, bad_input = await ctx.send(parent, {**delegate, "payload": {"input": {"txt": "x"}}})
    denied_status, denied = await ctx.send(
        parent, {**delegate, "payload": {"input": {"text": "x"}, "timeout_s": 1000}}
    )

    assert status == 400 and bad_input["error"]["code"] == "schema_violation"
    assert "/input/text" in [d["pointer"] for d in bad_input["error"]["details"]]
    # The message policy allowed it; the dispatch policy refused the child's timeout.
    assert denied_status == 403 and denied["error"]["code"] == "policy_denied"
    record = await ctx.hub.decisions.get(denied["error"]["decision_id"])
    assert record["kind"] == "dispatch"
    assert "exceeds the agent's limit" in record["result"]["reasons"][0]
    assert [s.labels[LABEL_AGENT] for s in ctx.backend.started] == ["probe"]


async def test_delegation_past_the_depth_limit_is_refused(
    make_ctx: Callable[..., Awaitable[Ctx]],
) -> None:
    ctx = await make_ctx(max_delegation_depth=0)
    parent = await ctx.probe(expect=0)
    status, body = await ctx.send(
        parent,
        {"type": "delegate", "to": "echo", "kind": "task.delegate", "payload": {"input": {}}},
    )
    assert status == 403
    assert body["error"]["code"] == "delegation_too_deep"
    assert body["error"]["details"]["limit"] == 0
    record = await ctx.hub.decisions.get(body["error"]["decision_id"])
    assert record["kind"] == "message" and record["allow"] is False
    assert [s.labels[LABEL_AGENT] for s in ctx.backend.started] == ["probe"]


async def test_a_task_resumed_after_a_restart_keeps_its_lineage_and_roles(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    """A restarted hub re-attaches running containers; what they delegate then must obey
    the same depth limit and carry the same submitter's roles as before the restart."""
    from gateway.http.app import create_app

    released = threading.Event()

    @dataclass
    class HoldingBackend(AgentEnvBackend):
        """The first calc holds its task until the test releases it."""

        held: bool = False

        async def start(self, spec: ContainerSpec) -> ContainerHandle:
            handle = await super().start(spec)
            agent = self.agents[spec.labels[LABEL_TASK]]
            if spec.labels[LABEL_AGENT] == "calc" and not self.held:
                self.held = True
                run = agent._task

                def held(input: Any, ctx: Any) -> Any:
                    released.wait(30)
                    return run(input, ctx)

                agent._task = held
            return handle

    backend = HoldingBackend()
    settings = make_settings(tmp_path, max_delegation_depth=1, probe_interval_s=0)

    async def hub() -> Ctx:
        client = await aiohttp_client(create_app(settings, backend=backend))
        backend.gateway_url = str(client.make_url("")).rstrip("/")
        return Ctx(client, backend, keys, settings.state_dir)

    async def keep_containers() -> None:
        """The engine's containers outlive the hub."""

    try:
        ctx = await hub()
        root = await ctx.probe(expect=0, hold_s=30)
        status, body = await ctx.send(
            root,
            {
                "type": "delegate",
                "to": "calc",
                "kind": "task.delegate",
                "payload": {"input": {"expression": "1"}},
            },
        )
        assert status == 202, body
        child = await ctx.running(body["task_id"])
        assert child.depth == 1 and "developer" in root.subject.roles

        backend.close = keep_containers  # type: ignore[method-assign]
        await ctx.client.close()
        del backend.close
        ctx = await hub()
        assert ctx.hub.last_recovery is not None
        assert sorted(ctx.hub.last_recovery.reattached) == sorted([root.task_id, child.task_id])
        root_again = await ctx.running(root.task_id)
        child_again = await ctx.running(child.task_id)

        assert child_again.instance_id == child.instance_id
        assert child_again.lineage == child.lineage
        assert root_again.subject.roles == root.subject.roles
        # The re-attached child (with the token its container kept) is still at the limit...
        status, body = await ctx.send(
            child,
            {"type": "delegate", "to": "echo", "kind": "task.delegate", "payload": {"input": {}}},
        )
        assert status == 403 and body["error"]["code"] == "delegation_too_deep", body
        # ...and the root still acts for a developer, who alone may run code.eval.
        status, body = await ctx.send(
            root,
            {
                "type": "delegate",
                "to": "calc",
                "kind": "task.delegate",
                "payload": {"input": {"expression": "2+3"}},
            },
            "?wait=10",
        )
        assert status == 200, body
        assert body["state"] == "succeeded" and body["result"]["value"] == 5
        released.set()
        assert (await ctx.task(child.task_id))["result"]["value"] == 1
        await ctx.client.close()
    finally:
        released.set()
        await FakeBackend.close(backend)
        gc.collect()


def test_a_revoked_key_gives_a_resumed_task_no_roles(tmp_path: Path) -> None:
    from gateway.identity.apikeys import KeyStore

    store = KeyStore(tmp_path / "keys.json")
    store.create("dev", ["developer"])
    (key_id,) = [r.id for r in store._records.values()]

    assert store.subject_of(key_id, "dev").roles == ("developer",)
    assert store.subject_of(key_id, "someone-else").roles == ()  # not the key's subject
    KeyStore(tmp_path / "keys.json", {}).save()  # the key is revoked (file rewritten)
    time.sleep(0.01)
    assert store.subject_of(key_id, "dev").roles == ()
    assert store.subject_of(None, "dev").roles == ()  # a task from before key ids were kept


async def test_depth_limit_applies_down_a_real_chain(
    make_ctx: Callable[..., Awaitable[Ctx]],
) -> None:
    """probe -> coordinator (depth 1) -> wordstats (depth 2) with a limit of 1."""
    ctx = await make_ctx(max_delegation_depth=1)
    parent = await ctx.probe(expect=0)
    status, body = await ctx.send(
        parent,
        {
            "type": "delegate",
            "to": "coordinator",
            "kind": "task.delegate",
            "payload": {"input": {"text": "One two. Three four.", "parts": 2}},
        },
        "?wait=20",
    )
    assert status == 200, body
    assert body["state"] == "failed"
    agent_error = body["error"]["details"]["agent_error"]
    assert agent_error["code"] == "delegation_failed"
    assert "exceeds the hub's limit of 1" in agent_error["message"]
    assert "wordstats" not in [s.labels[LABEL_AGENT] for s in ctx.backend.started]


async def test_coordinator_delegates_parts_and_reports_later(ctx: Ctx) -> None:
    text = (
        "Policy decides everything. The hub asks policy first. "
        "Containers are cheap. Policy is code in git."
    )
    task_id = await ctx.start("coordinator", {"text": text, "parts": 2, "top": 2}, key="user")
    task = await ctx.task(task_id, wait=30)

    assert task["state"] == "succeeded", task
    result = task["result"]
    assert result["parts"] == 2
    assert result["words"] == 16 and result["sentences"] == 4
    assert result["top_words"] == [{"word": "policy", "count": 3}, {"word": "asks", "count": 1}]
    children = [await ctx.hub.store.get_task(c) for c in result["children"]]
    assert {c.agent for c in children} == {"wordstats"}
    assert {c.parent_id for c in children} == {task_id}
    assert all(c.subject == "user" for c in children)
    assert [h["state"] for h in task["history"]][-2:] == ["running", "succeeded"]


# --- results reported later ------------------------------------------------------------------


async def test_result_from_a_container_that_does_not_own_the_task_is_refused(ctx: Ctx) -> None:
    owner = await ctx.probe(expect=1)
    intruder = await ctx.probe(expect=0)
    resp = await ctx.client.post(
        f"/v1/tasks/{owner.task_id}/result",
        json={"output": {"results": [], "received": []}},
        headers=svid_auth(ctx.token(intruder)),
    )
    body = await resp.json()
    assert resp.status == 403
    assert body["error"]["code"] == "not_task_owner"
    unknown = await ctx.client.post(
        "/v1/tasks/no-such-task/result",
        json={"output": {}},
        headers=svid_auth(ctx.token(intruder)),
    )
    assert (await unknown.json())["error"]["code"] == "not_task_owner"
    assert (await ctx.hub.store.get_task(owner.task_id)).state == "running"


async def test_owner_reports_its_result_and_the_output_schema_applies(ctx: Ctx) -> None:
    good = await ctx.probe(expect=1)
    bad = await ctx.probe(expect=1)
    url = "/v1/tasks/{}/result"

    ok = await ctx.client.post(
        url.format(good.task_id),
        json={"output": {"results": [], "received": [{"early": True}]}},
        headers=svid_auth(ctx.token(good)),
    )
    wrong = await ctx.client.post(
        url.format(bad.task_id),
        json={"output": {"nope": 1}},
        headers=svid_auth(ctx.token(bad)),
    )

    assert ok.status == 200, await ok.json()
    assert (await ok.json())["state"] == "succeeded"
    assert (await ctx.task(good.task_id))["result"]["received"] == [{"early": True}]
    body = await wrong.json()
    assert wrong.status == 400 and body["error"]["code"] == "schema_violation"
    assert "/output/results" in [d["pointer"] for d in body["error"]["details"]]
    failed = await ctx.task(bad.task_id)
    assert failed["state"] == "failed"
    assert failed["error"]["code"] == "output_schema_violation"


async def test_malformed_result_report_is_400(ctx: Ctx) -> None:
    owner = await ctx.probe(expect=1)
    resp = await ctx.client.post(
        f"/v1/tasks/{owner.task_id}/result",
        json={"output": {}, "error": {"code": "x", "message": "y"}},
        headers=svid_auth(ctx.token(owner)),
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "schema_violation"
    assert (await ctx.hub.store.get_task(owner.task_id)).state == "running"


# --- trust bundles of other domains ----------------------------------------------------------


async def test_svid_from_a_configured_trust_bundle_is_verified_then_policy_decides(
    make_ctx: Callable[..., Awaitable[Ctx]], tmp_path: Path, config_copy: Callable[[], Path]
) -> None:
    partner = SvidIssuer(tmp_path / "partner-keys", "partner.example", AUDIENCE)
    bundle = tmp_path / "partner.jwks.json"
    bundle.write_text(json.dumps(partner.jwks()))
    root = config_copy()
    data = json.loads((root / "policies" / "data.json").read_text())
    data["config"]["messages"]["external_senders"] = ["spiffe://partner.example/agent/planner"]
    # An external sender runs no task of ours, so it has no owner: reaching one of our
    # instances crosses owners and needs a rule that says so.
    data["config"]["messages"]["cross_owner"] = [
        {"from": ["planner"], "to": ["probe"], "types": ["request"]}
    ]
    (root / "policies" / "data.json").write_text(json.dumps(data))
    ctx = await make_ctx(
        trust_bundles=(("partner.example", bundle),),
        agents_file=root / "agents.yaml",
        policies_dir=root / "policies",
    )
    target = await ctx.probe(expect=3)
    # As a SPIRE server would issue them: no claim naming one of our instances.
    key = next((tmp_path / "partner-keys").glob("*.pem"))
    signing = serialization.load_pem_private_key(key.read_bytes(), password=None)

    def token(agent: str) -> str:
        body = claims(agent, sub=f"spiffe://partner.example/agent/{agent}", gw_instance=None)
        return jwt.encode(body, signing, algorithm="ES256", headers={"kid": partner.kid})

    listed, unlisted = token("planner"), token("mallory")

    status, body = await ctx.send(listed, ping("probe", hi=1))
    denied_status, denied = await ctx.send(unlisted, ping("probe"))

    assert status == 200, body
    assert received_by(ctx, target)[0]["from"] == "planner"
    assert denied_status == 403
    assert denied["error"]["details"]["reasons"] == [
        'sender "spiffe://partner.example/agent/mallory" is neither a container of this hub '
        "nor a trusted external sender"
    ]
    record = await ctx.hub.decisions.get(denied["error"]["decision_id"])
    assert record["input"]["source"]["local"] is False
    assert record["input"]["source"]["instance_id"] is None
    # Another domain's token naming one of our live instances does not borrow its task.
    posing = partner.mint("planner", target.instance_id).token
    posing_status, posing_body = await ctx.send(posing, ping("probe"))
    assert posing_status == 200, posing_body
    assert received_by(ctx, target)[-1]["from_task"] is None


def test_policy_directory_without_messages_policy_is_refused(tmp_path: Path) -> None:
    from gateway.bundle.config import load_config
    from gateway.errors import ConfigError

    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    (policies / "messages.rego").unlink()
    (policies / "messages_test.rego").unlink()
    with pytest.raises(ConfigError, match=r"data\.gateway\.messages\.decision"):
        load_config(
            agents_file=REPO / "agents.yaml", schemas_dir=REPO / "schemas", policies_dir=policies
        )


def test_agent_endpoints_are_documented_and_described() -> None:
    from gateway.http.agent_openapi import agent_paths
    from gateway.http.agent_routes import routes

    readme = (REPO / "README.md").read_text()
    paths = agent_paths(max_wait_s=60.0)
    for route in routes:
        path = re.sub(
            r"\{(\w+)\}",
            lambda m: "{" + ("id" if m.group(1).endswith("_id") else m.group(1)) + "}",
            route.path,
        )
        assert f"{route.method} {path}" in readme, f"{route.method} {route.path}"
        assert route.method.lower() in paths[route.path], route.path
