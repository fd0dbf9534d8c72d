"""Where the hub's CPU goes for one routed agent-to-agent message, stage by stage (issue 15).

A real hub runs in this process (``Settings``, ``create_app``, ``web.AppRunner`` on loopback,
a SQLite file, the shipped ``policies/``, ``schemas/`` and ``agents.yaml``); two ``probe``
agents run as tasks of it, as host processes (``bench.bench_messages.ProcessBackend``): one
holds and answers ``POST /message``, the other's JWT-SVID is what the sender presents. The
sender is a subprocess (``http.client``, keep-alive connections opened and used once before
the clock starts) that posts ``{"type": "request", "kind": "ping", "to": "probe"}`` to
``POST /v1/messages``: ``N`` one at a time, then ``N`` with 16 in flight from 16 threads.

Why this split: the hub's CPU must be its own. The sender and both agents are other
processes, so this process's CPU (``time.process_time``) over a phase is the hub's, plus
the bench's own bookkeeping once per phase (two pipe lines). Per thread: the event loop's
(``time.thread_time_ns`` on it), the store writer's (its ``pthread_getcpuclockid`` clock),
and the rest (reader threads, executors).

Stages are measured by wrapping the real methods on the hub's instances (and two methods of
aiohttp's ``RequestHandler`` class) in this process only; the package code is untouched.
Each wrapper reads the thread's CPU clock and ``perf_counter`` before and after:

| stage | what is wrapped |
|---|---|
| auth | ``hub.identities.verify`` (the JWT-SVID; cached after its first use) |
| envelope schema | ``config.schemas.validate`` of ``message.json`` |
| payload schema | ``config.schemas.validate`` of ``messages/kinds/ping.json`` |
| policy decision | ``config.policy.evaluate`` (the compiled fast path when on) |
| decision record | ``hub.decisions.prepare`` + ``hub.store.append_decision`` (loop side: queue,
  wake-up) + on the writer thread: the record's seal (canonical JSON, SHA-256, row), its write
  less the seal (INSERT, head witness), ``Store._run_batch`` less the writes (BEGIN,
  savepoints, COMMIT with its fsync), and the writer's CPU outside batches |
| hand-off | ``hub.messages.wire.post`` (AgentWire: encode, write, read, decode) |
| HTTP | ``RequestHandler.data_received`` (parse) + ``RequestHandler.finish_response`` (write) |
| other: JSON in and out | ``agent_routes.read_json`` (body read, ``json.loads``) and
  ``web.json_response`` (the reply encoded) |
| other: code around | ``MessageRouter.send`` less the stages inside it (target lookup, policy
  input, the delivery body...), and the app handler (routing, middleware, the route: limiter,
  trace context, sender) less ``send``, auth and the JSON in and out |
| remainder | the hub's total less everything above: the event loop itself (epoll, socket
  reads and writes, task switching) and other threads |

One at a time, an async stage is timed from call to return (its CPU on the loop thread in
between is its own: nothing else runs), which includes the loop's work on its behalf (the
selector, protocol callbacks, the writer's wake-up). With 16 in flight that would count the
other messages' work, so there an async stage counts only its coroutine's own steps and
the loop's work lands in the remainder.

The clocks cost something (``thread_time_ns`` is a system call: about 0.6 µs on this VM).
Each sample has the measured cost of an empty interval taken off; each enclosing figure (the
code around the stages) also the cost of the wrappers called inside it; and each phase's
total the estimated cost of all its wrappers (calls times a wrapper's calibrated cost, plus
two clock reads per coroutine step). The table is per phase (its parts and its total from
the same messages), the median over the instrumented phases; the remainder is that total
less the rows, so the table adds up. Phases without any wrapper alternate with them, round
by round, and their totals are printed beside it: on a shared machine they differ from
round to round by more than the wrappers cost, which is why the table does not mix them.
Cold JWT-SVID verification (a token's first use, once per token and lifetime) is timed apart
on the loop thread, and each sync stage's last call is repeated back to back (warm caches:
what a micro-benchmark of it would say) to show what cold caches add in the path.

On a busy 2-core machine the CPU figures are the trustworthy ones; wall times and rates move
with whatever else runs.

Usage: python bench/bench_message_stages.py [n] [--uvloop] [--rounds R]
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

import gateway.http.agent_routes as agent_routes
from bench._stats import percentile, report
from bench.bench_messages import HOLD_S, start_probe_hub, wait_running
from gateway.bundle.config import MESSAGE_SCHEMA
from gateway.http.app import HUB
from gateway.policy.engine import MESSAGES_QUERY

args = [a for a in sys.argv[1:] if a.isdigit()]
N = int(args[0]) if args else 2000
UVLOOP = "--uvloop" in sys.argv
ROUNDS = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
CONCURRENCY = (1, 16)
PING = {"type": "request", "kind": "ping", "to": "probe", "payload": {"quiet": True}}
SCRIPT = str(Path(__file__).resolve())
SVID_ENV = "BENCH_SENDER_SVID"
clock = time.thread_time_ns
wall = time.perf_counter_ns

# The rows of the table: (name, its parts); a part is a wrapped stage or a derived figure.
ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("auth (JWT-SVID, cached)", ("auth",)),
    ("envelope schema", ("envelope",)),
    ("payload schema", ("payload",)),
    ("policy decision", ("policy",)),
    (
        "decision record",
        ("prepare", "append", "writer_seal", "writer_insert", "writer_tx", "writer_idle"),
    ),
    ("hand-off (AgentWire)", ("handoff",)),
    ("HTTP (aiohttp server)", ("parse", "respond")),
    ("other: JSON body in + reply out", ("read_json", "json_response")),
    ("other: code around the stages", ("router_glue", "route_glue")),
]
PART_NAMES = {
    "prepare": "prepare (mask, fields)",
    "append": "append, loop side",
    "writer_seal": "writer: seal (JSON, SHA-256)",
    "writer_insert": "writer: INSERT, head witness",
    "writer_tx": "writer: BEGIN..COMMIT, fsync",
    "writer_idle": "writer: outside batches",
    "parse": "request parse",
    "respond": "response write",
    "read_json": "read_json (body, json.loads)",
    "json_response": "web.json_response",
    "router_glue": "MessageRouter.send, the rest",
    "route_glue": "route, middleware, routing",
}
# A derived part: an enclosing stage less the wrapped stages called directly inside it.
DERIVED = {
    "router_glue": ("send", ("envelope", "payload", "policy", "prepare", "append", "handoff")),
    "route_glue": ("app", ("send", "auth", "read_json", "json_response")),
    "writer_insert": ("writer_write", ("writer_seal",)),
    "writer_tx": ("writer_batch", ("writer_write",)),
}
MEASURED = (
    "auth",
    "envelope",
    "payload",
    "policy",
    "prepare",
    "append",
    "handoff",
    "read_json",
    "json_response",
    "send",
    "app",
    "parse",
    "respond",
    "writer_batch",
    "writer_write",
    "writer_seal",
)


# -- instrumentation


class Stages:
    """Per-stage samples (CPU and wall ns) of the current phase, and the wrappers."""

    def __init__(self) -> None:
        self.cpu: dict[str, list[int]] = defaultdict(list)
        self.wall: dict[str, list[int]] = defaultdict(list)
        self.batch_sizes: list[int] = []
        self.steps = False  # async stages: count only the coroutine's own steps
        self.empty = 0  # ns an empty interval of the clock reads (taken off every sample)
        self.last: dict[str, tuple[Any, ...]] = {}  # a sync stage's last call: (func, a, kw)
        self.steps_taken = 0  # coroutine steps timed (each costs two clock reads)

    def clear(self) -> None:
        self.cpu.clear()
        self.wall.clear()
        self.batch_sizes.clear()
        self.steps_taken = 0

    def add(self, name: str, cpu: int, elapsed: int) -> None:
        self.cpu[name].append(cpu - self.empty)
        self.wall[name].append(elapsed)

    def sync(self, name: str | Callable[..., str], func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` timed; ``name`` may pick the stage from the call's arguments."""
        add, last = self.add, self.last

        def timed(*a: Any, **kw: Any) -> Any:
            w0, c0 = wall(), clock()
            try:
                return func(*a, **kw)
            finally:
                c1, w1 = clock(), wall()
                stage = name if isinstance(name, str) else name(*a)
                add(stage, c1 - c0, w1 - w0)
                last[stage] = (func, a, kw)

        return timed

    def coro(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        """An async ``func`` timed from call to return, or over its own steps only."""
        add = self.add

        async def spanned(*a: Any, **kw: Any) -> Any:
            w0, c0 = wall(), clock()
            try:
                return await func(*a, **kw)
            finally:
                c1, w1 = clock(), wall()
                add(name, c1 - c0, w1 - w0)

        def stepped(*a: Any, **kw: Any) -> Any:
            return _Stepped(func(*a, **kw), name, self)

        return stepped if self.steps else spanned


class _Stepped:
    """Drives a coroutine, counting the thread's CPU only while the coroutine itself runs."""

    __slots__ = ("coro", "name", "stages")

    def __init__(self, coro: Any, name: str, stages: Stages) -> None:
        self.coro, self.name, self.stages = coro, name, stages

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, cpu, start, stages = self.coro, 0, wall(), self.stages
        value: Any = None
        error: BaseException | None = None
        while True:
            stages.steps_taken += 1
            c0 = clock()
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                stages.add(self.name, cpu + clock() - c0, wall() - start)
                return stop.value
            except BaseException:
                stages.add(self.name, cpu + clock() - c0, wall() - start)
                raise
            cpu += clock() - c0
            try:
                value, error = (yield yielded), None
            except BaseException as e:  # a cancellation, thrown into the coroutine
                value, error = None, e


class Instrumented:
    """Installs the wrappers on a running hub and takes them off again."""

    def __init__(self, app: web.Application, runner: web.AppRunner, stages: Stages) -> None:
        self.app, self.runner, self.stages = app, runner, stages
        self.hub = app[HUB]
        self.originals: list[tuple[Any, str, Any, bool]] = []

    def _patch(self, owner: Any, attr: str, new: Any) -> None:
        on_instance = attr in vars(owner) if not isinstance(owner, type) else True
        self.originals.append((owner, attr, getattr(owner, attr), on_instance))
        setattr(owner, attr, new)

    def install(self, *, steps: bool) -> None:
        """Wrap every stage; ``steps``: async stages count their own steps only."""
        s, hub = self.stages, self.hub
        s.steps = steps
        config = hub.config
        self._patch(hub.identities, "verify", s.sync("auth", hub.identities.verify))

        def which(ref: str, *_: Any) -> str:
            return "envelope" if ref == MESSAGE_SCHEMA else "payload"

        self._patch(config.schemas, "validate", s.sync(which, config.schemas.validate))
        policy_evaluate = config.policy.evaluate

        def policy_stage(query: str, *_: Any) -> str:
            return "policy" if query == MESSAGES_QUERY else "policy_other"

        self._patch(config.policy, "evaluate", s.sync(policy_stage, policy_evaluate))
        self._patch(hub.decisions, "prepare", s.sync("prepare", hub.decisions.prepare))
        store = hub.store
        append_decision = store.append_decision

        def append(seal: Callable[..., Any], *, genesis: str) -> Any:
            # The seal runs on the writer thread: the sync wrapper reads that thread's clock.
            return append_decision(s.sync("writer_seal", seal), genesis=genesis)

        self._patch(store, "append_decision", s.coro("append", append))
        self._patch(store, "_run_batch", self._timed_batch(store._run_batch))  # type: ignore[attr-defined]
        wire = hub.messages.wire
        self._patch(wire, "post", s.coro("handoff", wire.post))
        self._patch(hub.messages, "send", s.coro("send", hub.messages.send))
        self._patch(web, "json_response", s.sync("json_response", web.json_response))
        self._patch(agent_routes, "read_json", s.coro("read_json", agent_routes.read_json))
        self._patch(RequestHandler, "data_received", s.sync("parse", RequestHandler.data_received))
        self._patch(
            RequestHandler, "finish_response", s.coro("respond", RequestHandler.finish_response)
        )
        server = self.runner.server
        assert server is not None
        # Read by each connection as it opens: the sender opens new ones for every phase.
        self._patch(server, "request_handler", s.coro("app", server.request_handler))

    def _timed_batch(self, run_batch: Callable[..., Any]) -> Callable[..., Any]:
        stages = self.stages

        write = self.stages.sync

        def timed(db: Any, batch: list[Any]) -> Any:
            w0, c0 = wall(), clock()  # on the writer thread: its own CPU clock
            try:
                # An item is (func, future, loop, ...): only the function is wrapped.
                return run_batch(db, [(write("writer_write", it[0]), *it[1:]) for it in batch])
            finally:
                c1, w1 = clock(), wall()
                stages.add("writer_batch", c1 - c0, w1 - w0)
                stages.batch_sizes.append(len(batch))

        return timed

    def uninstall(self) -> None:
        for owner, attr, original, on_instance in reversed(self.originals):
            if on_instance:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # the class's method shows through again
        self.originals.clear()


def calibrate(stages: Stages) -> dict[str, float]:
    """The clock pair's cost inside a sample (taken off each), and a sync wrapper's whole
    cost, ns, measured on this thread."""
    pairs = []
    for _ in range(20000):
        c0 = clock()
        pairs.append(clock() - c0)
    stages.empty = int(statistics.median(pairs))

    def noop() -> None:
        return None

    wrapped = stages.sync("calibration", noop)
    n = 20000
    c0 = clock()
    for _ in range(n):
        noop()
    bare = clock() - c0
    c0 = clock()
    for _ in range(n):
        wrapped()
    whole = clock() - c0
    stages.clear()
    return {"empty_interval_ns": stages.empty, "sync_wrapper_ns": round((whole - bare) / n, 1)}


# -- the sender: a subprocess posting messages when told to


def sender_child(port: int, token: str) -> None:
    """Child: for each ``"c n"`` line, open ``c`` connections (one message each), print
    ``ready``, wait for ``go``, post ``n`` messages from ``c`` threads, print the figures."""
    body = json.dumps(PING).encode()
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": f"Bearer {token}",
    }

    def one(conn: http.client.HTTPConnection) -> float:
        start = time.perf_counter()
        conn.request("POST", "/v1/messages", body, headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200 or "reply" not in json.loads(raw):
            raise SystemExit(f"message failed: {resp.status} {raw[:300]!r}")
        return time.perf_counter() - start

    for line in sys.stdin:
        c, n = (int(x) for x in line.split())
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(c)]
        for conn in conns:
            one(conn)
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return
        counter = iter(range(n))
        latencies: list[float] = []
        lock = threading.Lock()

        def worker(
            conn: http.client.HTTPConnection,
            counter: Any = counter,
            lock: threading.Lock = lock,
            latencies: list[float] = latencies,
        ) -> None:
            mine = [one(conn) for _ in iter(lambda: next(counter, None), None)]
            with lock:
                latencies.extend(mine)

        start = time.perf_counter()
        if c == 1:
            worker(conns[0])
        else:
            pool = [threading.Thread(target=worker, args=(conn,)) for conn in conns]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        elapsed = time.perf_counter() - start
        for conn in conns:
            conn.close()
        print(
            json.dumps(
                {
                    "n": len(latencies),
                    "per_s": len(latencies) / elapsed,
                    "p50_ms": percentile(latencies, 50) * 1e3,
                }
            ),
            flush=True,
        )


