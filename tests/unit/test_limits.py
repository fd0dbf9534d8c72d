"""Quotas and rate limits (limits.yaml): real hub, real SQLite, real policies, fake engine.

What must hold: a refused call gets 429 with Retry-After and the IETF RateLimit fields, and
it is refused before any policy evaluation or decision-log write, so a flood grows neither
the decision log nor the task table; quotas count what runs and survive a restart; an
invalid limits file is refused with file:line and the last good one stays in force.
"""

from __future__ import annotations

import asyncio
import gc
import math
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.bundle.schemas import SchemaSet
from gateway.cli import main
from gateway.errors import ConfigError, TooManyRequests
from gateway.http.app import HUB, create_app
from gateway.hub import Hub
from gateway.identity.apikeys import Subject
from gateway.limits import (
    NO_LIMITS,
    BucketTable,
    InstanceLimits,
    Limiter,
    Limits,
    Rate,
    SubjectLimits,
    load_limits,
)
from gateway.limits.limiter import LOG_EVERY_S
from gateway.limits.quotas import SubjectQuotas
from gateway.store import Store
from tests.conftest import REPO, FakeBackend, auth, make_settings

pytestmark = pytest.mark.timeout(120)

ECHO = {"capability": "debug.echo", "input": {"hello": "world"}}
SPIN = {"capability": "code.eval", "input": {"expression": "1", "spin_s": 30}}
SCHEMAS = SchemaSet.load(REPO / "schemas")


