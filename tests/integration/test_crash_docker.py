"""Durability against the real engine: SIGKILL the hub many times (without and with warm
pools), container TTLs with the hub dead, and degraded mode while the Docker engine itself
is stopped and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from gateway.containers.backend import LABEL_HUB, LABEL_POOL
from gateway.http.app import HUB
from tests.conftest import REPO, auth
from tests.integration.conftest import RUN_ID, cleanup_hub, registry_file

pytestmark = pytest.mark.docker
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HubProcess:
    """``agent-gateway serve`` as a child process that can be SIGKILLed and restarted."""

    def __init__(self, tmp: Path, agents_file: Path, *extra: str) -> None:
        self.port = free_port()
        self.hub_id = f"test-{RUN_ID}-crash{os.getpid() % 1000}-{self.port}"
        self.networks = [f"agw-{RUN_ID}-{self.port}-int", f"agw-{RUN_ID}-{self.port}-egr"]
        self.state = tmp / "state"
        self.log = tmp / "hub.log"
        self.args = [
            sys.executable, "-m", "gateway", "serve",
            "--port", str(self.port),
            "--state-dir", str(self.state),
            "--keys", str(tmp / "keys.json"),
            "--hub-id", self.hub_id,
            "--agents", str(agents_file),
            "--network", self.networks[0],
            "--egress-network", self.networks[1],
            "--log-level", os.environ.get("AGW_TEST_HUB_LOG_LEVEL", "warning"),
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=log, cwd=REPO, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                time.sleep(0.05)
        raise AssertionError("hub did not start: " + self.log.read_text()[-3000:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the hub with ``sig`` (``serve`` winds up on SIGTERM and on Ctrl-C alike)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_lines(self, needle: str) -> list[str]:
        """The hub's log lines that mention ``needle`` (e.g. a task id)."""
        if not needle or not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if needle in line]

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.state / 'gateway.db'}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        return conn


# echo as a background agent: it answers 202 and reports its output through the hub.
ECHO_LATER = """
  - name: echo-later
    description: echo, answering 202 and reporting its output later (the crash test's).
    image: {image}
    capabilities: [debug.echo-later]
    input_schema: agents/echo.input.json
    output_schema: agents/echo.output.json
    port: 8000
    timeout_s: 30
    resources: {{memory: 64m, cpus: 0.5, pids: 32}}
    env:
      ECHO_REPLY: later
"""


ECHO_RESOURCES = "    resources: {memory: 64m, cpus: 0.5, pids: 32}\n"


def crash_registry(tmp_path: Path, images: dict[str, str], pool: str = "") -> Path:
    """The run's agents.yaml plus ``echo-later``; ``pool`` (an entry's ``pool:`` line) is
    given to echo and echo-later."""
    path = registry_file(tmp_path, images)
    text = path.read_text()
    if pool:
        assert text.count(ECHO_RESOURCES) == 1
        text = text.replace(ECHO_RESOURCES, ECHO_RESOURCES + pool)
    path.write_text(text + ECHO_LATER.format(image=images["echo"]) + pool)
    return path


@pytest.fixture
def hub_process(
    tmp_path: Path, agent_images: dict[str, str], docker_api: docker.APIClient, keys: Any
) -> Any:
    made: list[HubProcess] = []

    def make(*extra: str, pool: str = "") -> HubProcess:
        hub = HubProcess(tmp_path, crash_registry(tmp_path, agent_images, pool), *extra)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.stop()
        cleanup_hub(docker_api, hub.hub_id, hub.networks)


