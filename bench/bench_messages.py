"""Agent-to-agent messages: hub-routed request/reply against proxies and the direct call.

Two ``probe`` agents run as tasks of a real hub (HTTP API, JWT-SVID checked on every
message, envelope and payload schemas, the ``gateway.messages`` policy, a chained decision
record written to SQLite, then the hand-off to the target's ``POST /message``). One holds
and answers; the other is the sender, whose JWT-SVID this bench presents.

For the baselines to be possible the agents run as host processes on loopback (the
``ProcessBackend`` below starts ``examples/agents/probe/agent.py`` with the environment a
container would get): inside the hub's internal network a direct connection is refused by
design (tests/integration/test_messages_docker.py). ``--docker`` instead runs the routed
side between real containers, the probe itself sending with the SDK's ``GatewayClient``
from ``concurrency`` threads (no baselines there; the hub in this process).

Baselines, in the same run and from the same sender (this process: one ``http.client``
keep-alive connection per thread, the body JSON-encoded and the answer decoded on every call,
the same headers, Authorization included, to every variant; the clock per call; connections
opened before the clock starts), alternating in rounds, each in front of the same target
agent: the hub (``hub``, a subprocess running the HTTP API, so that its CPU is its own);
with ``--uvloop`` also a second hub on uvloop (``hub_uvloop``, its own target, an identical
probe); ``nginx`` (Debian's package, started here with a generated config: ``daemon off``,
``worker_processes 1`` like the one hub process, keep-alive to the upstream); ``bare``, an
aiohttp pass-through proxy (one shared ClientSession, no checks; a subprocess on asyncio);
and ``direct``, straight to the target's ``/message`` with the body the hub would deliver.
CPU per message is read from ``/proc`` for each process over its own variant's steps; the
sender's is this process's ``time.process_time()``, which no proxy shares.

The token verification figures are measured in this process, before the rest.

Usage: python bench/bench_messages.py [n] [--uvloop] [--docker]
    (targets: >= 3000 msg/s, <= 5 µs; n at 16 in flight per round, n/4 one at a time)
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web

from bench._stats import percentile, report, summary
from gateway.containers.backend import LABEL_AGENT, ContainerHandle, ContainerSpec
from gateway.http.app import HUB, create_app
from gateway.identity.apikeys import KeyStore
from gateway.identity.service import AgentIdentities
from gateway.settings import REPO_ROOT, Settings

args = [a for a in sys.argv[1:] if a.isdigit()]
N = int(args[0]) if args else 6000
DOCKER = "--docker" in sys.argv
UVLOOP = "--uvloop" in sys.argv
ROUNDS = 3
CONCURRENCY = (1, 16)
# probe.input.json caps hold_s at 300: the agents' tasks, and so the baselines, end then.
HOLD_S = 300
PROBE_BLOCK = re.compile(r"(- name: probe\n(?:[ \t].*\n)*?[ \t]+timeout_s: )\d+")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default), from /proc."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessBackend:
    """Runs each agent as a host process on loopback, with its container's environment."""

    def __init__(self) -> None:
        self.gateway_url = ""
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.envs: dict[str, dict[str, str]] = {}

    async def ping(self) -> None:
        return None

    async def prepare(self) -> dict[str, str]:
        return {"internal_gateway": "127.0.0.1"}

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        port = free_port()
        script = REPO_ROOT / "examples" / "agents" / spec.labels[LABEL_AGENT] / "agent.py"
        env = {
            **spec.env,
            "AGENT_PORT": str(port),
            "GATEWAY_URL": self.gateway_url,
            "PYTHONPATH": str(REPO_ROOT),
            "PATH": os.environ.get("PATH", ""),
        }
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), env=env)
        self.procs[str(proc.pid)] = proc
        self.envs[str(proc.pid)] = env
        return ContainerHandle(id=str(proc.pid), name=spec.name, address="127.0.0.1", port=port)

    async def attach(self, container_id: str, port: int) -> ContainerHandle:
        raise NotImplementedError

    async def is_running(self, container_id: str) -> bool:
        proc = self.procs.get(container_id)
        return proc is not None and proc.returncode is None

    async def remove(self, container_id: str) -> None:
        proc = self.procs.pop(container_id, None)
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()

    async def list_managed(self, hub_id: str | None = None) -> list[dict[str, Any]]:
        return []

    async def close(self) -> None:
        for pid in list(self.procs):
            await self.remove(pid)


