"""PostgreSQL restarted under load: two real hubs (HTTP API, policies, routers, cluster
membership) on one real PostgreSQL server that is stopped and started again (same data
directory) while a stream of submissions runs through both hubs. Agents run in-process (the
fake engine both hubs share, as in test_cluster_hubs.py); the server, the store, the hubs'
probes, leases and takeover are the real ones.

What must hold: both hubs go degraded with the store as the cause while the server is down
and come back to normal by themselves; a submission meanwhile gets 503 with Retry-After,
never 500; every submission that was accepted (200/202) ends exactly once with its exact
result, once per Idempotency-Key; a hub that was alive all along keeps its tasks (an outage
longer than the lease expires every lease, but no hub takes over a live peer's tasks); the
decision log verifies.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.containers.backend import LABEL_TASK
from gateway.health.modes import STORE
from gateway.http.app import HUB, create_app
from gateway.store.pg_server import PgServer, pg_bindir
from tests.conftest import FakeBackend, auth, make_settings
from tests.pg import raw_sql
from tests.unit.test_cluster_hubs import engine  # noqa: F401  (fixture)

LEASE = 1.5
SUBMISSIONS = 36
WORKERS = 6
STEPS = {"progress_steps": 4, "progress_delay_s": 0.1}  # echo, about 0.4 s
LONG = {"progress_steps": 20, "progress_delay_s": 0.35}  # echo, about 7 s: outlives the outage


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[PgServer]:
    """A PostgreSQL server of this test's own: it is stopped and started under load."""
    if pg_bindir() is None:
        message = "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: PostgreSQL tests must run, not skip)", pytrace=False)
        pytest.skip(message)
    server = PgServer.start()
    try:
        yield server
    finally:
        server.stop()


async def until(check: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {within_s:g} s: {what}"
        await asyncio.sleep(0.05)


class Stream:
    """Submissions with an Idempotency-Key each, retried on 503 on either hub until taken."""

    def __init__(self, clients: list[Any], key: str) -> None:
        self.clients = clients
        self.key = key
        self.accepted: dict[str, str] = {}  # idempotency key -> task id
        self.inputs: dict[str, dict[str, Any]] = {}
        self.refusals: list[tuple[int, str | None, str]] = []  # status, Retry-After, code
        self.refused_while_down = 0
        self.down = False
        self.other: list[tuple[int, str]] = []

    async def submit(self, n: int) -> None:
        idem = f"restart-{n}"
        body = {"agent": "echo", "input": {"n": n, **STEPS}}
        self.inputs[idem] = body["input"]
        headers = {**auth(self.key), "Idempotency-Key": idem}
        deadline = time.monotonic() + 60
        attempt = 0
        while time.monotonic() < deadline:
            client = self.clients[(n + attempt) % 2]
            attempt += 1
            resp = await client.post("/v1/tasks", json=body, headers=headers)
            data = await resp.json()
            if resp.status in (200, 202):
                previous = self.accepted.setdefault(idem, data["task_id"])
                assert previous == data["task_id"], "one key, two tasks"
                return
            if resp.status == 503:
                code = data["error"]["code"]
                self.refusals.append((resp.status, resp.headers.get("Retry-After"), code))
                self.refused_while_down += self.down
                await asyncio.sleep(0.1)
                continue
            self.other.append((resp.status, await resp.text()))
            return
        self.other.append((0, f"{idem}: not accepted within 60 s"))

    async def run(self, numbers: list[int]) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in numbers:
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                await self.submit(queue.get_nowait())
                await asyncio.sleep(0.05)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))


