"""Quotas and rate limits: what a check costs, and what a flood of denials writes.

1. The limiter's cost per check (``gateway.limits.Limiter``, the shipped limits.yaml): an
   admitted API call, a refused one (the 429 error with its headers is built), a submission
   (bucket plus pending reservation) and a message. Timed one call at a time with
   ``perf_counter_ns``; the timer's own cost (measured) is subtracted.
2. The pending count a submission checks: the task router's in-memory count against the
   same count asked of SQLite (100,000 tasks, one subject's pending ones).
3. A flood of denied messages: an agent instance (a real JWT-SVID of the hub) sends
   ``ping`` to ``calc``, which the messages policy denies, as fast as 16 connections allow,
   over real HTTP on loopback. Each denial is a decision record. The same flood runs
   against a hub without limits and one with ``messages: {rate: 10, burst: 20}``, in one
   run; the figure is decision-log growth per second (records and bytes).

Usage: python bench/bench_limits.py [seconds per flood]    (default 5)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web

from bench._stats import report, summary
from gateway.bundle.schemas import SchemaSet
from gateway.errors import TooManyRequests
from gateway.http.app import HUB, create_app
from gateway.identity.apikeys import KeyStore, Subject
from gateway.limits import Limiter, load_limits
from gateway.limits.quotas import SubjectQuotas
from gateway.settings import REPO_ROOT, Settings
from gateway.store import Store

FLOOD_S = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
CHECKS = 200_000
CONCURRENCY = 16
LIMITED = """\
version: 1
instances:
  default:
    messages: {rate: 10, burst: 20}