@pytest.fixture
def frozen_gc() -> Any:
    """Keep the objects made before a flood out of the garbage collector's full rounds.

    asyncio's debug mode (the blocking check of tests/conftest.py) keeps a traceback per
    task and future; with thousands of requests a full collection of this process took 0.3
    to 0.7 s (measured), inside whichever callback it fell in.
    """
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def write_limits(tmp_path: Path, text: str, name: str = "limits.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def hub_client(aiohttp_client: Any, tmp_path: Path, limits: str, **settings: Any) -> Any:
    settings.setdefault("probe_interval_s", 0)
    settings.setdefault("reload_poll_s", 0)
    s = make_settings(tmp_path, limits_file=write_limits(tmp_path, limits), **settings)
    backend = FakeBackend()
    client = await aiohttp_client(create_app(s, backend=backend))
    return client, backend


async def count_rows(hub: Hub, table: str) -> int:
    return await hub.store.read(
        lambda db: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    )


async def until(predicate: Any, what: str, within_s: float = 15) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def assert_limited(status: int, headers: Any, body: dict[str, Any], limit: str) -> int:
    """A proper refusal by ``limit``; returns its Retry-After."""
    assert status == 429, body
    assert body["error"]["code"] == "too_many_requests"
    assert body["error"]["details"]["limit"] == limit
    retry = headers["Retry-After"]
    assert retry.isdigit() and int(retry) >= 1
    assert headers["RateLimit-Policy"].startswith(f'"{limit}";q=')
    assert headers["RateLimit"] == f'"{limit}";r=0;t={retry}'
    return int(retry)


# --- the file ---------------------------------------------------------------------------

FILE = """\
version: 1
subjects:
  default:
    requests: {rate: 10, burst: 20}
    submit: {rate: 1, burst: 5}
    pending: 10
    running: 2
  roles:
    operator: {requests: null}
    batch: {submit: {rate: 5, burst: 2}, pending: 50}
    bulk: {submit: {rate: 2, burst: 30}}
  ids:
    ci-bot: {pending: 500, running: null}
instances:
  default:
    messages: {rate: 20, burst: 40}
  agents:
    probe: {messages: null}
hub:
  long_polls: 100
"""


@pytest.mark.parametrize(
    ("subject", "roles", "expected"),
    [
        # Nothing matches: the default, whole.
        ("alice", (), SubjectLimits(Rate(10, 20), Rate(1, 5), 10, 2)),
        # A role's null is unlimited; what it leaves out is inherited.
        ("olga", ("operator",), SubjectLimits(None, Rate(1, 5), 10, 2)),
        # Several roles: the most generous value of each field, rate and burst apart.
        ("bo", ("batch", "bulk"), SubjectLimits(Rate(10, 20), Rate(5, 30), 50, 2)),
        # An id entry wins over roles, field by field.
        ("ci-bot", ("batch",), SubjectLimits(Rate(10, 20), Rate(5, 2), 500, None)),
        # An anonymous caller gets the default.
        (None, (), SubjectLimits(Rate(10, 20), Rate(1, 5), 10, 2)),
    ],
    ids=["default", "role null", "two roles", "id over role", "anonymous"],
)
def test_limits_resolve_field_by_field(
    tmp_path: Path, subject: str | None, roles: tuple[str, ...], expected: SubjectLimits
) -> None:
    limits = load_limits(write_limits(tmp_path, FILE), SCHEMAS)
    assert limits.for_subject(subject, roles) == expected
    assert limits.for_instance("echo").messages == Rate(20, 40)
    assert limits.for_instance("probe").messages is None
    assert limits.long_polls == 100
    assert not NO_LIMITS.enabled and limits.enabled


def test_the_shipped_limits_file_loads() -> None:
    limits = load_limits(REPO / "limits.yaml", SCHEMAS)
    assert limits.default.submit is not None and limits.default.pending is not None
    assert limits.long_polls is not None


@pytest.mark.parametrize(
    ("text", "location", "reason"),
    [
        (FILE.replace("burst: 5}", "burst: 0}"), "limits.yaml:5", "/subjects/default/submit/burst"),
        (
            FILE.replace("pending: 10", "pending: many"),
            "limits.yaml:6",
            "/subjects/default/pending",
        ),
        (FILE.replace("rate: 20, ", ""), "limits.yaml:16", '"rate" is a required property'),
        (FILE + "colour: blue\n", "limits.yaml:21", "Additional properties"),
        (FILE.replace("  long_polls: 100", "  long_polls: [100"), "limits.yaml:21:1", "YAML"),
        ("", "limits.yaml:1", "empty"),
    ],
    ids=["zero burst", "wrong type", "missing rate", "unknown field", "yaml syntax", "empty"],
)
def test_an_invalid_file_is_refused_with_its_line(
    tmp_path: Path, text: str, location: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_limits(write_limits(tmp_path, text), SCHEMAS)
    assert caught.value.location == location
    assert reason in caught.value.message


def test_check_command_validates_the_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_limits(tmp_path, FILE)
    assert main(["check", "--limits", str(good)]) == 0
    assert "limits:   limits.yaml ok" in capsys.readouterr().out
    bad = write_limits(tmp_path, FILE.replace("pending: 10", "pending: -1"), "bad.yaml")
    assert main(["check", "--limits", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml:6" in err and "/subjects/default/pending" in err


# --- buckets ------------------------------------------------------------------------------


def test_a_bucket_refills_at_its_rate_and_says_when() -> None:
    now = [100.0]
    table = BucketTable(clock=lambda: now[0])
    rate = Rate(2, 3)
    assert [table.take("submit", "k", rate).ok for _ in range(4)] == [True, True, True, False]
    refused = table.take("submit", "k", rate)
    assert refused.retry_after_s == pytest.approx(0.5)
    now[0] += 0.5
    assert table.take("submit", "k", rate).ok
    assert not table.take("submit", "k", rate).ok
    # Other keys and other limits have buckets of their own.
    assert table.take("submit", "other", rate).ok and table.take("requests", "k", rate).ok
    # Full again after burst / rate: swept as if never seen.
    now[0] += 2
    assert table.sweep() == 3 and len(table) == 0


def test_the_table_forgets_refilled_buckets_of_a_flood_of_keys() -> None:
    now = [0.0]
    table = BucketTable(clock=lambda: now[0], sweep_at=100)
    for i in range(1000):
        table.take("requests", f"addr:{i}", Rate(100, 1))
        now[0] += 0.02  # each one is full again 10 ms after its take
    assert len(table) <= 100


def test_refusals_are_counted_and_sampled_into_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    counted: list[str] = []
    limits = Limits(instance_default=InstanceLimits(messages=Rate(0.001, 1)), source="t.yaml")
    limiter = Limiter(limits=lambda: limits, observe=counted.append, clock=lambda: now[0])
    limiter.message("i-1", "echo")  # the one token
    for _ in range(500):
        with pytest.raises(TooManyRequests):
            limiter.message("i-1", "echo")
    now[0] += LOG_EVERY_S
    with pytest.raises(TooManyRequests):
        limiter.message("i-1", "echo")
    lines = [r for r in caplog.records if r.getMessage() == "requests refused by a limit"]
    assert counted == ["messages"] * 501
    # One line for the first refusal, one ten seconds later standing for the 500 since.
    assert [(r.limit, r.refused) for r in lines] == [("messages", 1), ("messages", 500)]  # type: ignore[attr-defined]


# --- through the hub ------------------------------------------------------------------------

BURST = """\
version: 1
subjects:
  default:
    submit: {rate: 2, burst: 10}
"""


async def test_a_flood_of_submissions_is_refused_before_policy_and_log(
    tmp_path: Path,
    keys: dict[str, str],
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
    frozen_gc: None,
) -> None:
    client, _ = await hub_client(aiohttp_client, tmp_path, BURST)
    hub: Hub = client.app[HUB]
    decisions_before = await count_rows(hub, "decisions")
    tasks_before = await count_rows(hub, "tasks")
    statuses: list[int] = []
    refusals: list[tuple[Any, dict[str, Any]]] = []

    url = str(client.make_url("/v1/tasks"))

    # A session of our own: the test client keeps every response until the test ends.
    async with aiohttp.ClientSession(headers=auth(keys["user"])) as http:

        async def one() -> None:
            async with http.post(url, json=ECHO) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    refusals.append((resp.headers, await resp.json()))
                else:
                    await resp.read()

        started = time.monotonic()
        for _ in range(0, 5000, 100):
            await asyncio.gather(*(one() for _ in range(100)))
        elapsed = time.monotonic() - started

    accepted = statuses.count(202) + statuses.count(200)
    assert accepted + statuses.count(429) == 5000, sorted(set(statuses))
    # The burst, then the refill rate, and not one more.
    assert 10 <= accepted <= 10 + math.ceil(2 * elapsed) + 1, (accepted, elapsed)
    headers, body = refusals[0]
    assert_limited(429, headers, body, "submit")
    assert headers["RateLimit-Policy"] == '"submit";q=10;w=5'
    assert body["error"]["details"]["rate"] == 2 and body["error"]["details"]["burst"] == 10
    # Refused before the API policy and the dispatch policy: only the accepted ones were
    # decided (one API and one dispatch record each), and only they have a task row.
    assert await count_rows(hub, "decisions") - decisions_before == 2 * accepted
    assert await count_rows(hub, "tasks") - tasks_before == accepted
    assert hub.mode == "normal"
    metrics = hub.metrics.render().decode()
    assert f'gateway_rate_limited_total{{limit="submit"}} {len(refusals)}.0' in metrics
    lines = [r for r in caplog.records if r.getMessage() == "requests refused by a limit"]
    assert 1 <= len(lines) <= elapsed / 10 + 1
    # Another subject has a bucket of its own.
    other = await client.post("/v1/tasks", json=ECHO, headers=auth(keys["developer"]))
    assert other.status == 202, await other.text()


QUOTA = """\
version: 1
subjects:
  default:
    pending: 2
    running: 1
"""


async def test_pending_quota_with_one_running_slot(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    client, backend = await hub_client(aiohttp_client, tmp_path, QUOTA)
    hub: Hub = client.app[HUB]
    dev = auth(keys["developer"])  # code.eval (a task that runs until cancelled) needs it

    async def submit(
        headers: dict[str, str] = dev, body: dict[str, Any] = SPIN
    ) -> tuple[int, Any, dict[str, Any]]:
        resp = await client.post("/v1/tasks", json=body, headers=headers)
        return resp.status, resp.headers, await resp.json()

    status, _, first = await submit()
    assert status == 202, first
    await until(lambda: len(backend.servers) == 1, "the first task's container")
    # The subject's one running slot is taken: the next two wait, as pending.
    waiting = [await submit(), await submit()]
    assert [s for s, _, _ in waiting] == [202, 202]
    assert hub.router.quotas.pending_of("developer") == 2
    assert hub.router.quotas.running_of("developer") == 1
    decisions = await count_rows(hub, "decisions")
    tasks = await count_rows(hub, "tasks")

    status, headers, body = await submit()
    assert assert_limited(status, headers, body, "pending") == 2
    assert headers["RateLimit-Policy"] == '"pending";q=2'
    assert body["error"]["details"]["quota"] == 2 and body["error"]["details"]["pending"] == 2
    assert await count_rows(hub, "decisions") == decisions
    assert await count_rows(hub, "tasks") == tasks
    assert len(backend.servers) == 1  # nothing else started: the slot is still taken
    # Another subject has quotas of its own.
    status, _, body = await submit(auth(keys["user"]), ECHO)
    assert status == 202, body

    # The running task ends: one waiting task takes the slot, and a pending slot frees.
    await client.delete(f"/v1/tasks/{first['task_id']}", headers=dev)
    await until(lambda: hub.router.quotas.pending_of("developer") == 1, "a waiting task to start")
    assert hub.router.quotas.running_of("developer") == 1
    status, _, body = await submit()
    assert status == 202, body


async def test_pending_counts_are_rebuilt_from_the_store_after_a_restart(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    # Running 0: nothing of this subject ever runs, so what is pending stays pending.
    limits = write_limits(tmp_path, "version: 1\nsubjects: {default: {pending: 2, running: 0}}\n")
    settings = make_settings(tmp_path, probe_interval_s=0, reload_poll_s=0, limits_file=limits)
    store = Store(settings.db_path)
    for n in range(2):  # left pending by a hub that died
        await store.create_task(
            {
                "id": str(uuid.uuid4()),
                "agent": "echo",
                "subject": "user",
                "input": {"n": n},
                "timeout_s": 60.0,
                "deadline": time.time() + 60,
                "decision_id": f"d-{n}",
                "sandbox": {"network": "internal", "mounts": []},
                "attempts": 0,
            }
        )
    await store.close()

    hub = Hub(settings, backend=FakeBackend())
    await hub.start()
    try:
        assert hub.last_recovery is not None and len(hub.last_recovery.redispatched) == 2
        assert hub.router.quotas.pending_of("user") == 2
        subject = hub.keys.authenticate(keys["user"])
        with pytest.raises(TooManyRequests) as refused, hub.limiter.submission(subject, None):
            pass
        assert refused.value.details["limit"] == "pending"
    finally:
        await hub.stop()


# Running 0: the polled task waits, pending, until it is cancelled (no container at all).
LONG_POLLS = """\
version: 1
subjects:
  default:
    running: 0
hub:
  long_polls: 100
"""


async def test_long_polls_are_capped_and_the_excess_is_refused_at_once(
    tmp_path: Path, keys: dict[str, str], frozen_gc: None
) -> None:
    settings = make_settings(
        tmp_path,
        probe_interval_s=0,
        reload_poll_s=0,
        limits_file=write_limits(tmp_path, LONG_POLLS),
        port=free_port(),
    )
    backend = FakeBackend()
    app = create_app(settings, backend=backend)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # A listen backlog for 1,000 connections arriving at once (the default is 128).
    await web.TCPSite(runner, "127.0.0.1", settings.port, backlog=2048).start()
    hub: Hub = app[HUB]
    base = f"http://127.0.0.1:{settings.port}"
    user = auth(keys["user"])
    refused: list[float] = []
    try:
        # No client-side connection limit: every poll has a connection of its own.
        async with aiohttp.ClientSession(
            base, headers=user, connector=aiohttp.TCPConnector(limit=0)
        ) as http:
            async with http.post("/v1/tasks", json={**ECHO, "timeout_s": 30}) as resp:
                submitted = await resp.json()
                assert resp.status == 202, submitted
                task_id = submitted["task_id"]

            async def poll() -> tuple[int, Any]:
                sent = time.monotonic()
                async with http.get(f"/v1/tasks/{task_id}?wait=30") as r:
                    body = await r.json()
                    if r.status == 429:
                        assert_limited(r.status, r.headers, body, "long_polls")
                        refused.append(time.monotonic() - sent)
                    return r.status, body

            polls = []
            for _ in range(10):
                # In waves of 100: a thousand connections accepted in one callback hold the
                # loop for seconds in debug mode; all of them are still in flight together.
                polls += [asyncio.create_task(poll()) for _ in range(100)]
                await asyncio.sleep(0.05)
            # The excess is refused while the 100 admitted polls are still waiting...
            await until(lambda: sum(p.done() for p in polls) >= 900, "900 answers", within_s=90)
            failed = [p.exception() for p in polls if p.done() and p.exception()]
            assert not failed, failed[:3]
            assert len(refused) == 900
            assert hub.limiter.long_polls == 100
            assert not any(p.done() and p.result()[0] != 429 for p in polls)
            # ...and those complete when the task ends.
            async with http.delete(f"/v1/tasks/{task_id}") as resp:
                assert resp.status == 200
            results = await asyncio.gather(*polls)
    finally:
        await runner.cleanup()
    codes = [code for code, _ in results]
    assert codes.count(429) == 900 and codes.count(200) == 100
    assert {body["state"] for code, body in results if code == 200} == {"cancelled"}
    assert hub.limiter.long_polls == 0
    assert max(refused) < 30  # none of them waited


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MESSAGES = """\
version: 1
instances:
  default:
    messages: {rate: 0.001, burst: 5}
"""


async def test_each_instance_has_its_own_message_bucket(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    client, _ = await hub_client(aiohttp_client, tmp_path, MESSAGES)
    hub: Hub = client.app[HUB]

    async def probe() -> str:
        resp = await client.post(
            "/v1/tasks",
            json={"agent": "probe", "input": {"hold_s": 20}},
            headers=auth(keys["developer"]),
        )
        task_id = (await resp.json())["task_id"]
        inst = await until(
            lambda: (i := hub.instances.for_task(task_id)) and i.handle and i, "the probe"
        )
        return str(inst.env["AGENT_SVID"])

    flooder, other = await probe(), await probe()
    denied = {"type": "request", "to": "calc", "kind": "ping", "payload": {}}

    async def send(token: str) -> tuple[int, Any, dict[str, Any]]:
        resp = await client.post(
            "/v1/messages", json=denied, headers={"Authorization": f"Bearer {token}"}
        )
        return resp.status, resp.headers, await resp.json()

    before = await count_rows(hub, "decisions")
    results = await asyncio.gather(*(send(flooder) for _ in range(200)))
    codes = [code for code, _, _ in results]
    # The policy denies these (403, logged) until the bucket is empty; then 429, unlogged.
    assert codes.count(403) == 5 and codes.count(429) == 195, codes
    status, headers, body = next(r for r in results if r[0] == 429)
    assert_limited(status, headers, body, "messages")
    assert headers["RateLimit-Policy"] == '"messages";q=5;w=5000'
    assert await count_rows(hub, "decisions") - before == 5
    # The other instance's bucket is its own.
    assert (await send(other))[0] == 403


async def test_idempotency_keys_expire_and_are_pruned_by_the_monitor(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    settings = make_settings(tmp_path, probe_interval_s=0, idempotency_ttl_s=0.5)
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    hub: Hub = client.app[HUB]

    async def submit(key: str) -> tuple[str, bool]:
        headers = {**auth(keys["user"]), "Idempotency-Key": key}
        resp = await client.post("/v1/tasks", json=ECHO, headers=headers)
        assert resp.status in (200, 202), await resp.text()
        return (await resp.json())["task_id"], resp.headers.get("Idempotent-Replayed") == "true"

    first, replayed = await submit("k1")
    assert not replayed
    assert await submit("k1") == (first, True)
    await asyncio.sleep(0.6)
    # Expired: the key no longer replays, even before the monitor prunes it.
    again, replayed = await submit("k1")
    assert again != first and not replayed
    await submit("k2")
    assert await count_rows(hub, "idempotency") == 2
    await asyncio.sleep(0.6)
    await hub.monitor.tick()
    assert await count_rows(hub, "idempotency") == 0
    assert await count_rows(hub, "tasks") == 3  # the tasks stay


async def test_an_invalid_limits_file_at_start_means_degraded_with_the_reason(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    client, _ = await hub_client(aiohttp_client, tmp_path, BURST.replace("rate: 2", "rate: 0"))
    hub: Hub = client.app[HUB]
    assert hub.mode == "degraded"
    assert "limits.yaml:4" in hub.degraded_reasons["policy"]
    assert "/subjects/default/submit/rate" in hub.degraded_reasons["policy"]
    resp = await client.post("/v1/tasks", json=ECHO, headers=auth(keys["user"]))
    assert resp.status == 503
    # Fixed on disk: the next monitor round loads it.
    write_limits(tmp_path, BURST)
    await hub.monitor.tick()
    assert hub.mode == "normal"
    assert hub.config.limits.for_subject("user").submit == Rate(2, 10)


async def test_a_reload_refuses_an_invalid_limits_file_and_keeps_the_old_limits(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    one = "version: 1\nsubjects:\n  default:\n    submit: {rate: 0.01, burst: 1}\n"
    client, _ = await hub_client(aiohttp_client, tmp_path, one)
    hub: Hub = client.app[HUB]
    user, operator = auth(keys["user"]), auth(keys["operator"])
    assert (await client.post("/v1/tasks", json=ECHO, headers=user)).status == 202
    assert (await client.post("/v1/tasks", json=ECHO, headers=user)).status == 429

    write_limits(tmp_path, one.replace("burst: 1", "burst: 1, colour: red"))
    resp = await client.post("/v1/admin/reload", headers=operator)
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"]["details"]["location"] == "limits.yaml:4"
    # The old limits stay in force.
    assert (await client.post("/v1/tasks", json=ECHO, headers=user)).status == 429

    write_limits(tmp_path, one.replace("burst: 1", "burst: 50"))
    resp = await client.post("/v1/admin/reload", headers=operator)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["revisions"]["limits"].endswith(
        hub.config.limits_revision.rpartition("+")[2]
    )
    # The same bucket, with its new size: it refills from what the caller had used.
    assert hub.config.limits.for_subject("user").submit == Rate(0.01, 50)


async def test_without_a_limits_file_nothing_is_limited(
    fake_hub: Any, keys: dict[str, str]
) -> None:
    client, _ = fake_hub
    hub: Hub = client.app[HUB]
    assert not hub.config.limits.enabled and "limits" not in hub.revisions()
    codes = [(await client.get("/v1/tasks", headers=auth(keys["user"]))).status for _ in range(300)]
    assert set(codes) == {200}


async def test_a_reservation_takes_a_free_slot_at_once_and_is_taken_up_or_given_back() -> None:
    """A warm placement at submission reserves the subject's running quota and a hub slot
    without waiting; the runner takes it up, and one never taken up is given back."""
    quotas = SubjectQuotas()
    quotas.running_limit = lambda subject: 1
    slots = asyncio.Semaphore(2)
    alice, bob = Subject("alice", ("user",), "k1"), Subject("bob", ("user",), "k2")
    assert await quotas.reserve("t1", alice, slots)
    assert quotas.running_of("alice") == 1 and slots._value == 1
    assert not await quotas.reserve("t2", alice, slots)  # alice's quota is full
    assert quotas.running_of("alice") == 1 and slots._value == 1
    # Taken up by t1's runner: no wait, no second count; released when the run ends.
    quotas.enter("t1", "alice")
    async with asyncio.timeout(0.5):
        async with quotas.slot("t1", alice, slots):
            assert quotas.running_of("alice") == 1 and slots._value == 1
            assert quotas.pending_of("alice") == 0
    quotas.leave("t1")
    assert quotas.running_of("alice") == 0 and slots._value == 2
    # Given back when its task was not created, or when its runner ended before taking it.
    assert await quotas.reserve("t3", bob, slots)
    quotas.unreserve("t3")
    assert await quotas.reserve("t4", alice, slots)
    quotas.enter("t4", "alice")
    quotas.leave("t4")
    assert quotas.running_of("alice") == quotas.running_of("bob") == 0 and slots._value == 2
    # No hub slot free: no reservation, whatever the quota.
    assert await quotas.reserve("t5", bob, slots) and await quotas.reserve("t6", alice, slots)
    assert not await quotas.reserve("t7", Subject("carol", ("user",), "k3"), slots)