@pytest.mark.parametrize("outage", ["shorter_than_lease", "longer_than_lease"])
async def test_hubs_ride_out_a_postgresql_restart_under_load(
    outage: str,
    pg_server: PgServer,
    tmp_path: Path,
    keys: dict[str, str],
    engine: FakeBackend,  # noqa: F811
    aiohttp_client: Any,
) -> None:
    clients = []
    for name in ("a", "b"):
        settings = make_settings(
            tmp_path / name,
            keys_file=tmp_path / "keys.json",
            store=pg_server.url,
            lease_s=LEASE,
            hub_id=f"hub-{name}",
            probe_interval_s=0.2,
        )
        clients.append(await aiohttp_client(create_app(settings, backend=engine)))
    hubs = [c.app[HUB] for c in clients]
    stream = Stream(clients, keys["user"])
    load = asyncio.create_task(stream.run(list(range(SUBMISSIONS))))

    # One long task on each hub, running through the outage: its hub must keep it.
    long_ids = []
    for client in clients:
        resp = await client.post(
            "/v1/tasks", json={"agent": "echo", "input": LONG}, headers=auth(keys["user"])
        )
        assert resp.status == 202, await resp.text()
        long_ids.append((await resp.json())["task_id"])

    async def long_ones_run() -> bool:
        found = [h.instances.for_task(t) for h, t in zip(hubs, long_ids, strict=True)]
        return all(i is not None and i.handle is not None for i in found)

    await until(long_ones_run, 10, "the long tasks running")
    # Tasks in every phase (pending, running, ending) when the server goes.
    await until(lambda: _true(len(stream.accepted) >= SUBMISSIONS // 3), 30, "a third accepted")
    stream.down = True
    down_at = time.monotonic()
    await asyncio.to_thread(pg_server.stop_server)
    if outage == "longer_than_lease":

        async def both_degraded() -> bool:
            return all(h.mode == "degraded" and STORE in h.modes.causes for h in hubs)

        await until(both_degraded, 10, "both hubs degraded by the store")
        for client in clients:
            resp = await client.get("/v1/status", headers=auth(keys["operator"]))
            status = await resp.json()
            assert resp.status == 200, status
            assert status["mode"] == "degraded" and STORE in status["degraded_reasons"]
        # Every lease expires while the server is down.
        await asyncio.sleep(max(0.0, 2 * LEASE - (time.monotonic() - down_at)))
    await asyncio.to_thread(pg_server.start_server)
    stream.down = False
    outage_s = time.monotonic() - down_at
    if outage == "shorter_than_lease":
        assert outage_s < LEASE, f"the outage took {outage_s:.2f} s"
    else:
        assert outage_s > LEASE

    async def both_normal() -> bool:
        return all(h.mode == "normal" for h in hubs)

    await until(both_normal, 15, "both hubs back to normal by themselves")
    await asyncio.wait_for(load, 90)
    assert stream.other == [], stream.other
    assert len(stream.accepted) == SUBMISSIONS
    # Refused, never broken: every refusal is a 503 that says when to come back.
    assert all(after for _, after, _ in stream.refusals), stream.refusals
    if outage == "longer_than_lease":
        assert stream.refused_while_down > 0, "no submission met the outage"

    async def all_ended() -> bool:
        tasks = [await hubs[0].store.get_task(t) for t in [*stream.accepted.values(), *long_ids]]
        return all(t.terminal for t in tasks)

    await until(all_ended, 45, "every accepted task ended")
    for idem, task_id in stream.accepted.items():
        task = await hubs[1].store.get_task(task_id)
        assert task.state == "succeeded", (task.state, task.error, task.history)
        assert task.result == {"echo": stream.inputs[idem], "agent": "echo"}
        states = [e.state for e in task.history or ()]
        assert sum(s in ("succeeded", "failed", "timed_out", "cancelled") for s in states) == 1
    # One task per key, however often it was retried and on whichever hub.
    rows = raw_sql(
        pg_server.url,
        "SELECT idempotency_key, count(*) FROM tasks WHERE idempotency_key IS NOT NULL GROUP BY 1",
    )
    assert sorted(rows) == sorted((k, 1) for k in stream.accepted)
    # Both hubs were alive throughout: neither took the other's tasks over, and each
    # finished its long task in the one run it started before the outage.
    assert [h.cluster.takeovers for h in hubs] == [0, 0]
    for task_id in long_ids:
        task = await hubs[0].store.get_task(task_id)
        assert task.state == "succeeded" and task.result == {"echo": LONG, "agent": "echo"}
        assert [e.state for e in task.history or ()] == [
            "pending", "dispatched", "running", "succeeded",
        ], task.history  # fmt: skip
    assert {c.labels[LABEL_TASK] for c in engine.started} >= set(stream.accepted.values())
    for hub in hubs:
        report = await hub.decisions.verify()
        assert report.ok, report.problems


async def _true(value: bool) -> bool:
    return value
