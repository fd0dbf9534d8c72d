"""Two hubs on one real PostgreSQL with real containers: SIGKILL them at random points while
tasks stream in through both; every accepted task ends exactly once with its result, the
decision log verifies as one chain, and no container is left."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from gateway.containers.backend import LABEL_HUB, LABEL_TASK
from tests.conftest import REPO, auth
from tests.integration.conftest import cleanup_hub
from tests.integration.test_crash_docker import HubProcess, crash_registry
from tests.pg import pg_cluster, pg_target  # noqa: F401  (fixtures)

pytestmark = pytest.mark.docker
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")
KILLS = 10
LEASE_S = 2.0


@pytest.fixture
def cluster(
    tmp_path: Path,
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
    keys: dict[str, str],
    pg_target: str,  # noqa: F811
) -> Any:
    registry = crash_registry(tmp_path, agent_images)
    hubs = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        shutil.copy(tmp_path / "keys.json", home / "keys.json")
        hubs.append(
            HubProcess(
                home,
                registry,
                "--store",
                pg_target,
                "--lease",
                str(LEASE_S),
                "--probe-interval",
                "0.5",
                "--max-attempts",
                "10",
            )
        )
    yield hubs
    for hub in hubs:
        hub.stop()
    for hub in hubs:
        cleanup_hub(docker_api, hub.hub_id, hub.networks)


def _psql(url: str, sql: str) -> list[tuple[Any, ...]]:
    from tests.pg import _run_pg

    return _run_pg(url, sql)


async def test_two_hubs_killed_at_random_lose_and_duplicate_nothing(
    cluster: list[HubProcess],
    keys: dict[str, str],
    docker_api: docker.APIClient,
    pg_target: str,  # noqa: F811
) -> None:
    rng = random.Random(20261201)
    for hub in cluster:
        hub.start()
    accepted: dict[str, int] = {}
    submitted = 0
    kills: Counter[str] = Counter()
    cut = 0

    async with aiohttp.ClientSession() as http:

        async def submit(i: int) -> None:
            """One submission, retried on either hub under one Idempotency-Key until a hub
            accepts it: a kill mid-request must neither lose it nor make it twice."""
            nonlocal cut
            body = {"agent": "echo" if i % 3 else "echo-later", "input": {"n": i}, "timeout_s": 30}
            headers = {**auth(keys["user"]), "Idempotency-Key": f"sub-{i}"}
            for attempt in range(200):
                hub = cluster[(i + attempt) % 2]
                try:
                    async with http.post(hub.url + "/v1/tasks", json=body, headers=headers) as resp:
                        data = await resp.json()
                        if resp.status in (200, 202):
                            accepted[data["task_id"]] = i
                            return
                        assert resp.status == 503, data  # degraded while recovering
                except (TimeoutError, aiohttp.ClientError):
                    cut += 1
                await asyncio.sleep(0.05)
            raise AssertionError(f"submission {i} never accepted")

        jobs: list[asyncio.Task[None]] = []
        for kill_no in range(KILLS):
            for _ in range(4):
                submitted += 1
                jobs.append(asyncio.create_task(submit(submitted)))
            await asyncio.sleep(rng.choice([0.0, 0.05, 0.2, 0.4, 0.8, 1.2]))
            victim = cluster[kill_no % 2]
            victim.kill()
            kills[victim.hub_id] += 1
            # Restart now, after its lease expired (the other hub takes over), or late.
            await asyncio.sleep(rng.choice([0.0, 0.5, LEASE_S * 1.5, LEASE_S * 3]))
            await asyncio.to_thread(victim.start)
        await asyncio.gather(*jobs)

        deadline = time.monotonic() + 120
        while True:
            rows = _psql(pg_target, "SELECT id, state FROM tasks")
            if rows and all(s in TERMINAL for _, s in rows):
                break
            assert time.monotonic() < deadline, Counter(s for _, s in rows)
            await asyncio.sleep(0.5)

    rows = {
        r[0]: r for r in _psql(pg_target, "SELECT id, state, result, attempts, error FROM tasks")
    }
    ends = Counter(
        r[0]
        for r in _psql(
            pg_target,
            "SELECT task_id FROM task_events WHERE state IN "
            "('succeeded', 'failed', 'timed_out', 'cancelled')",
        )
    )
    takeovers = _psql(
        pg_target, "SELECT count(*) FROM task_events WHERE detail LIKE 're-dispatched%'"
    )[0][0]
    # One task per submission, however many times its request was cut and retried.
    assert len(accepted) == submitted == len(rows), (len(accepted), submitted, len(rows))
    for task_id, i in accepted.items():
        state, result = rows[task_id][1], rows[task_id][2]
        assert ends[task_id] == 1, f"{task_id} ended {ends[task_id]} times"
        assert state == "succeeded", rows[task_id]
        assert json.loads(result) == {"echo": {"n": i}, "agent": "echo"}
    verify = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "decisions", "verify", "--store", pg_target],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(
        "CLUSTER-CRASH-TEST "
        + json.dumps(
            {
                "kills": dict(kills),
                "tasks": len(rows),
                "requests_cut": cut,
                "re_dispatches": takeovers,
            }
        )
    )
    for hub in cluster:
        hub.stop()
    for hub in cluster:
        leftover = docker_api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub.hub_id}"]})
        assert leftover == [], _story(pg_target, leftover, cluster)


def _story(url: str, leftover: list[dict[str, Any]], cluster: list[HubProcess]) -> str:
    """What a failure needs to be understood: each leftover container, its task's history,
    and what the hubs logged about that task."""
    lines = []
    for c in leftover:
        task_id = c["Labels"].get(LABEL_TASK, "")
        lines.append(f"{c['Names']} {c['State']} {c['Status']} labels={c['Labels']}")
        for row in _psql(
            url,
            f"SELECT at, state, detail FROM task_events WHERE task_id = '{task_id}' ORDER BY id",
        ):
            lines.append(f"  {row}")
        for hub in cluster:
            lines += [f"  {hub.hub_id}: {line}" for line in hub.log_lines(task_id)]
    return "\n".join(lines)