async def wait_running(app: web.Application, task_id: str) -> Any:
    hub = app[HUB]
    for _ in range(600):
        inst = hub.instances.for_task(task_id)
        if inst is not None and inst.handle is not None:
            return inst
        await asyncio.sleep(0.05)
    raise SystemExit(f"task {task_id} never ran")


async def measure_routing(tmp: Path) -> dict[str, Any]:
    keys = KeyStore.load(tmp / "keys.json")
    key = keys.create("bench", ["user", "developer", "operator"])
    headers = {"Authorization": f"Bearer {key}"}
    port = free_port()
    backend = None if DOCKER else ProcessBackend()
    tag = secrets.token_hex(3)
    settings = Settings(
        port=port,
        state_dir=tmp / "state",
        keys_file=tmp / "keys.json",
        hub_id="bench-" + tag,
        network=f"agw-bench-{tag}-int",
        egress_network=f"agw-bench-{tag}-egr",
    )
    app = create_app(settings, backend=backend)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hub = app[HUB]
    hosts = ["127.0.0.1"]
    if DOCKER:
        hosts.append(hub.facts["internal_gateway"])
    for host in hosts:
        await web.TCPSite(runner, host, port).start()
    if backend is not None:
        backend.gateway_url = f"http://127.0.0.1:{port}"
    figures: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=headers) as http:

            async def submit(input: dict[str, Any]) -> str:
                async with http.post("/v1/tasks", json={"agent": "probe", "input": input}) as r:
                    body = await r.json()
                    assert r.status == 202, body
                    return str(body["task_id"])

            target = await wait_running(app, await submit({"hold_s": 300}))
            direct_url = target.handle.base_url
            script: list[dict[str, Any]] = [
                {"op": "load", "to": "probe", "n": 300, "concurrency": 4},  # warm-up
                {"op": "load", "to": "probe", "n": 300, "concurrency": 4, "direct_url": direct_url},
            ]
            for _ in range(ROUNDS):
                for c in CONCURRENCY:
                    n = N if c > 1 else N // 4
                    script.append({"op": "load", "to": "probe", "n": n, "concurrency": c})
                    if not DOCKER:
                        script.append({**script[-1], "direct_url": direct_url})
            cpu_before = {"hub": cpu_seconds()}
            if backend is not None:
                cpu_before["target"] = cpu_seconds(int(target.handle.id))
            sender_id = await submit({"script": script})
            async with http.get(f"/v1/tasks/{sender_id}?wait=60") as r:
                sender = await r.json()
            while sender["state"] not in ("succeeded", "failed", "timed_out"):
                async with http.get(f"/v1/tasks/{sender_id}?wait=60") as r:
                    sender = await r.json()
            if sender["state"] != "succeeded":
                raise SystemExit(f"sender {sender['state']}: {sender.get('error')}")
            cpu = {"hub": cpu_seconds() - cpu_before["hub"]}
            if backend is not None:
                cpu["target"] = cpu_seconds(int(target.handle.id)) - cpu_before["target"]
            cpu["sender"] = sum(r["cpu_s"] for r in sender["result"]["results"])
            results = sender["result"]["results"][2:]
            for c in CONCURRENCY:
                for mode in ("routed", "direct"):
                    runs = [
                        r
                        for r, step in zip(results, script[2:], strict=True)
                        if step["concurrency"] == c and ("direct_url" in step) == (mode == "direct")
                    ]
                    if not runs:
                        continue
                    bad = [r for r in runs if not r["ok"]]
                    if bad:
                        raise SystemExit(f"{mode} c={c} failed: {bad[0]['errors']}")
                    best = max(runs, key=lambda r: r["per_s"])
                    figures[f"{mode}_c{c}"] = {
                        "msgs_per_s": best["per_s"],
                        "p50_ms": best["p50_ms"],
                        "p99_ms": best["p99_ms"],
                        "runs_per_s": [r["per_s"] for r in runs],
                    }
                if f"direct_c{c}" in figures:
                    r, d = figures[f"routed_c{c}"], figures[f"direct_c{c}"]
                    figures[f"ratio_c{c}"] = {
                        "throughput_routed_over_direct": round(
                            r["msgs_per_s"] / d["msgs_per_s"], 3
                        ),
                        "p50_routed_over_direct": round(r["p50_ms"] / d["p50_ms"], 2),
                    }
            sent = sum(r["n"] for r in sender["result"]["results"])
            routed = sum(
                r["n"]
                for r, step in zip(sender["result"]["results"], script, strict=True)
                if "direct_url" not in step
            )
            figures["cpu_ms_per_message"] = {
                "hub_per_routed": round(cpu["hub"] / routed * 1000, 3),
                **{
                    f"{k}_per_sent": round(v / sent * 1000, 3) for k, v in cpu.items() if k != "hub"
                },
            }
            decisions, _ = await hub.decisions.list(kind="message", limit=1)
            figures["message_decisions_logged"] = decisions[0]["seq"] if decisions else 0
            async with http.delete(f"/v1/tasks/{target.task_id}"):
                pass
    finally:
        await runner.cleanup()
        if DOCKER:
            import docker

            from tests.integration.conftest import cleanup_hub

            cleanup_hub(
                docker.from_env(version="auto").api,
                settings.hub_id,
                [settings.network, settings.egress_network],
            )
    return figures


