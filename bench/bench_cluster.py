"""Several hubs on one PostgreSQL: dispatch and message throughput, CPU per operation,
takeover time after a hub's death. One run, real Docker engine, real ``agent-gateway serve``
processes, a throwaway PostgreSQL (``gateway.store.pg_server``) made under ``bench/`` (the
checkout's disk, like the SQLite reference's state directory) and removed afterwards.

1. Dispatch: cold ``echo`` tasks (``POST /v1/tasks?wait=30``, ``INFLIGHT`` in flight from
   this process) against one hub on SQLite (the reference), one hub on PostgreSQL, and two
   hubs on one other PostgreSQL database with the same load split across both (task i to hub
   i % 2). Phases alternate in rounds (SQLite, one, two; ``ROUNDS`` times) so that drift and
   the other load of the machine hit all three; every hub runs throughout and each phase
   counts only the CPU of the hubs it loads.
2. Messages: in each of the three set-ups a ``probe`` target holds; a ``probe`` sender sends
   ``ping`` requests from 8 threads (its script's ``load`` step, timed inside the sender).
   With two hubs the target runs on hub A and the sender on hub B, so every message crosses
   hubs (B finds the target in the instance directory and delivers to it straight).
3. Takeover: two fresh hubs with ``--lease LEASE_S`` (heartbeat every lease/5). Each repeat
   puts ``TAKEOVER_TASKS`` long echo tasks (progress steps) on one hub, SIGKILLs it once they
   run, and polls PostgreSQL every 20 ms: the time from the kill to the other hub's claim
   (``task_leases.hub_id``) and to every task's terminal state; then restarts the victim.
   The victim alternates.

CPU per operation is ``utime + stime`` of the hub processes (``/proc/<pid>/stat``, all their
threads; no children: agents run in containers, whose processes are children of the
engine's shim, not of the hub) over the phase, divided by the operations; the client (this
process) and the agents are not in it. PostgreSQL's own CPU is the postmaster's and its
children's (one backend per pooled connection; a backend that exits during a phase loses
its share), shown separately. Message CPU subtracts one dispatch (the sender's) at the
phase's measured CPU per dispatch.

Usage: python bench/bench_cluster.py [tasks_per_phase] [--rounds R] [--messages M]
                                     [--lease S] [--takeovers K]
    (needs Docker, the example images, Debian's postgresql; run as root for the firewall)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import asyncpg
import docker
import docker.errors

from bench._stats import report, summary
from gateway.identity.apikeys import KeyStore
from gateway.settings import REPO_ROOT
from gateway.store.pg_server import PgServer


def _option(name: str, default: float) -> float:
    argv = sys.argv[1:]
    return float(argv[argv.index(name) + 1]) if name in argv[:-1] else default


N = int(sys.argv[1]) if sys.argv[1:2] and sys.argv[1].isdigit() else 32
ROUNDS = int(_option("--rounds", 3))
MESSAGES = int(_option("--messages", 1500))
LEASE_S = _option("--lease", 3.0)
TAKEOVERS = int(_option("--takeovers", 6))
TAKEOVER_TASKS = 3
INFLIGHT = 8
HERE = Path(__file__).resolve().parent
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")
PROBE_BLOCK = re.compile(r"(- name: probe\n(?:[ \t].*\n)*?[ \t]+timeout_s: )\d+")
HOLD_S = 300


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU of ``root`` and its live children (PostgreSQL's postmaster and backends)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            if pid == root or int(fields[1]) == root:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uptime() -> str:
    """The load averages (1, 5, 15 min): the machine may be busy with other work."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Hub:
    """``agent-gateway serve`` as a child process that can be SIGKILLed and restarted."""

    def __init__(self, home: Path, name: str, tag: str, agents: Path, *extra: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.hub_id = f"bench-{tag}-{name}"
        self.networks = [f"agw-bench-{tag}-{name}-int", f"agw-bench-{tag}-{name}-egr"]
        self.log = home / "hub.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [  # the bench's limits file sits next to its agents.yaml
            sys.executable, "-m", "gateway", "serve",
            "--port", str(self.port),
            "--state-dir", str(home / "state"),
            "--keys", str(home.parent / "keys.json"),
            "--hub-id", self.hub_id,
            "--agents", str(agents),
            "--limits", str(agents.parent / "limits.yaml"),
            "--network", self.networks[0],
            "--egress-network", self.networks[1],
            "--log-level", "warning",
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=log, cwd=REPO_ROOT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(
                        f"hub {self.name} exited: {self.log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.05)
        raise SystemExit(f"hub {self.name} did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def cleanup(hubs: list[Hub]) -> list[str]:
    """Stop every hub, remove their containers, networks and firewall rules; the
    containers that were still there."""
    from tests.integration.conftest import cleanup_hub

    for hub in hubs:
        hub.stop()
    # The engine may be restarting under someone else's test: wait for it, a minute at most.
    for attempt in range(60):
        try:
            api = docker.from_env(version="auto").api
            left: list[str] = []
            for hub in hubs:
                left += cleanup_hub(api, hub.hub_id, hub.networks)
            return left
        except docker.errors.DockerException:
            if attempt == 59:
                raise
            time.sleep(1)
    return []


class Client:
    """The bench's HTTP side: one session, the bench key."""

    def __init__(self, http: aiohttp.ClientSession, key: str) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {key}"}
        self.budget_denials = 0

    async def submit(self, hub: Hub, body: dict[str, Any], wait: float | None = None) -> Any:
        """POST a task (retrying 503 while a hub is degraded); the answer's JSON."""
        url = hub.url + "/v1/tasks" + (f"?wait={wait:g}" if wait else "")
        for _ in range(200):
            async with self.http.post(url, json=body, headers=self.headers) as resp:
                data = await resp.json()
                if resp.status in (200, 202):
                    return data
                if resp.status == 403 and "budget" in data["error"]["message"]:
                    # A policy evaluation starved of CPU past its 50 ms budget is a deny
                    # (fail closed); on a loaded machine it happens, and it is counted.
                    self.budget_denials += 1
                elif resp.status != 503:
                    raise SystemExit(f"{hub.name}: {resp.status} {data}")
            await asyncio.sleep(0.1)
        raise SystemExit(f"{hub.name} stayed unavailable")

    async def get(self, hub: Hub, task_id: str, wait: float = 0) -> Any:
        url = f"{hub.url}/v1/tasks/{task_id}" + (f"?wait={wait:g}" if wait else "")
        async with self.http.get(url, headers=self.headers) as resp:
            return await resp.json()

    async def result(self, hub: Hub, body: dict[str, Any], wait: float = 60) -> Any:
        """Submit and wait until the task ends; its final JSON."""
        data = await self.submit(hub, body, wait=30)
        deadline = time.monotonic() + wait
        while data["state"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise SystemExit(f"task {data['task_id']} still {data['state']}")
            data = await self.get(hub, data["task_id"], wait=10)
        return data

    async def cancel(self, hub: Hub, task_id: str) -> None:
        async with self.http.delete(f"{hub.url}/v1/tasks/{task_id}", headers=self.headers):
            pass


# -- 1. dispatch


async def dispatch_phase(client: Client, hubs: list[Hub], n: int) -> dict[str, float]:
    """``n`` echo tasks, INFLIGHT at a time, task i to hubs[i % len(hubs)]."""
    sem = asyncio.Semaphore(INFLIGHT)
    nonce = secrets.token_hex(3)

    async def one(i: int) -> None:
        async with sem:
            body = {"agent": "echo", "input": {"n": i, "run": nonce}}
            data = await client.result(hubs[i % len(hubs)], body)
            if data["state"] != "succeeded" or data["result"]["echo"] != body["input"]:
                raise SystemExit(f"echo task went wrong: {data}")

    cpu0 = sum(cpu_seconds(h.pid) for h in hubs)
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    cpu = sum(cpu_seconds(h.pid) for h in hubs) - cpu0
    return {"tasks_per_s": n / elapsed, "hub_cpu_s_per_task": cpu / n}


# -- 2. messages


async def wait_running(client: Client, hub: Hub, task_id: str) -> None:
    for _ in range(600):
        data = await client.get(hub, task_id)
        if data["state"] == "running":
            return
        if data["state"] in TERMINAL:
            raise SystemExit(f"probe target ended: {data}")
        await asyncio.sleep(0.05)
    raise SystemExit(f"probe target {task_id} never ran")


async def message_phase(
    client: Client, target_hub: Hub, sender_hub: Hub, hubs: list[Hub], dispatch_cpu: float
) -> dict[str, float]:
    """The sender on ``sender_hub`` sends MESSAGES pings to the probe on ``target_hub``."""
    warm = {"op": "load", "to": "probe", "n": 50, "concurrency": 2}
    load = {"op": "load", "to": "probe", "n": MESSAGES, "concurrency": 8}
    body = {"agent": "probe", "input": {"script": [warm, load]}, "timeout_s": 120}
    cpu0 = sum(cpu_seconds(h.pid) for h in hubs)
    data = await client.result(sender_hub, body, wait=120)
    cpu = sum(cpu_seconds(h.pid) for h in hubs) - cpu0
    if data["state"] != "succeeded":
        raise SystemExit(f"sender {data['state']}: {data.get('error')}")
    results = data["result"]["results"]
    bad = [r for r in results if not r.get("ok")]
    if bad:
        raise SystemExit(f"message load failed: {bad[0]}")
    sent = sum(r["n"] for r in results)
    return {
        "msgs_per_s": results[1]["per_s"],
        "p50_ms": results[1]["p50_ms"],
        "hub_cpu_ms_per_msg": max(0.0, cpu - dispatch_cpu) / sent * 1000,
    }


# -- 3. takeover


async def takeover_once(
    client: Client, pg: asyncpg.Connection, victim: Hub, survivor: Hub
) -> dict[str, float]:
    """Long tasks on ``victim``; SIGKILL it once they run; seconds to the survivor's claim
    and to every task's end."""
    # 20 progress steps 0.5 s apart: still running when the lease has expired.
    body = {
        "agent": "echo",
        "input": {"progress_steps": 20, "progress_delay_s": 0.5},
        "timeout_s": 30,  # echo's limit in agents.yaml
    }
    ids = [(await client.submit(victim, body))["task_id"] for _ in range(TAKEOVER_TASKS)]
    for task_id in ids:
        await wait_running(client, victim, task_id)
    # Had nothing happened, the last would end about 10 s (its steps) after it was seen running.
    uninterrupted_end = time.monotonic() + 20 * 0.5
    await asyncio.sleep(secrets.randbelow(1000) / 1000 * LEASE_S / 5)  # anywhere in a beat
    t0 = time.monotonic()
    victim.kill()
    claimed: float | None = None
    ended: float | None = None
    while ended is None:
        now = time.monotonic() - t0
        if now > 120:
            raise SystemExit("takeover: tasks did not end within 120 s")
        if claimed is None:
            owners = await pg.fetch(
                "SELECT hub_id FROM task_leases WHERE task_id = ANY($1::text[])", ids
            )
            if owners and all(r["hub_id"] == survivor.hub_id for r in owners):
                claimed = now
        states = await pg.fetch("SELECT state FROM tasks WHERE id = ANY($1::text[])", ids)
        if len(states) == len(ids) and all(r["state"] in TERMINAL for r in states):
            ended = now
            claimed = claimed if claimed is not None else now
        await asyncio.sleep(0.02)
    rows = await pg.fetch("SELECT id, state, result FROM tasks WHERE id = ANY($1::text[])", ids)
    for r in rows:
        if r["state"] != "succeeded" or json.loads(r["result"])["echo"] != body["input"]:
            raise SystemExit(f"takeover: task {r['id']} ended {r['state']}")
    ends = await pg.fetchval(
        "SELECT count(*) FROM task_events WHERE task_id = ANY($1::text[]) AND state = ANY($2)",
        ids,
        list(TERMINAL),
    )
    if ends != len(ids):
        raise SystemExit(f"takeover: {ends} terminal events for {len(ids)} tasks")
    redispatched = await pg.fetchval(
        "SELECT count(DISTINCT task_id) FROM task_events"
        " WHERE task_id = ANY($1::text[]) AND detail LIKE 're-dispatched%'",
        ids,
    )
    await asyncio.to_thread(victim.start)
    return {
        "claim_s": claimed,
        "terminal_s": ended,
        "late_s": t0 + ended - uninterrupted_end,
        "redispatched": float(redispatched),
    }


# -- the run


def registry(tmp: Path) -> Path:
    """agents.yaml with a probe whose task may hold for the whole message section."""
    path = tmp / "agents.yaml"
    shipped = (REPO_ROOT / "agents.yaml").read_text()
    path.write_text(PROBE_BLOCK.sub(rf"\g<1>{HOLD_S + 60}", shipped, count=1))
    return path


# The shipped limits would cap a throughput bench (5 submissions/s, 100 messages/s per
# container); the bench measures the hubs, so it lifts them (null: unlimited).
LIMITS = """version: 1
subjects:
  default: {requests: null, submit: null, pending: 1000, running: 64}
  roles: {}
  ids: {}
instances:
  default: {messages: null}
  agents: {}
hub: {long_polls: 512}
"""


def ratios(figures: dict[str, Any], key: str) -> dict[str, float]:
    sqlite, one, two = (figures[f"{c}_{key}"] for c in ("sqlite", "pg_one_hub", "pg_two_hubs"))
    out: dict[str, float] = {}
    for field, value in one.items():
        if isinstance(value, float) and field in two and field in sqlite:
            out[f"{field}: two/one"] = round(two[field] / value, 3)
            out[f"{field}: pg_one/sqlite"] = round(value / sqlite[field], 3)
    return out


async def run(tmp: Path, pg: PgServer, tag: str, hubs: list[Hub]) -> dict[str, Any]:
    keys = KeyStore.load(tmp / "keys.json")
    key = keys.create("bench", ["user", "developer"])
    agents = registry(tmp)
    limits = tmp / "limits.yaml"
    limits.write_text(LIMITS)
    db_one, db_two, db_takeover = pg.url, pg.new_database(), pg.new_database()
    lease = ("--lease", "10")  # the default, spelt out: the throughput set-ups' setting
    sqlite = Hub(tmp / "s", "s", tag, agents)
    one = Hub(tmp / "p", "p", tag, agents, "--store", db_one, *lease)
    two = [Hub(tmp / n, n, tag, agents, "--store", db_two, *lease) for n in ("a", "b")]
    hubs += [sqlite, one, *two]
    for hub in hubs:
        await asyncio.to_thread(hub.start)
    setups = {"sqlite": [sqlite], "pg_one_hub": [one], "pg_two_hubs": two}
    figures: dict[str, Any] = {"uptime_before": uptime(), "lease_s_throughput": 10.0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        client = Client(http, key)
        for hub in hubs:  # warm up: images' config, the first container, the pools
            await dispatch_phase(client, [hub], 2)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        pg_cpu: dict[str, float] = dict.fromkeys(setups, 0.0)
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        for r in range(ROUNDS):
            for name, serving in setups.items():
                before = tree_cpu(postmaster)
                runs[name].append(await dispatch_phase(client, serving, N))
                pg_cpu[name] += tree_cpu(postmaster) - before
                print(f"  round {r + 1} {name}: {runs[name][-1]}", flush=True)
        dispatch_cpu: dict[str, float] = {}
        for name, got in runs.items():
            rates = [g["tasks_per_s"] for g in got]
            cpu = statistics.median(g["hub_cpu_s_per_task"] for g in got)
            dispatch_cpu[name] = cpu
            figures[f"{name}_dispatch"] = {
                "tasks_per_s": statistics.median(rates),
                "hub_cpu_ms_per_task": cpu * 1000,
                "rounds_tasks_per_s": [round(x, 2) for x in rates],
            }
            if name != "sqlite":
                figures[f"{name}_dispatch"]["pg_server_cpu_ms_per_task"] = (
                    pg_cpu[name] / (N * ROUNDS) * 1000
                )
        figures["dispatch_ratios"] = ratios(figures, "dispatch")
        if MESSAGES:
            figures.update(await messages(client, setups, dispatch_cpu))
        # Their networks go too: the engine's address pools are few and shared with others.
        left = await asyncio.to_thread(cleanup, hubs)
        figures["containers_left_after_throughput_hubs_stopped"] = len(left)
        hubs.clear()
        figures.update(await takeovers(client, tmp, tag, agents, db_takeover, hubs))
        figures["policy_budget_denials_retried"] = client.budget_denials
    figures["uptime_after"] = uptime()
    return figures


async def messages(
    client: Client, setups: dict[str, list[Hub]], dispatch_cpu: dict[str, float]
) -> dict[str, Any]:
    """Message rounds in every set-up: a target held on the first hub, the sender on the
    last (with two hubs: target on A, sender on B)."""
    targets: dict[str, str] = {}
    hold = {"agent": "probe", "input": {"hold_s": HOLD_S}, "timeout_s": HOLD_S + 30}
    for name, serving in setups.items():
        targets[name] = (await client.submit(serving[0], hold))["task_id"]
        await wait_running(client, serving[0], targets[name])
    # The other hub learns of the target at its next beat (lease/5 = 2 s).
    await asyncio.sleep(2.5)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    for r in range(max(1, ROUNDS - 1)):
        for name, serving in setups.items():
            got = await message_phase(client, serving[0], serving[-1], serving, dispatch_cpu[name])
            runs[name].append(got)
            print(f"  messages round {r + 1} {name}: {got}", flush=True)
    for name, serving in setups.items():
        await client.cancel(serving[0], targets[name])
    figures: dict[str, Any] = {}
    for name, got in runs.items():
        figures[f"{name}_messages"] = {
            "msgs_per_s": statistics.median(g["msgs_per_s"] for g in got),
            "p50_ms": statistics.median(g["p50_ms"] for g in got),
            "hub_cpu_ms_per_msg": statistics.median(g["hub_cpu_ms_per_msg"] for g in got),
            "rounds_msgs_per_s": [g["msgs_per_s"] for g in got],
        }
    figures["message_ratios"] = ratios(figures, "messages")
    return figures


async def takeovers(
    client: Client, tmp: Path, tag: str, agents: Path, url: str, hubs: list[Hub]
) -> dict[str, Any]:
    pair = [
        Hub(tmp / n, n, tag, agents, "--store", url, "--lease", f"{LEASE_S:g}")
        for n in ("ta", "tb")
    ]
    hubs += pair
    for hub in pair:
        await asyncio.to_thread(hub.start)
    for hub in pair:
        await dispatch_phase(client, [hub], 1)
    conn = await asyncpg.connect(url)
    got: list[dict[str, float]] = []
    try:
        for i in range(TAKEOVERS):
            victim, survivor = pair[i % 2], pair[1 - i % 2]
            got.append(await takeover_once(client, conn, victim, survivor))
            print(f"  takeover {i + 1} ({victim.name} killed): {got[-1]}", flush=True)
    finally:
        await conn.close()
    claim = [g["claim_s"] for g in got]
    end = [g["terminal_s"] for g in got]
    beat = LEASE_S / 5
    return {
        "takeover": {
            "lease_s": LEASE_S,
            "heartbeat_s": beat,
            "repeats": len(got),
            "tasks_each": TAKEOVER_TASKS,
            "claim_median_s": statistics.median(claim),
            "claim_max_s": max(claim),
            "terminal_median_s": statistics.median(end),
            "terminal_max_s": max(end),
            "terminal_later_than_uninterrupted_median_s": statistics.median(
                g["late_s"] for g in got
            ),
            # The rest were re-attached: their containers outlived the hub.
            "tasks_redispatched": int(sum(g["redispatched"] for g in got)),
        },
        "takeover_claim_s": summary(claim),
        "takeover_terminal_s": summary(end),
        "takeover_claim_over_lease_plus_beat": round(
            statistics.median(claim) / (LEASE_S + beat), 3
        ),
    }


def main() -> None:
    tag = secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir=HERE))
    hubs: list[Hub] = []
    pg: PgServer | None = None
    left: list[str] = []
    try:
        os.chmod(tmp, 0o755)
        pg = PgServer.start(parent=tmp)
        figures = asyncio.run(run(tmp, pg, tag, hubs))
    except BaseException:
        for hub in hubs:  # the hubs' own account, before their directory goes
            if hub.log.exists():
                print(f"--- {hub.name} ({hub.hub_id}) log tail:\n{hub.log.read_text()[-2500:]}")
        raise
    finally:
        try:
            left = cleanup(hubs)
        finally:
            if pg is not None:
                pg.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    if left:
        print(f"containers left after the hubs stopped (removed now): {left}")
    figures["containers_left_after_stop"] = len(left)
    report(
        f"cluster: one hub on SQLite, one and two hubs on one PostgreSQL (n={N}, "
        f"{INFLIGHT} in flight, {ROUNDS} rounds)",
        figures,
    )


if __name__ == "__main__":
    main()