def _example(name: str) -> Any:
    """The module ``examples/agents/<name>/agent.py`` (to compute expected results)."""
    spec = importlib.util.spec_from_file_location(
        f"crash_{name}", REPO / f"examples/agents/{name}/agent.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# sync: echo, calc; background (202, reported later): later; background and messaging
# (delegates its parts to wordstats through the hub, then reports): coord.
KINDS = ("echo", "calc", "later", "coord")


def _word(i: int) -> str:
    letters = ""
    while True:
        i, r = divmod(i, 26)
        letters += "abcdefghijklmnopqrstuvwxyz"[r]
        if not i:
            return "w" + letters


def document(i: int) -> dict[str, Any]:
    w = _word(i)
    return {"text": f"Alpha {w} beta. Gamma {w} delta {w}.", "parts": 1 + i // 4 % 2, "top": 3}


def expected_result(kind: str, n: int) -> Any:
    if kind in ("echo", "later"):
        return {"echo": {"n": n}, "agent": "echo"}
    if kind == "calc":
        return n * 2
    coordinator, wordstats = _example("coordinator"), _example("wordstats")
    doc = document(n)
    chunks = coordinator.split(doc["text"], doc["parts"])
    parts = [wordstats.stats(c, coordinator.PART_TOP, 1) for c in chunks]
    return {"parts": len(chunks), **coordinator.merge(parts, doc["top"])}


async def test_sigkill_at_many_points_loses_and_duplicates_nothing(
    hub_process: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    """SIGKILL the hub 22 times across accept, dispatch, run and complete, with synchronous,
    background and delegating agents; every task that got a 202 (and every child task)
    ends exactly once with the agent's result, and no container is left."""
    hub = hub_process("--probe-interval", "0.5", "--max-attempts", "10")
    hub.start()
    accepted: dict[str, tuple[str, int]] = {}
    at_kill: Counter[str] = Counter()
    at_kill_by_kind: Counter[str] = Counter()
    cut_in_flight = 0
    delays = [0.0, 0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5]
    n = 0

    async with aiohttp.ClientSession() as http:

        async def submit(kind: str, i: int) -> None:
            timeout_s = 20
            if kind == "echo":
                body, key = {"agent": "echo", "input": {"n": i}}, keys["user"]
            elif kind == "later":
                body, key = {"agent": "echo-later", "input": {"n": i}}, keys["user"]
            elif kind == "coord":
                body, key = {"agent": "coordinator", "input": document(i)}, keys["user"]
                # Two containers deep, and every hub call it makes must find the hub up.
                timeout_s = 120
            else:
                body = {"agent": "calc", "input": {"expression": f"{i}*2", "spin_s": 0.3}}
                key = keys["developer"]
            async with http.post(
                hub.url + "/v1/tasks", json={**body, "timeout_s": timeout_s}, headers=auth(key)
            ) as resp:
                data = await resp.json()
                assert resp.status == 202, data
                accepted[data["task_id"]] = (kind, i)

        for kill_no in range(22):
            jobs = []
            for _ in range(3):
                n += 1
                jobs.append(asyncio.create_task(submit(KINDS[n % len(KINDS)], n)))
            await asyncio.sleep(delays[kill_no % len(delays)])
            hub.kill()
            results = await asyncio.gather(*jobs, return_exceptions=True)
            cut_in_flight += sum(isinstance(r, aiohttp.ClientError) for r in results)
            for r in results:
                if r is not None and not isinstance(r, aiohttp.ClientError):
                    raise r
            live = {
                c["Labels"].get("io.agent-gateway.task")
                for c in docker_api.containers(
                    all=True, filters={"label": [f"{LABEL_HUB}={hub.hub_id}"]}
                )
            }
            with contextlib.closing(hub.db()) as db:
                for row in db.execute("SELECT id, state FROM tasks"):
                    if row["id"] in accepted and row["state"] not in TERMINAL:
                        at_kill[row["state"]] += 1
                        at_kill_by_kind[accepted[row["id"]][0]] += 1
                    elif row["state"] in TERMINAL and row["id"] in live:
                        # Result recorded, container not yet removed: the "complete" phase.
                        at_kill["completing"] += 1
            hub.start()

        # Let everything finish.
        deadline = time.monotonic() + 90
        while True:
            with contextlib.closing(hub.db()) as db:
                states = dict(db.execute("SELECT id, state FROM tasks").fetchall())
            if all(s in TERMINAL for s in states.values()):
                break
            assert time.monotonic() < deadline, Counter(states.values())
            await asyncio.sleep(0.2)

    with contextlib.closing(hub.db()) as db:
        rows = {r["id"]: r for r in db.execute("SELECT * FROM tasks")}
        terminal_events = Counter(
            r[0]
            for r in db.execute(
                "SELECT task_id FROM task_events WHERE state IN (?, ?, ?, ?)", TERMINAL
            )
        )
        redispatched = db.execute(
            "SELECT count(*) FROM task_events WHERE detail LIKE 're-dispatched%'"
        ).fetchone()[0]
    outcomes: Counter[str] = Counter()
    children: dict[str, list[str]] = {}
    for row in rows.values():
        if row["parent_id"]:
            children.setdefault(row["parent_id"], []).append(row["id"])
    for task_id, (kind, i) in accepted.items():
        row = rows[task_id]
        outcomes[row["state"]] += 1
        assert terminal_events[task_id] == 1, f"{task_id} ended {terminal_events[task_id]} times"
        assert row["state"] == "succeeded", (kind, row["error"], row["attempts"], task_id)
        result = json.loads(row["result"])
        if kind == "calc":
            result = result["value"]
        elif kind == "coord":
            # One child per part, however often the hub died while it delegated.
            assert sorted(result.pop("children")) == sorted(children.get(task_id, []))
            assert all(rows[c]["state"] == "succeeded" for c in children[task_id])
        assert result == expected_result(kind, i), (kind, i)
    # Tasks whose 202 was cut by a kill still end, exactly once.
    assert all(terminal_events[t] == 1 for t in rows)
    # A container the engine finished creating after its hub died belongs to no task; the
    # next start's recovery (or the periodic orphan scan) removes it.
    hub.kill()
    strays = docker_api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub.hub_id}"]})
    hub.start()
    report = {
        "kills": 22,
        "accepted": len(accepted),
        "accepted_by_kind": dict(Counter(kind for kind, _ in accepted.values())),
        "in_db": len(rows),
        "child_tasks": sum(len(c) for c in children.values()),
        "submissions_cut_by_kill": cut_in_flight,
        "unfinished_at_kill_by_state": dict(at_kill),
        "unfinished_at_kill_by_kind": dict(at_kill_by_kind),
        "outcomes": dict(outcomes),
        "re_dispatches": redispatched,
        "orphans_removed_by_last_restart": len(strays),
    }
    print("CRASH-TEST " + json.dumps(report))
    assert at_kill["pending"] + at_kill["dispatched"] > 0 and at_kill["running"] > 0, report
    # The kills caught background and delegating tasks unfinished, not only synchronous ones.
    assert at_kill_by_kind["later"] > 0 and at_kill_by_kind["coord"] > 0, report
    hub.stop()
    leftover = docker_api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub.hub_id}"]})
    assert leftover == [], [c["Names"] for c in leftover]


# Warm echo and echo-later: quick (echo), running a while (slow: progress steps reported
# through the hub with the token its task brought), background (later).
POOL = "    pool: {min: 2, max: 4}\n"
POOL_KINDS = ("echo", "slow", "later")
SLOW = {"progress_steps": 3, "progress_delay_s": 0.25}


async def _pools(http: aiohttp.ClientSession, hub: HubProcess, key: str) -> dict[str, Any]:
    async with http.get(hub.url + "/v1/status", headers=auth(key)) as resp:
        assert resp.status == 200, await resp.text()
        pools: dict[str, Any] = (await resp.json())["pools"]
        return pools


async def _refilled(http: aiohttp.ClientSession, hub: HubProcess, key: str) -> None:
    """Wait until echo and echo-later each have ``min`` (2) idle warm containers."""
    deadline = time.monotonic() + 30
    while True:
        pools = await _pools(http, hub, key)
        if all(pools[a]["containers"]["idle"] >= 2 for a in ("echo", "echo-later")):
            return
        assert time.monotonic() < deadline, pools
        await asyncio.sleep(0.1)


async def test_sigkill_with_warm_pools_loses_duplicates_and_leaks_nothing(
    hub_process: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    """SIGKILL a hub whose echo agents have warm pools, 6 times while tasks are submitted
    and run, with idle and assigned warm containers at the kill; every accepted task ends
    exactly once with its result, each restart refills the pool, and no container is left
    once the hub stops."""
    hub = hub_process("--probe-interval", "0.5", "--max-attempts", "10", pool=POOL)
    hub.start()
    accepted: dict[str, tuple[str, int]] = {}
    at_kill: Counter[str] = Counter()
    delays = [0.0, 0.1, 0.3, 0.6, 1.0, 0.2]
    n = 0
    hub_filter = {"label": [f"{LABEL_HUB}={hub.hub_id}", LABEL_POOL]}

    async with aiohttp.ClientSession() as http:

        async def submit(kind: str, i: int) -> None:
            agent = "echo-later" if kind == "later" else "echo"
            data_in = {"n": i, **SLOW} if kind == "slow" else {"n": i}
            body = {"agent": agent, "input": data_in, "timeout_s": 20}
            async with http.post(
                hub.url + "/v1/tasks", json=body, headers=auth(keys["user"])
            ) as resp:
                data = await resp.json()
                assert resp.status == 202, data
                accepted[data["task_id"]] = (kind, i)

        started, spent = time.monotonic(), Counter[str]()
        for delay in delays:
            t0 = time.monotonic()
            await _refilled(http, hub, keys["operator"])  # after every restart, too
            spent["refill"] += time.monotonic() - t0
            jobs = []
            for _ in range(3):
                n += 1
                jobs.append(asyncio.create_task(submit(POOL_KINDS[n % len(POOL_KINDS)], n)))
            await asyncio.sleep(delay)
            hub.kill()
            results = await asyncio.gather(*jobs, return_exceptions=True)
            for r in results:
                if r is not None and not isinstance(r, aiohttp.ClientError):
                    raise r
            # What the dead hub left warm: assigned to an unfinished task, or idle.
            with contextlib.closing(hub.db()) as db:
                running = {
                    row["container_id"]
                    for row in db.execute("SELECT id, state, container_id FROM tasks")
                    if row["state"] not in TERMINAL
                }
            for c in docker_api.containers(all=True, filters=hub_filter):
                at_kill["warm_assigned" if c["Id"] in running else "warm_idle"] += 1
            t0 = time.monotonic()
            hub.start()
            spent["start"] += time.monotonic() - t0

        killing_s = time.monotonic() - started
        deadline = time.monotonic() + 60
        while True:
            with contextlib.closing(hub.db()) as db:
                states = dict(db.execute("SELECT id, state FROM tasks").fetchall())
            if all(s in TERMINAL for s in states.values()):
                break
            assert time.monotonic() < deadline, Counter(states.values())
            await asyncio.sleep(0.2)
        await _refilled(http, hub, keys["operator"])
        draining_s = time.monotonic() - started - killing_s

        with contextlib.closing(hub.db()) as db:
            rows = {r["id"]: r for r in db.execute("SELECT * FROM tasks")}
            terminal_events = Counter(
                r[0]
                for r in db.execute(
                    "SELECT task_id FROM task_events WHERE state IN (?, ?, ?, ?)", TERMINAL
                )
            )
            redispatched = db.execute(
                "SELECT count(*) FROM task_events WHERE detail LIKE 're-dispatched%'"
            ).fetchone()[0]
        for task_id, (kind, i) in accepted.items():
            row = rows[task_id]
            assert terminal_events[task_id] == 1, f"{task_id} ended {terminal_events[task_id]}x"
            assert row["state"] == "succeeded", (kind, row["error"], row["attempts"], task_id)
            sent = {"n": i, **SLOW} if kind == "slow" else {"n": i}
            assert json.loads(row["result"]) == {"echo": sent, "agent": "echo"}, (kind, i)
        assert all(terminal_events[t] == 1 for t in rows)
        dispatch = Counter(r["dispatch"] for r in rows.values())

        # Killed with full pools: the next start's recovery removes the idle warm containers
        # of the dead run and warms new ones.
        before = {c["Id"] for c in docker_api.containers(all=True, filters=hub_filter)}
        hub.kill()
        hub.start()
        await _refilled(http, hub, keys["operator"])
        after = {c["Id"] for c in docker_api.containers(all=True, filters=hub_filter)}
        pools = await _pools(http, hub, keys["operator"])
    report = {
        "kills": len(delays) + 1,
        "accepted": len(accepted),
        "in_db": len(rows),
        "dispatch": dict(dispatch),
        "warm_at_kill": dict(at_kill),
        "re_dispatches": redispatched,
        "pooled_after_last_restart": len(after),
        "seconds": {
            "kills": round(killing_s, 1),
            "drain": round(draining_s, 1),
            **{k: round(v, 1) for k, v in spent.items()},
        },
    }
    print("CRASH-POOL-TEST " + json.dumps(report))
    # The kills caught warm containers both waiting and running a task.
    assert at_kill["warm_idle"] > 0 and at_kill["warm_assigned"] > 0, report
    assert dispatch["warm"] > 0, report
    assert before and after.isdisjoint(before), report  # nothing of the dead run adopted
    assert len(after) == 4 and pools["echo"]["containers"]["idle"] == 2, (report, pools)
    # A hub shut down (not killed) removes its idle warm containers on the way out.
    stopping = time.monotonic()
    hub.stop()
    assert hub.proc is not None and hub.proc.returncode == 0, hub.log.read_text()[-3000:]
    print(f"CRASH-POOL-TEST stopped in {time.monotonic() - stopping:.1f} s")
    leftover = docker_api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub.hub_id}"]})
    assert leftover == [], [c["Names"] for c in leftover]


async def test_container_stops_at_its_ttl_with_the_hub_dead(
    hub_process: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    hub = hub_process("--ttl-grace", "2", "--probe-interval", "0")
    hub.start()
    async with aiohttp.ClientSession() as http:
        body = {"agent": "calc", "input": {"expression": "1", "spin_s": 120}, "timeout_s": 4}
        async with http.post(
            hub.url + "/v1/tasks", json=body, headers=auth(keys["developer"])
        ) as resp:
            task_id = (await resp.json())["task_id"]
        deadline = time.monotonic() + 20
        while True:
            async with http.get(
                f"{hub.url}/v1/tasks/{task_id}", headers=auth(keys["developer"])
            ) as resp:
                if (await resp.json())["state"] == "running":
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    hub.kill()
    killed_at = time.monotonic()
    (container,) = docker_api.containers(filters={"label": [f"{LABEL_HUB}={hub.hub_id}"]})
    ttl_at = int(container["Labels"]["io.agent-gateway.expires"])
    while docker_api.inspect_container(container["Id"])["State"]["Running"]:
        assert time.monotonic() - killed_at < 20, "container outlived its TTL"
        await asyncio.sleep(0.2)
    stopped_at = time.time()
    assert stopped_at >= ttl_at - 1, "stopped before its TTL"
    assert stopped_at <= ttl_at + 8, "stopped long after its TTL"
    hub.start()  # recovery: the deadline passed, so timed_out, and the container goes
    with contextlib.closing(hub.db()) as db:
        row = db.execute("SELECT state, error FROM tasks WHERE id = ?", [task_id]).fetchone()
    assert row["state"] == "timed_out"
    assert "while the hub was down" in row["error"]
    assert docker_api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub.hub_id}"]}) == []


def _engine_controls() -> tuple[Any, Any]:
    """(stop, start) callables for the local Docker engine, as the setup script runs it."""
    systemd = Path("/run/systemd/system").exists() and (
        subprocess.run(["systemctl", "is-active", "--quiet", "docker"], check=False).returncode == 0
    )
    if systemd:
        return (
            lambda: subprocess.run(["systemctl", "stop", "docker"], check=True),
            lambda: subprocess.run(["systemctl", "start", "docker"], check=True),
        )
    pid_file = Path("/var/run/docker.pid")
    if os.geteuid() != 0 or not pid_file.exists():
        return None, None

    def stop() -> None:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        # dockerd closes its socket well before it exits and removes its pid file.
        while Path(f"/proc/{pid}").exists() and pid_file.exists():
            assert time.monotonic() < deadline, "dockerd did not stop"
            time.sleep(0.1)

    def start() -> None:
        with open("/var/log/agent-gateway-dockerd.log", "ab") as log:
            subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)

    return stop, start


