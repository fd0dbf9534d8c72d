"""Restart recovery, migrations, modes and monitors, with the in-process fake backend.

The same paths run against real containers and a real SIGKILL in
tests/integration/test_crash_docker.py.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from aiohttp import web

from gateway.bundle.config import load_config
from gateway.containers.backend import LABEL_TASK
from gateway.containers.guardrails import build_spec
from gateway.http.app import HUB, create_app
from gateway.hub import Hub
from gateway.store import MIGRATIONS, Store, Task, migrate
from tests.conftest import REPO, FakeBackend, auth, make_settings

SANDBOX = {
    "network": "internal",
    "memory_bytes": 64 * 2**20,
    "cpus": 0.5,
    "pids": 32,
    "read_only_root": True,
    "mounts": [],
}


async def seed(store: Store, state: str, *, agent: str = "echo", **extra: Any) -> str:
    """A task left in ``state`` by a hub that died (written straight to the store)."""
    task_id = str(uuid.uuid4())
    row = {
        "id": task_id,
        "agent": agent,
        "capability": None,
        "subject": "user",
        "input": {"seeded": state, **extra.pop("input", {})},
        "timeout_s": 30.0,
        "deadline": time.time() + 30,
        "decision_id": "d-" + task_id,
        "sandbox": SANDBOX,
        "attempts": 0,
        **extra,
    }
    await store.create_task(row)
    path = {"dispatched": ["dispatched"], "running": ["dispatched", "running"]}.get(state, [])
    prev = "pending"
    for step in path:
        await store.transition(task_id, step, allowed_from=(prev,))
        prev = step
    return task_id


async def start_container(backend: FakeBackend, task_id: str, agent_name: str, hub_id: str) -> str:
    """A container labelled for ``task_id``, as a previous run of the hub left it."""
    config = load_config(
        agents_file=REPO / "agents.yaml",
        schemas_dir=REPO / "schemas",
        policies_dir=REPO / "policies",
    )
    spec = build_spec(
        agent=config.registry.get(agent_name),
        sandbox=SANDBOX,
        task_id=task_id,
        hub_id=hub_id,
        networks={"internal": "n"},
        timeout_s=30,
        ttl_grace_s=5,
        gateway_url="http://127.0.0.1:1",
    )
    return (await backend.start(spec)).id


async def wait_terminal(store: Store, task_id: str, within_s: float = 10) -> Task:
    deadline = time.monotonic() + within_s
    while True:
        task = await store.get_task(task_id)
        if task.state in ("succeeded", "failed", "timed_out", "cancelled"):
            return task
        assert time.monotonic() < deadline, task
        await asyncio.sleep(0.02)


async def test_recovery_outcomes(tmp_path: Path, keys: dict[str, str]) -> None:
    """Each kind of unfinished task ends the right way after a restart; orphans go."""
    settings = make_settings(tmp_path, probe_interval_s=0)
    backend = FakeBackend()
    store = Store(settings.db_path)
    pending = await seed(store, "pending", input={"k": 1})
    dispatched = await seed(store, "dispatched", input={"k": 2})
    running = await seed(store, "running", input={"k": 3})
    exited = await seed(store, "running", input={"k": 4})
    expired = await seed(store, "running", deadline=time.time() - 1)
    exhausted = await seed(store, "dispatched", attempts=settings.max_attempts)
    gone_agent = await seed(store, "pending", agent="retired")
    await store.close()
    live = await start_container(backend, running, "echo", settings.hub_id)
    orphan = await start_container(backend, str(uuid.uuid4()), "echo", settings.hub_id)
    dead = await start_container(backend, exited, "echo", settings.hub_id)
    backend.exited.add(dead)

    hub = Hub(settings, backend=backend)
    await hub.start()
    try:
        report = hub.last_recovery
        assert report is not None
        assert report.reattached == [running]
        assert sorted(report.redispatched) == sorted([pending, dispatched, exited])
        assert report.timed_out == [expired]
        assert sorted(report.failed) == sorted([exhausted, gone_agent])
        assert len(report.orphans) == 1
        assert orphan not in backend.servers
        assert "orphan_container" in hub.alerts.active
        for task_id, k in ((pending, 1), (dispatched, 2), (running, 3), (exited, 4)):
            task = await wait_terminal(hub.store, task_id)
            assert task.state == "succeeded", task
            assert task.result["echo"] == {"seeded": task.input["seeded"], "k": k}
        again = await hub.store.get_task(dispatched)
        assert again.history is not None
        details = [h.detail or "" for h in again.history]
        assert any("re-dispatched after a hub restart" in d for d in details)
        assert again.attempts == 1
        # The re-attached task ran in the container that was already there.
        assert (await hub.store.get_task(running)).container_id == live
        assert (await hub.store.get_task(expired)).state == "timed_out"
        exhausted_error = (await hub.store.get_task(exhausted)).error
        assert exhausted_error is not None and exhausted_error["code"] == "retry_budget_exhausted"
        gone_error = (await hub.store.get_task(gone_agent)).error
        assert gone_error is not None and gone_error["code"] == "unknown_agent"
    finally:
        await hub.stop()


async def test_each_task_ends_exactly_once(tmp_path: Path) -> None:
    """A terminal transition is refused once another one won (the race guard)."""
    store = Store(tmp_path / "db.sqlite")
    task_id = await seed(store, "running")
    await store.transition(task_id, "succeeded", allowed_from=("running",), result={"x": 1})
    with pytest.raises(Exception, match="cannot become timed_out"):
        await store.transition(task_id, "timed_out", allowed_from=("pending", "running"))
    events = (await store.get_task(task_id)).history or ()
    assert [e.state for e in events].count("succeeded") == 1
    await store.close()


async def test_old_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(sqlite3.connect(path, isolation_level=None))
    assert migrate(db, MIGRATIONS[:1]) == ["001_initial"]
    db.execute(
        "INSERT INTO tasks (id, state, agent, created_at, updated_at) VALUES ('t1', 'succeeded',"
        " 'echo', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')"
    )
    db.close()
    store = Store(path)
    assert store.migrations_applied == [name for name, _ in MIGRATIONS[1:]]
    assert (await store.get_task("t1")).state == "succeeded"
    await store.record_alert(
        {"name": "x", "severity": "warning", "message": "m", "started_at": "now"}
    )
    await store.close()
    assert Store(path).migrations_applied == []


async def test_invalid_policy_at_start_means_degraded_until_fixed(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any, config_copy: Any
) -> None:
    root = config_copy()
    policy = root / "policies" / "dispatch.rego"
    good = policy.read_text()
    policy.write_text(good.replace("default allow := false", "default allow := "))
    settings = make_settings(
        tmp_path,
        agents_file=root / "agents.yaml",
        schemas_dir=root / "schemas",
        policies_dir=root / "policies",
        probe_interval_s=0,
    )
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    hub = client.app[HUB]
    assert hub.mode == "degraded"
    assert "dispatch.rego" in hub.degraded_reasons["policy"]
    body = {"capability": "debug.echo", "input": {}}
    resp = await client.post("/v1/tasks", json=body, headers=auth(keys["user"]))
    assert resp.status == 503
    assert resp.headers["Retry-After"]
    # No policy at all means no API decision either: keyed calls fail closed (503), while
    # health and readiness stay up to say why.
    listed = await client.get("/v1/tasks", headers=auth(keys["user"]))
    assert listed.status == 503
    assert (await listed.json())["error"]["code"] == "degraded"
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    policy.write_text(good)
    await hub.monitor.tick()
    assert hub.mode == "normal"
    resp = await client.post("/v1/tasks?wait=10", json=body, headers=auth(keys["user"]))
    assert (await resp.json())["state"] == "succeeded"


async def test_operator_forces_modes(fake_hub: Any, keys: dict[str, str]) -> None:
    client, backend = fake_hub
    op = auth(keys["operator"])
    body = {"capability": "debug.echo", "input": {}}
    resp = await client.post("/v1/admin/mode", json={"mode": "degraded"}, headers=op)
    assert (await resp.json())["mode"] == "degraded"
    refused = await client.post("/v1/tasks", json=body, headers=auth(keys["user"]))
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "degraded"
    assert backend.started == []
    bad = await client.post("/v1/admin/mode", json={"mode": "off"}, headers=op)
    assert bad.status == 400
    await client.post("/v1/admin/mode", json={"mode": "auto"}, headers=op)
    ok = await client.post("/v1/tasks?wait=10", json=body, headers=auth(keys["user"]))
    assert (await ok.json())["state"] == "succeeded"


async def test_cli_mode_talks_to_a_running_hub(
    tmp_path: Path, keys: dict[str, str], aiohttp_server: Any
) -> None:
    from gateway.cli import main

    app = create_app(make_settings(tmp_path, probe_interval_s=0), backend=FakeBackend())
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    code = await asyncio.to_thread(
        main, ["mode", "degraded", "--url", url, "--key", keys["operator"]]
    )
    assert code == 0
    assert app[HUB].mode == "degraded"
    refused = await asyncio.to_thread(main, ["mode", "normal", "--url", url, "--key", keys["user"]])
    assert refused == 1
    assert app[HUB].mode == "degraded"


async def test_watchdog_alerts_when_nothing_is_dispatched(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, probe_interval_s=0, watchdog_window_s=0.2)
    hub = Hub(settings, backend=FakeBackend())
    await hub.start()
    try:
        await seed(hub.store, "pending")  # written behind the router's back: never dispatched
        await asyncio.sleep(0.3)
        await hub.monitor.watchdog()
        alert = hub.alerts.active["throughput_stalled"]
        assert "1 task(s) waiting" in alert.message
        text = hub.metrics.render().decode()
        assert 'gateway_alerts_total{alert="throughput_stalled"} 1.0' in text
        await hub.store.write(lambda db: db.execute("UPDATE tasks SET state = 'cancelled'"))
        await hub.monitor.watchdog()
        assert "throughput_stalled" not in hub.alerts.active
    finally:
        await hub.stop()


async def test_orphan_scan_removes_unowned_containers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, probe_interval_s=0, orphan_grace_s=0)
    backend = FakeBackend()
    hub = Hub(settings, backend=backend)
    await hub.start()
    try:
        owned = await seed(hub.store, "running")
        keep = await start_container(backend, owned, "echo", settings.hub_id)
        stray = await start_container(backend, "no-such-task", "echo", settings.hub_id)
        removed = await hub.monitor.orphan_scan()
        assert removed == [stray]
        assert keep in backend.servers
        assert backend.labels[keep][LABEL_TASK] == owned
        assert "orphan_container" in hub.alerts.active
    finally:
        await hub.stop()


async def test_alerts_reach_an_alertmanager_webhook(tmp_path: Path, aiohttp_server: Any) -> None:
    received: list[Any] = []

    async def alerts(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({})

    receiver = web.Application()
    receiver.router.add_post("/api/v2/alerts", alerts)
    server = await aiohttp_server(receiver)
    settings = make_settings(
        tmp_path,
        probe_interval_s=0,
        alert_webhook_url=f"http://127.0.0.1:{server.port}/api/v2/alerts",
    )
    hub = Hub(settings, backend=FakeBackend())
    await hub.start()
    try:
        hub.alerts.raise_alert("test_alert", "something broke", severity="critical", where="here")
        hub.alerts.resolve("test_alert")
        await asyncio.gather(*hub.alerts._pending)
    finally:
        await hub.stop()
    assert len(received) == 2
    fired, resolved = received[0][0], received[1][0]
    assert fired["labels"] == {"alertname": "test_alert", "severity": "critical", "hub": hub.hub_id}
    assert fired["annotations"] == {"summary": "something broke", "where": "here"}
    assert "endsAt" not in fired and resolved["endsAt"]
    rows = Store(settings.db_path)
    stored = await rows.read(lambda db: db.execute("SELECT * FROM alerts").fetchall())
    await rows.close()
    assert [(r["name"], r["resolved_at"] is not None) for r in stored] == [("test_alert", True)]


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs for the state directory, so the disk can really fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the disk-full test needs root (mount) under CI")
        pytest.skip("needs root to mount a tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_disk_means_degraded_until_space_returns(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any, small_disk: Path
) -> None:
    settings = make_settings(tmp_path, state_dir=small_disk / "state", probe_interval_s=0)
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    hub = client.app[HUB]
    done = await client.post(
        "/v1/tasks?wait=10", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
    )
    task_id = (await done.json())["task_id"]
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # noqa: ASYNC230 (a test filling a tmpfs)
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    await hub.probe_store()
    assert hub.mode == "degraded"
    assert "full" in hub.degraded_reasons["store"]
    assert "degraded_store" in hub.alerts.active
    refused = await client.post(
        "/v1/tasks", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
    )
    assert refused.status == 503
    # Reads go on.
    read = await client.get(f"/v1/tasks/{task_id}", headers=auth(keys["user"]))
    assert (await read.json())["state"] == "succeeded"
    filler.unlink()
    await hub.probe_store()
    assert hub.mode == "normal"
    again = await client.post(
        "/v1/tasks?wait=10", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
    )
    assert (await again.json())["state"] == "succeeded"


def test_serve_keeps_its_hub_id(tmp_path: Path) -> None:
    from gateway.cli import persistent_hub_id

    first = persistent_hub_id(tmp_path)
    assert first.startswith("hub-")
    assert persistent_hub_id(tmp_path) == first
    assert persistent_hub_id(tmp_path / "other") != first


async def test_a_read_only_state_volume_means_degraded_until_writable(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any, small_disk: Path
) -> None:
    """The hub starts on a really read-only file system (remounted): it serves reads,
    refuses dispatch and writes nothing; started again on the writable volume it recovers.

    (SQLite shares one WAL index per file and process, opened read-only here, so the
    volume coming back needs a restart to be written again; a full disk does not.)
    """
    settings = make_settings(tmp_path, state_dir=small_disk / "state", probe_interval_s=0)
    first = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    done = await first.post(
        "/v1/tasks?wait=10", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
    )
    task_id = (await done.json())["task_id"]
    await first.close()  # every file of the state directory is closed now

    await asyncio.to_thread(
        subprocess.run, ["mount", "-o", "remount,ro", str(small_disk)], check=True
    )
    try:
        client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
        hub = client.app[HUB]
        assert hub.mode == "degraded"
        assert "readonly" in hub.degraded_reasons["store"]
        assert "degraded_store" in hub.alerts.active
        assert not hub.recovered  # recovery writes; it waits for the store
        read = await client.get(f"/v1/tasks/{task_id}", headers=auth(keys["user"]))
        assert (await read.json())["state"] == "succeeded"
        refused = await client.post(
            "/v1/tasks", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
        )
        assert refused.status == 503 and refused.headers["Retry-After"]
        assert (await refused.json())["error"]["code"] == "degraded"
        await hub.monitor.tick()
        assert hub.mode == "degraded" and not hub.recovered
        await client.close()
    finally:
        await asyncio.to_thread(
            subprocess.run, ["mount", "-o", "remount,rw", str(small_disk)], check=True
        )
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    hub = client.app[HUB]
    assert hub.mode == "normal" and hub.recovered, hub.degraded_reasons
    again = await client.post(
        "/v1/tasks?wait=10", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
    )
    assert (await again.json())["state"] == "succeeded"
    listed = await client.get("/v1/tasks", headers=auth(keys["user"]))
    assert len((await listed.json())["tasks"]) == 2  # the refused submission left nothing


async def test_revisions_are_recorded_once_the_policy_loads(
    tmp_path: Path, config_copy: Any
) -> None:
    """A hub that started without a valid policy records the revisions once it has one."""
    root = config_copy()
    good = (root / "policies" / "dispatch.rego").read_text()
    (root / "policies" / "dispatch.rego").write_text(good + "\nthis is not rego\n")
    settings = make_settings(
        tmp_path,
        probe_interval_s=0,
        agents_file=root / "agents.yaml",
        schemas_dir=root / "schemas",
        policies_dir=root / "policies",
    )
    hub = Hub(settings, backend=FakeBackend())
    await hub.start()
    try:

        def count(db: Any) -> tuple[int, int]:
            return (
                db.execute("SELECT count(*) FROM policy_revisions").fetchone()[0],
                db.execute("SELECT count(*) FROM registry_revisions").fetchone()[0],
            )

        assert "policy" in hub.degraded_reasons
        assert await hub.store.read(count) == (0, 0)
        (root / "policies" / "dispatch.rego").write_text(good)
        await hub.monitor.tick()
        assert hub.mode == "normal"
        assert await hub.store.read(count) == (1, 1)
    finally:
        await hub.stop()