# -- the hub side


class Counters:
    """CPU clocks of this process and of its loop and writer threads, ns."""

    def __init__(self, writer: threading.Thread) -> None:
        assert writer.ident is not None
        self.writer_clock = time.pthread_getcpuclockid(writer.ident)

    def read(self) -> dict[str, int]:
        return {
            "process": time.process_time_ns(),
            "loop": time.thread_time_ns(),
            "writer": time.clock_gettime_ns(self.writer_clock),
        }


async def run_phase(
    sender: asyncio.subprocess.Process, counters: Counters, stages: Stages, c: int, n: int
) -> dict[str, Any]:
    """One phase: the sender's ``n`` messages at concurrency ``c``; the CPU deltas."""
    assert sender.stdin is not None and sender.stdout is not None
    sender.stdin.write(f"{c} {n}\n".encode())
    await sender.stdin.drain()
    if (await sender.stdout.readline()).strip() != b"ready":
        raise SystemExit("the sender did not get ready")
    stages.clear()
    before = counters.read()
    sender.stdin.write(b"go\n")
    await sender.stdin.drain()
    line = await sender.stdout.readline()
    after = counters.read()
    if not line:
        raise SystemExit("the sender died")
    got = json.loads(line)
    delta = {k: after[k] - before[k] for k in before}
    return {
        **got,
        "cpu_ns": delta,
        "samples": {k: list(v) for k, v in stages.cpu.items()},
        "walls": {k: list(v) for k, v in stages.wall.items()},
        "batches": list(stages.batch_sizes),
        "steps": stages.steps_taken,
    }