def _wait_engine(up: bool, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            docker.from_env(version="auto", timeout=2).api.ping()
            alive = True
        except Exception:
            alive = False
        if alive == up:
            return
        time.sleep(0.3)
    raise AssertionError(f"engine did not become {'reachable' if up else 'unreachable'}")


async def test_degraded_while_docker_engine_is_down(docker_hub: Any, keys: dict[str, str]) -> None:
    """Stop the real engine: the hub goes degraded (503, reads work); start it: normal."""
    stop, start = _engine_controls()
    if stop is None:
        message = "cannot stop and start this machine's Docker engine (not root, no pid file)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    hub = docker_hub.app[HUB]
    done = await docker_hub.post(
        "/v1/tasks?wait=30", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
    )
    task_id = (await done.json())["task_id"]
    stop()
    try:
        await asyncio.to_thread(_wait_engine, False, 30)
        await hub.monitor.tick()
        assert hub.mode == "degraded"
        assert "container_engine" in hub.degraded_reasons
        refused = await docker_hub.post(
            "/v1/tasks", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
        )
        assert refused.status == 503
        assert refused.headers["Retry-After"]
        read = await docker_hub.get(f"/v1/tasks/{task_id}", headers=auth(keys["user"]))
        assert read.status == 200
        assert (await docker_hub.get("/readyz")).status == 503
        status = await (await docker_hub.get("/v1/status", headers=auth(keys["operator"]))).json()
        assert status["mode"] == "degraded"
        assert any(a["name"] == "degraded_container_engine" for a in status["alerts"]["active"])
    finally:
        start()
        await asyncio.to_thread(_wait_engine, True, 90)
    await hub.monitor.tick()
    assert hub.mode == "normal"
    again = await docker_hub.post(
        "/v1/tasks?wait=30", json={"agent": "echo", "input": {"x": 1}}, headers=auth(keys["user"])
    )
    assert (await again.json())["state"] == "succeeded"