# -- the baselines: the hub and the bare proxy as subprocesses of this bench, nginx started here


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` whole or not at all (the parent polls for the file)."""
    part = path.with_suffix(".part")
    part.write_text(json.dumps(doc))
    part.rename(path)


async def until_stdin_closed() -> None:
    """Return when the parent closes our stdin (its way of saying stop)."""
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)


async def start_probe_hub(
    tmp: Path,
) -> tuple[web.Application, web.AppRunner, ProcessBackend, str, int]:
    """A hub on loopback whose agents run as host processes (``ProcessBackend``), in ``tmp``:
    (app, runner, backend, an API key with every role, port)."""
    # A copy of agents.yaml whose probe may run for the whole hold (the shipped limit is lower).
    agents_file = tmp / "agents.yaml"
    shipped = (REPO_ROOT / "agents.yaml").read_text()
    agents_file.write_text(PROBE_BLOCK.sub(rf"\g<1>{HOLD_S + 60}", shipped, count=1))
    keys = KeyStore.load(tmp / "keys.json")
    key = keys.create("bench", ["user", "developer", "operator"])
    port = free_port()
    backend = ProcessBackend()
    tag = secrets.token_hex(3)
    settings = Settings(
        port=port,
        state_dir=tmp / "state",
        keys_file=tmp / "keys.json",
        hub_id="bench-" + tag,
        network=f"agw-bench-{tag}-int",
        egress_network=f"agw-bench-{tag}-egr",
        svid_ttl_s=3600,  # the sender's token outlives the run; no renewal inside it
        agents_file=agents_file,
    )
    app = create_app(settings, backend=backend)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    backend.gateway_url = f"http://127.0.0.1:{port}"
    return app, runner, backend, key, port


async def serve_hub(conf: dict[str, Any]) -> None:
    """Child: a hub with a target and a sender probe; report their addresses and the
    sender's JWT-SVID in ``conf["info"]``, then serve until stdin closes."""
    tmp = Path(conf["tmp"])
    app, runner, backend, key, port = await start_probe_hub(tmp)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with aiohttp.ClientSession(backend.gateway_url, headers=headers) as http:

            async def hold() -> Any:
                task = {"agent": "probe", "input": {"hold_s": HOLD_S}, "timeout_s": HOLD_S + 60}
                async with http.post("/v1/tasks", json=task) as r:
                    body = await r.json()
                    assert r.status == 202, body
                return await wait_running(app, str(body["task_id"]))

            target, sender = await hold(), await hold()
            write_json(
                Path(conf["info"]),
                {
                    "port": port,
                    "pid": os.getpid(),
                    "target_url": target.handle.base_url,
                    "target_pid": int(target.handle.id),
                    "token": backend.envs[sender.handle.id]["AGENT_SVID"],
                    "sender_task_id": sender.task_id,
                    "sender_spiffe_id": sender.spiffe_id,
                },
            )
            await until_stdin_closed()
            decisions, _ = await app[HUB].decisions.list(kind="message", limit=1)
            write_json(Path(conf["done"]), {"decisions": decisions[0]["seq"] if decisions else 0})
            for inst in (target, sender):
                async with http.delete(f"/v1/tasks/{inst.task_id}"):
                    pass
    finally:
        await runner.cleanup()


async def serve_bare(conf: dict[str, Any]) -> None:
    """Child: an aiohttp pass-through proxy to ``conf["target"]`` (no checks at all)."""
    port = free_port()
    async with aiohttp.ClientSession(conf["target"]) as session:

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {"Content-Type": "application/json"}
            async with session.post("/message", data=body, headers=headers) as r:
                answer = await r.read()
                return web.Response(status=r.status, body=answer, content_type=r.content_type)

        app = web.Application()
        app.router.add_post("/message", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        write_json(Path(conf["info"]), {"port": port, "pid": os.getpid()})
        try:
            await until_stdin_closed()
        finally:
            await runner.cleanup()


def run_child(mode: str, conf: dict[str, Any]) -> None:
    """Entry point of ``--child MODE CONF``; ``conf["uvloop"]`` picks the event loop."""
    serve = {"hub": serve_hub, "bare": serve_bare}[mode]
    factory = None
    if conf.get("uvloop"):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(conf))


@dataclass
class Child:
    """A process this bench started, with what it reported once ready."""

    name: str
    proc: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)
    done: Path | None = None

    def stop(self) -> dict[str, Any]:
        """Ask it to stop (stdin closed, or SIGQUIT for nginx); what it left in ``done``."""
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            else:
                self.proc.send_signal(signal.SIGQUIT)  # nginx: graceful shutdown
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.done is not None and self.done.is_file():
            return dict(json.loads(self.done.read_text()))
        return {}


def start_child(name: str, mode: str, tmp: Path, **conf: Any) -> Child:
    """Start ``--child MODE`` and wait until it wrote its info file."""
    tmp.mkdir(parents=True, exist_ok=True)
    conf = {"tmp": str(tmp), "info": str(tmp / "info.json"), "done": str(tmp / "done.json"), **conf}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", mode, json.dumps(conf)],
        stdin=subprocess.PIPE,
    )
    child = Child(name, proc, done=Path(conf["done"]))
    info = Path(conf["info"])
    deadline = time.monotonic() + 120
    while not info.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            child.stop()
            raise SystemExit(f"{name} did not start (exit {proc.returncode})")
        time.sleep(0.05)
    child.info = json.loads(info.read_text())
    return child


def nginx_binary() -> str:
    """Debian's nginx; installed with apt-get when missing and we are root, else a hint."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("nginx missing: apt-get install -y nginx", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], env=env).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], env=env, check=True)
        found = shutil.which("nginx", path="/usr/sbin:/sbin")
        if found:
            return found
    raise SystemExit("nginx is needed for the baseline: apt-get install nginx (as root)")


NGINX_CONF = """\
daemon off;
master_process on;
# One worker: the hub is one process with one event loop.
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream target {{
        server {upstream};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location = /message {{
            proxy_pass http://target;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx(upstream: str) -> Child:
    """nginx in front of ``upstream`` (host:port), config and files in a temp dir of its own."""
    binary = nginx_binary()
    # Its own directory, readable by the worker (nobody, when we are root).
    d = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    d.chmod(0o755)
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, upstream=upstream, port=port))
    cmd = [binary, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    child = Child("nginx", proc, info={"port": port, "pid": proc.pid, "dir": str(d)})
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return child
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (d / "error.log").read_text() if (d / "error.log").is_file() else ""
                child.stop()
                raise SystemExit(f"nginx did not start: {log}") from None
            time.sleep(0.05)


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (nginx: the master and its worker)."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Variant:
    """One way from the sender to the target: where to post, what, and whose CPU it costs."""

    def __init__(
        self,
        name: str,
        info: dict[str, Any],
        path: str,
        body: dict[str, Any],
        token: str,
        target_pid: int | None = None,
    ) -> None:
        self.name, self.port, self.path, self.body = name, int(info["port"]), path, body
        self.cpu_pid: int | None = info.get("pid")  # the proxy's process (None: direct)
        self.target_pid = int(target_pid or info["target_pid"])
        # The same headers to every variant; only the hub reads Authorization.
        self.headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Authorization": f"Bearer {token}",
        }
        self.runs: list[dict[str, Any]] = []


def load(v: Variant, n: int, concurrency: int) -> dict[str, Any]:
    """``n`` request/replies from ``concurrency`` threads, timed per call as each thread saw it;
    the same code for every variant."""
    counter = iter(range(n))
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", v.port, timeout=30)
        conn.connect()
        mine = []
        ready.wait()
        for _ in iter(lambda: next(counter, None), None):
            start = time.perf_counter()
            try:
                conn.request("POST", v.path, json.dumps(v.body).encode(), v.headers)
                resp = conn.getresponse()
                raw = resp.read()
                if resp.status != 200 or "reply" not in json.loads(raw):
                    raise ValueError(f"{resp.status} {raw[:300]!r}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", v.port, timeout=30)
                continue
            mine.append((time.perf_counter() - start) * 1000)
        conn.close()
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in pool:
        t.start()
    proxy_cpu = tree_cpu(v.cpu_pid) if v.cpu_pid else 0.0
    target_cpu = cpu_seconds(v.target_pid)
    ready.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for t in pool:
        t.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if errors:
        raise SystemExit(f"{v.name} c={concurrency}: {len(errors)} failed: {errors[:3]}")
    latencies.sort()
    return {
        "concurrency": concurrency,
        "n": len(latencies),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "proxy_cpu_s": (tree_cpu(v.cpu_pid) - proxy_cpu) if v.cpu_pid else 0.0,
        "target_cpu_s": cpu_seconds(v.target_pid) - target_cpu,
        "sender_cpu_s": cpu,
    }


def delivery_body(hub: Child) -> dict[str, Any]:
    """What the hub hands the target for a ping (gateway.routers.messages._delivery)."""
    return {
        "message_id": "0" * 32,
        "type": "request",
        "kind": "ping",
        "payload": {"quiet": True},
        "from": {
            "spiffe_id": hub.info["sender_spiffe_id"],
            "agent": "probe",
            "task_id": hub.info["sender_task_id"],
        },
    }


def run_rounds(variants: list[Variant]) -> None:
    """Warm every variant up, then ROUNDS rounds of every concurrency for every variant,
    the order rotated each round so that drift and the load of the machine hit all alike."""
    started = time.monotonic()
    for v in variants:
        load(v, 300, 4)
    for r in range(ROUNDS):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for c in CONCURRENCY:
            for v in order:
                if time.monotonic() - started > HOLD_S - 30:
                    raise SystemExit(f"the agents hold for {HOLD_S} s only: use a smaller n")
                v.runs.append(load(v, N if c > 1 else N // 4, c))


def summarize(variants: list[Variant]) -> dict[str, Any]:
    """Per variant and concurrency: the best round (its msg/s, p50, p99) and every round's
    msg/s; then the ratios and the CPU per message of each process."""
    figures: dict[str, Any] = {}
    key = {"hub": "routed", "hub_uvloop": "routed_uvloop"}
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for c in CONCURRENCY:
        for v in variants:
            runs = [r for r in v.runs if r["concurrency"] == c]
            top = best[v.name, c] = max(runs, key=lambda r: r["per_s"])
            figures[f"{key.get(v.name, v.name)}_c{c}"] = {
                "msgs_per_s": top["per_s"],
                "p50_ms": top["p50_ms"],
                "p99_ms": top["p99_ms"],
                "runs_per_s": [r["per_s"] for r in runs],
            }
        r, d = best["hub", c], best["direct", c]
        figures[f"ratio_c{c}"] = {
            "throughput_routed_over_direct": round(r["per_s"] / d["per_s"], 3),
            "p50_routed_over_direct": round(r["p50_ms"] / d["p50_ms"], 2),
        }
    names = [v.name for v in variants]
    for c in CONCURRENCY:
        rate = {name: best[name, c]["per_s"] for name in names}
        pairs = [("hub", "bare"), ("hub", "direct"), ("nginx", "direct"), ("bare", "direct")]
        if "hub_uvloop" in names:
            pairs += [("hub_uvloop", "bare"), ("hub_uvloop", "direct"), ("hub_uvloop", "hub")]
        figures[f"throughput_ratios_c{c}"] = {
            f"{a}/{b}": round(rate[a] / rate[b], 3) for a, b in pairs
        }
        figures[f"p50_added_over_direct_ms_c{c}"] = {
            name: round(best[name, c]["p50_ms"] - best["direct", c]["p50_ms"], 3)
            for name in names
            if name != "direct"
        }
    per_msg: dict[str, dict[str, float]] = {"proxy": {}, "target": {}, "sender": {}}
    for v in variants:
        sent = sum(r["n"] for r in v.runs)
        for what in per_msg:
            if what != "proxy" or v.cpu_pid:
                per_msg[what][v.name] = round(
                    sum(r[f"{what}_cpu_s"] for r in v.runs) / sent * 1e3, 3
                )
    figures["cpu_ms_per_message"] = {
        "hub_per_routed": per_msg["proxy"]["hub"],
        "target_per_sent": round(
            sum(r["target_cpu_s"] for v in variants for r in v.runs)
            / sum(r["n"] for v in variants for r in v.runs)
            * 1e3,
            3,
        ),
        "sender_per_sent": round(
            sum(r["sender_cpu_s"] for v in variants for r in v.runs)
            / sum(r["n"] for v in variants for r in v.runs)
            * 1e3,
            3,
        ),
    }
    figures["proxy_cpu_ms_per_message"] = per_msg["proxy"]
    figures["target_cpu_ms_per_message"] = per_msg["target"]
    figures["sender_cpu_ms_per_message"] = per_msg["sender"]
    return figures


def measure_baselines(tmp: Path) -> dict[str, Any]:
    """The hub (and with --uvloop a hub on uvloop), nginx, the bare proxy and direct, from
    one sender in one run, in front of the same target."""
    children: list[Child] = []
    try:
        hub = start_child("hub", "hub", tmp / "hub")
        children.append(hub)
        hubs = [hub]
        if UVLOOP:
            try:
                import uvloop  # noqa: F401 (only the child runs it)
            except ImportError:
                raise SystemExit("--uvloop: .venv/bin/pip install 'uvloop==0.23.0'") from None
            hubs.append(start_child("hub_uvloop", "hub", tmp / "hub-uvloop", uvloop=True))
            children.append(hubs[-1])
        target = hub.info["target_url"]
        bare = start_child("bare", "bare", tmp / "bare", target=target)
        children.append(bare)
        nginx = start_nginx(target.removeprefix("http://"))
        children.append(nginx)
        ping = {"type": "request", "kind": "ping", "to": "probe", "payload": {"quiet": True}}
        deliver = delivery_body(hub)
        target_pid = int(hub.info["target_pid"])
        direct_port = int(target.rsplit(":", 1)[1])
        token = hub.info["token"]
        variants = [Variant("hub", hub.info, "/v1/messages", ping, token)]
        if UVLOOP:
            # Its own target and sender: the token names the sender of that hub.
            u = hubs[1].info
            variants.append(Variant("hub_uvloop", u, "/v1/messages", ping, u["token"]))
        variants += [
            Variant("nginx", nginx.info, "/message", deliver, token, target_pid),
            Variant("bare", bare.info, "/message", deliver, token, target_pid),
            Variant("direct", {"port": direct_port}, "/message", deliver, token, target_pid),
        ]
        run_rounds(variants)
        figures = summarize(variants)
        figures["processes"] = {"hub": 1, "nginx_worker_processes": 1, "bare": 1}
        figures["message_decisions_logged"] = hub.stop().get("decisions", 0)
        return figures
    finally:
        for child in reversed(children):
            child.stop()
        if children and "dir" in children[-1].info:
            shutil.rmtree(children[-1].info["dir"], ignore_errors=True)


def measure_verification(tmp: Path) -> dict[str, Any]:
    live: set[str] = set()
    ids = AgentIdentities.create(
        tmp / "verify",
        trust_domain="agent-gateway.local",
        audience="agent-gateway",
        ttl_s=300,
        is_active=live.__contains__,
    )
    tokens = []
    for i in range(2000):
        live.add(f"i{i}")
        tokens.append(ids.mint_env("probe", f"i{i}")[1]["AGENT_SVID"])
    cold = []
    for token in tokens:
        start = time.perf_counter_ns()
        ids.verify(token)
        cold.append((time.perf_counter_ns() - start) / 1000)
    cached = []
    for _ in range(50):
        for token in tokens[:2000]:
            start = time.perf_counter_ns()
            ids.verify(token)
            cached.append((time.perf_counter_ns() - start) / 1000)
    return {"verify_cold_us": summary(cold), "verify_cached_us": summary(cached)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        figures: dict[str, Any] = {"uptime_before": uptime()}
        figures.update(measure_verification(Path(tmp)))
        if DOCKER:
            figures.update(asyncio.run(measure_routing(Path(tmp))))
        else:
            figures.update(measure_baselines(Path(tmp)))
        figures["uptime_after"] = uptime()
    where = "real containers" if DOCKER else "agents as host processes on loopback"
    report(f"agent-to-agent request/reply through the hub ({where}, n={N})", figures)


def uptime() -> str:
    """The load averages (1, 5, 15 min): these figures mean little on a busy machine."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        run_child(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