def per_message(phases: list[dict[str, Any]], c: int, overhead: dict[str, float]) -> dict[str, Any]:
    """The stage table of concurrency ``c``: per row and part, µs per message (p50, mean).

    Within each instrumented phase: every part's CPU per message, and that phase's total less
    the wrappers' estimated cost; then the median over phases of each. The remainder is that
    total less the rows, so the table adds up to it.
    """
    inst = [p for p in phases if p["c"] == c and p["instrumented"]]
    plain = [p for p in phases if p["c"] == c and not p["instrumented"]]
    outside = max(overhead["sync_wrapper_ns"] - overhead["empty_interval_ns"], 0)

    def total(p: dict[str, Any], what: str) -> float:
        return float(p["cpu_ns"][what]) / p["n"] / 1e3

    # Samples pooled over phases for the p50s: aligned per message when every stage of a
    # row ran once per message, else only the mean is meaningful.
    parts: dict[str, list[float]] = defaultdict(list)
    means: dict[str, list[float]] = defaultdict(list)
    for p in inst:
        n, samples = p["n"], p["samples"]
        per: dict[str, list[float] | None] = {}
        for name in MEASURED:
            got = [x / 1e3 for x in samples.get(name, [])]
            means[name].append(sum(got) / n)
            per[name] = got if len(got) == n else None
        means["writer_idle"].append(total(p, "writer") - means["writer_batch"][-1])
        for name, (outer, inner) in DERIVED.items():
            # Each inner wrapper also costs the enclosing stage its clock reads and call.
            calls = sum(len(samples.get(k, [])) for k in inner) / n
            cost = calls * outside / 1e3
            means[name].append(means[outer][-1] - sum(means[k][-1] for k in inner) - cost)
            aligned = [per[k] for k in (outer, *inner)]
            if all(a is not None for a in aligned):
                whole, *parts_in = aligned
                parts[name] += [
                    whole[i] - sum(x[i] for x in parts_in) - cost  # type: ignore[index]
                    for i in range(n)
                ]
        for name, got in per.items():
            if got is not None:
                parts[name] += got
        calls = sum(len(v) for v in samples.values()) / n
        wrappers = (calls * outside + p["steps"] / n * 2 * overhead["empty_interval_ns"]) / 1e3
        means["wrappers"].append(wrappers)
        means["total_instrumented"].append(total(p, "process"))
        means["base"].append(total(p, "process") - wrappers)
    base = statistics.median(means["base"])
    rows = []
    explained = 0.0
    for label, names in ROWS:
        mean = sum(statistics.median(means[k]) for k in names)
        explained += mean
        samples = [parts[k] for k in names if k != "writer_idle"]
        p50: float | None = None
        if all(samples) and len({len(s) for s in samples}) == 1:
            p50 = percentile([sum(x) for x in zip(*samples, strict=True)], 50)
            if "writer_idle" in names:
                p50 += statistics.median(means["writer_idle"])
        rows.append({"stage": label, "p50_us": p50, "mean_us": mean, "share": mean / base})
        if len(names) > 1:
            for k in names:
                m = statistics.median(means[k])
                sub = percentile(parts[k], 50) if parts.get(k) else None
                rows.append({"stage": "  " + PART_NAMES.get(k, k), "p50_us": sub, "mean_us": m})
                rows[-1]["share"] = m / base
    rest = base - explained
    rows.append({"stage": "remainder (not attributed)", "p50_us": None, "mean_us": rest})
    rows[-1]["share"] = rest / base
    plain_totals = [total(p, "process") for p in plain]
    loop = statistics.median(total(p, "loop") for p in plain)
    writer = statistics.median(total(p, "writer") for p in plain)
    return {
        "rows": rows,
        "total_us": base,
        "wrappers_us": statistics.median(means["wrappers"]),
        "total_instrumented_us": statistics.median(means["total_instrumented"]),
        "instrumented_rounds_us": [round(x, 1) for x in means["total_instrumented"]],
        "plain_total_us": statistics.median(plain_totals),
        "plain_rounds_us": [round(x, 1) for x in plain_totals],
        "plain_threads_us": {
            "loop": loop,
            "writer": writer,
            "other": statistics.median(plain_totals) - loop - writer,
        },
        "wall_p50_us": {
            k: percentile([x / 1e3 for p in inst for x in p["walls"].get(k, [])], 50)
            for k in ("auth", "policy", "append", "writer_batch", "handoff", "send", "app")
            if any(p["walls"].get(k) for p in inst)
        },
        "batch_mean": statistics.fmean(b for p in inst for b in p["batches"]),
        "sender_p50_ms": statistics.median(p["p50_ms"] for p in plain),
        "msgs_per_s": statistics.median(p["per_s"] for p in plain),
    }