"""


def timer_overhead_ns() -> float:
    samples = []
    for _ in range(20_000):
        a = time.perf_counter_ns()
        b = time.perf_counter_ns()
        samples.append(b - a)
    samples.sort()
    return float(samples[len(samples) // 2])


def time_calls(call: Any, n: int, overhead: float) -> dict[str, float]:
    """Median and p99 (µs) of ``call()``, one at a time."""
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        a = clock()
        call()
        b = clock()
        out.append(max(0.0, (b - a - overhead) / 1000))
    s = summary(out)
    return {"median_us": s["median"], "p99_us": s["p99"]}


def measure_checks() -> dict[str, Any]:
    limits = load_limits(REPO_ROOT / "limits.yaml", SchemaSet.load(REPO_ROOT / "schemas"))
    quotas = SubjectQuotas()
    limiter = Limiter(limits=lambda: limits, pending_of=quotas.pending_of)
    overhead = timer_overhead_ns()
    subjects = [Subject(f"user-{i}", ("user",), f"k{i}") for i in range(1000)]
    i = 0

    def admitted() -> None:
        nonlocal i
        i += 1
        limiter.api_call(subjects[i % 1000], None)  # 1,000 callers: never empty

    hog = Subject("hog", ("user",), "kh")
    for _ in range(1000):
        try:
            limiter.api_call(hog, None)
        except TooManyRequests:
            break

    def refused() -> None:
        with contextlib.suppress(TooManyRequests):
            limiter.api_call(hog, None)

    def submission() -> None:
        nonlocal i
        i += 1
        with limiter.submission(subjects[i % 1000], None):
            pass

    def message() -> None:
        nonlocal i
        i += 1
        limiter.message(f"instance-{i % 1000}", "echo")

    # 1,000 callers, each called at most its burst times: every timed call is admitted
    # (the refused path is timed on its own, against one empty bucket).
    figures: dict[str, Any] = {"timer_overhead_ns": overhead}
    figures["api_call_admitted"] = time_calls(admitted, min(CHECKS, 1000 * 100), overhead)
    figures["api_call_refused"] = time_calls(refused, CHECKS, overhead)
    figures["submission"] = time_calls(submission, min(CHECKS, 1000 * 20), overhead)
    figures["message"] = time_calls(message, min(CHECKS, 1000 * 200), overhead)
    figures["limiter_refusals"] = dict(limiter.refused)
    figures["pending_count_memory"] = time_calls(
        lambda: quotas.pending_of("user-7"), CHECKS, overhead
    )
    return figures


async def measure_store_count(tmp: Path) -> dict[str, float]:
    store = Store(tmp / "count.db", synchronous="NORMAL")
    try:

        def fill(db: Any) -> None:
            rows = [
                (
                    str(uuid.uuid4()),
                    "pending" if n % 50 == 0 else "succeeded",
                    "echo",
                    f"user-{n % 100}",
                    "2026-01-01T00:00:00.000Z",
                    "2026-01-01T00:00:00.000Z",
                )
                for n in range(100_000)
            ]
            db.conn.executemany(
                "INSERT INTO tasks (id, state, agent, subject, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

        await store.write(fill)
        sql = "SELECT count(*) FROM tasks WHERE subject = ? AND state = 'pending'"
        samples = []
        for n in range(500):
            start = time.perf_counter()
            await store.read(lambda db, n=n: db.execute(sql, [f"user-{n % 100}"]).fetchone()[0])
            samples.append((time.perf_counter() - start) * 1e6)
        s = summary(samples)
        return {"median_us": s["median"], "p99_us": s["p99"]}
    finally:
        await store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def flood(tmp: Path, limits_file: Path | None) -> dict[str, Any]:
    """Denied messages from one instance for FLOOD_S seconds; decision-log growth."""
    tag = secrets.token_hex(3)
    state = tmp / f"state-{tag}"
    keys = KeyStore.load(tmp / "keys.json")
    key = keys.create("bench-" + tag, ["user", "developer"])
    settings = Settings(
        port=free_port(),
        state_dir=state,
        keys_file=tmp / "keys.json",
        hub_id="bench-" + tag,
        limits_file=limits_file,
        probe_interval_s=0,
        reload_poll_s=0,
    )
    app = create_app(settings, backend=_NoEngine())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    hub = app[HUB]
    try:
        # A live instance of the hub (no container needed): its token is a real JWT-SVID.
        inst = hub.instances.open(
            agent="probe", task_id=str(uuid.uuid4()), subject=hub.keys.authenticate(key)
        )
        headers = {"Authorization": f"Bearer {inst.env['AGENT_SVID']}"}
        denied = {"type": "request", "to": "calc", "kind": "ping", "payload": {}}
        url = f"http://127.0.0.1:{settings.port}/v1/messages"

        async def size() -> tuple[int, int]:
            return await hub.store.read(  # type: ignore[no-any-return]
                lambda db: tuple(
                    db.execute(
                        "SELECT count(*), coalesce(sum(length(decision_id) + length(timestamp)"
                        " + length(path) + length(input) + length(result) + length(revision)"
                        " + coalesce(length(labels), 0) + coalesce(length(metrics), 0)"
                        " + length(hash) + length(prev_hash)), 0) FROM decisions"
                    ).fetchone()
                )
            )

        codes: dict[int, int] = {}
        rows0, bytes0 = await size()
        deadline = time.monotonic() + FLOOD_S
        async with aiohttp.ClientSession(headers=headers) as http:

            async def sender() -> None:
                while time.monotonic() < deadline:
                    async with http.post(url, json=denied) as r:
                        await r.read()
                        codes[r.status] = codes.get(r.status, 0) + 1

            start = time.monotonic()
            await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
            elapsed = time.monotonic() - start
        rows1, bytes1 = await size()
        sent = sum(codes.values())
        return {
            "requests_per_s": round(sent / elapsed),
            "status_counts": codes,
            "decision_records_per_s": round((rows1 - rows0) / elapsed, 1),
            "decision_bytes_per_s": round((bytes1 - bytes0) / elapsed),
            "rate_limited": hub.limiter.refused.get("messages", 0),
        }
    finally:
        await runner.cleanup()


class _NoEngine:
    """A container engine that is there and runs nothing (no task is dispatched here)."""

    async def ping(self) -> None:
        return None

    async def prepare(self) -> dict[str, str]:
        return {"internal_gateway": "127.0.0.1"}

    async def list_managed(self, hub_id: str | None = None) -> list[dict[str, Any]]:
        return []

    async def close(self) -> None:
        return None


async def main() -> None:
    report("limits: cost per check", measure_checks())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        report("limits: pending count from SQLite (100,000 tasks)", await measure_store_count(tmp))
        limited = tmp / "limits.yaml"
        limited.write_text(LIMITED)
        off = await flood(tmp, None)
        on = await flood(tmp, limited)
        report(
            "limits: flood of denied messages, one instance, 16 connections",
            {"seconds": FLOOD_S, "limits_off": off, "limits_on (10/s, burst 20)": on},
        )


if __name__ == "__main__":
    asyncio.run(main())