def print_table(c: int, table: dict[str, Any]) -> None:
    print(f"\n-- hub CPU per routed message, {c} in flight (µs per message; share of the total)")
    print(f"  {'stage':34} {'p50':>8} {'mean':>8} {'share':>7}")
    for row in table["rows"]:
        p50 = f"{row['p50_us']:8.1f}" if row["p50_us"] is not None else f"{'-':>8}"
        print(f"  {row['stage']:34} {p50} {row['mean_us']:8.1f} {row['share']:7.1%}")
    print(
        f"  {'total (less the wrappers)':34} {'':8} {table['total_us']:8.1f}   "
        f"(measured {table['total_instrumented_us']:.1f}, wrappers ~{table['wrappers_us']:.1f};"
        f" phases without wrappers: {table['plain_total_us']:.1f}, rounds "
        f"{table['plain_rounds_us']})"
    )


async def cold_verify(hub: Any, token: str) -> dict[str, float]:
    """A JWT-SVID's first verification (not cached), µs on the loop thread."""
    verifier = hub.identities.verifier
    got = []
    for _ in range(300):
        c0 = clock()
        verifier._validate(token)
        got.append((clock() - c0) / 1e3)
    return {"p50_us": percentile(got, 50), "mean_us": statistics.fmean(got)}


def hot_loop(stages: Stages) -> dict[str, float]:
    """The last call of each sync stage again, 3000 times back to back: its cost with warm
    caches, µs p50 (the figure a micro-benchmark gives), beside its cost in the path."""
    found = {}
    for name in ("envelope", "payload", "policy", "prepare"):
        if name not in stages.last:
            continue
        func, a, kw = stages.last[name]
        got = []
        for _ in range(3000):
            c0 = clock()
            func(*a, **kw)
            got.append((clock() - c0 - stages.empty) / 1e3)
        found[name] = round(percentile(got, 50), 1)
    return found


async def measure(tmp: Path) -> dict[str, Any]:
    app, runner, backend, key, port = await start_probe_hub(tmp)
    hub = app[HUB]
    stages = Stages()
    overhead = calibrate(stages)
    figures: dict[str, Any] = {"loop": "uvloop" if UVLOOP else "asyncio", "clock": overhead}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with aiohttp.ClientSession(backend.gateway_url, headers=headers) as http_:

            async def hold() -> Any:
                task = {"agent": "probe", "input": {"hold_s": HOLD_S}, "timeout_s": HOLD_S + 60}
                async with http_.post("/v1/tasks", json=task) as r:
                    body = await r.json()
                    assert r.status == 202, body
                return await wait_running(app, str(body["task_id"]))

            target, sender_inst = await hold(), await hold()
            started = time.monotonic()
            token = backend.envs[sender_inst.handle.id]["AGENT_SVID"]
            figures["auth_cold"] = await cold_verify(hub, token)
            sender = await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                "--sender",
                str(port),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                # Not on the command line, where every process could read it.
                env={**os.environ, SVID_ENV: token},
            )
            counters = Counters(hub.store._writer)
            wrappers = Instrumented(app, runner, stages)
            phases: list[dict[str, Any]] = []
            try:
                await run_phase(sender, counters, stages, 4, 400)  # warm-up
                for r in range(ROUNDS):
                    for c in CONCURRENCY:
                        for instrumented in (r % 2 == 0, r % 2 == 1):
                            if time.monotonic() - started > HOLD_S - 40:
                                raise SystemExit(f"the agents hold {HOLD_S} s only: smaller n")
                            if instrumented:
                                wrappers.install(steps=c > 1)
                            try:
                                phase = await run_phase(sender, counters, stages, c, N)
                            finally:
                                wrappers.uninstall()
                            phases.append({**phase, "c": c, "instrumented": instrumented})
                            print(
                                f"  round {r + 1} c={c} "
                                f"{'instrumented' if instrumented else 'plain'}: "
                                f"{phase['cpu_ns']['process'] / phase['n'] / 1e3:.1f} µs/msg",
                                flush=True,
                            )
            finally:
                assert sender.stdin is not None
                sender.stdin.close()
                await sender.wait()
            fast = hub.config.policy.fast_path_status()
            figures["hot_loop_p50_us"] = hot_loop(stages)
            if "policy" in stages.last:
                # What the policy reads and the record logs: its size drives both costs.
                policy_input = stages.last["policy"][1][1]
                figures["policy_input_bytes"] = len(json.dumps(policy_input))
            for c in CONCURRENCY:
                table = per_message(phases, c, overhead)
                print_table(c, table)
                figures[f"c{c}"] = {
                    **{k: v for k, v in table.items() if k != "rows"},
                    "stages_us": {
                        row["stage"].strip(): {
                            "p50": None if row["p50_us"] is None else round(row["p50_us"], 1),
                            "mean": round(row["mean_us"], 1),
                            "share": round(row["share"], 3),
                        }
                        for row in table["rows"]
                    },
                }
            if fast is not None:
                figures["policy_fast_path"] = {
                    "answered": fast["answered"],
                    "fell_back": fast["fell_back"],
                }
            decisions, _ = await hub.decisions.list(kind="message", limit=1)
            figures["message_decisions_logged"] = decisions[0]["seq"] if decisions else 0
            for inst in (target, sender_inst):
                async with http_.delete(f"/v1/tasks/{inst.task_id}"):
                    pass
    finally:
        await runner.cleanup()
    return figures


def main() -> None:
    factory = None
    if UVLOOP:
        import uvloop

        factory = uvloop.new_event_loop
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with tempfile.TemporaryDirectory() as tmp, asyncio.Runner(loop_factory=factory) as runner:
        figures = runner.run(measure(Path(tmp)))
    figures["load_before_after"] = (
        f"{load_before} / {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    loop = "uvloop" if UVLOOP else "asyncio"
    print()
    report(f"hub CPU per routed message by stage ({loop}, n={N} per phase)", figures)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sender"]:
        sender_child(int(sys.argv[2]), os.environ[SVID_ENV])
    else:
        main()
