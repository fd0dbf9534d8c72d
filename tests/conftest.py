"""Shared fixtures: repository paths, API keys, a fake container backend, hub apps."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.containers.backend import LABEL_HUB, ContainerHandle, ContainerSpec
from gateway.errors import AgentUnavailable
from gateway.identity.apikeys import KeyStore
from gateway.settings import Settings
from tests.pg import pg_cluster, pg_target, store_target  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
ROLES = {
    "user": ["user"],
    "developer": ["user", "developer"],
    "auditor": ["auditor"],
    "operator": ["operator"],
    "nobody": [],
}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """One API key per role set, in ``tmp_path/keys.json``."""
    store = KeyStore.load(tmp_path / "keys.json")
    return {name: store.create(name, roles) for name, roles in ROLES.items()}


def auth(key: str) -> dict[str, str]:
    """Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


def load_example(name: str) -> Any:
    """Import ``examples/agents/<name>/agent.py`` and return its ``agent``."""
    path = REPO / "examples" / "agents" / name / "agent.py"
    if not path.exists():
        # An MCP server example (examples/agents/counter) is no agent to run in-process:
        # to the fake backends, an image the engine cannot start.
        raise AgentUnavailable(f"examples/agents/{name} has no agent.py to run in-process")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.agent


@dataclass
class FakeBackend:
    """Runs example agents in-process on loopback instead of in containers.

    The agent SDK and the HTTP hand-off are real; only Docker is replaced. ``fail_start``
    makes the next starts fail like an unreachable engine.
    """

    started: list[ContainerSpec] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    servers: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    exited: set[str] = field(default_factory=set)
    fail_start: bool = False
    start_delay_s: float = 0.0
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    async def ping(self) -> None:
        if self.fail_start:
            raise AgentUnavailable("fake engine is down")

    async def prepare(self) -> dict[str, str]:
        return {"internal_gateway": "127.0.0.1"}

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        if self.fail_start:
            raise AgentUnavailable("fake engine is down")
        await asyncio.sleep(self.start_delay_s)
        agent = load_example(spec.labels["io.agent-gateway.agent"])
        self.started.append(spec)
        server = agent.serve_in_thread()
        cid = f"fake{next(self._ids)}"
        self.servers[cid] = server
        self.labels[cid] = dict(spec.labels)
        self.ports[cid] = server.server_port
        return ContainerHandle(id=cid, name=spec.name, address="127.0.0.1", port=server.server_port)

    async def attach(self, container_id: str, port: int) -> ContainerHandle:
        if container_id not in self.servers:
            raise AgentUnavailable(f"no container {container_id}")
        return ContainerHandle(
            id=container_id, name=container_id, address="127.0.0.1", port=self.ports[container_id]
        )

    async def is_running(self, container_id: str) -> bool:
        return container_id in self.servers

    async def remove(self, container_id: str) -> None:
        server = self.servers.pop(container_id, None)
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            self.removed.append(container_id)

    async def list_managed(self, hub_id: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "id": cid,
                "name": cid,
                "labels": self.labels.get(cid, {}),
                "state": "exited" if cid in self.exited else "running",
            }
            for cid in self.servers
            # As the engine's label filter does.
            if hub_id is None or self.labels.get(cid, {}).get(LABEL_HUB) == hub_id
        ]

    async def close(self) -> None:
        for cid in list(self.servers):
            await self.remove(cid)


async def submit_through_router(hub: Any, key: str, body: dict[str, Any]) -> tuple[str, Any]:
    """Submit ``body`` as the owner of ``key`` past the HTTP door (no API decision is
    logged), wait for the task; (its dispatch decision id, the finished task or None)."""
    from gateway.errors import PolicyDenied

    request = {"method": "POST", "path": "/v1/tasks", "remote_addr": "127.0.0.1", "time": "t"}
    try:
        task, _ = await hub.router.submit(hub.keys.authenticate(key), body, request=request)
    except PolicyDenied as e:
        return str(e.decision_id), None
    done = await hub.router.wait_for(task.id, 10)
    return str(done.decision_id), done


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo`` with a fixed author and no user or system config; its stdout."""
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a hub whose state lives under ``tmp_path``."""
    base: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "keys_file": tmp_path / "keys.json",
        "agents_file": REPO / "agents.yaml",
        "schemas_dir": REPO / "schemas",
        "policies_dir": REPO / "policies",
        "hub_id": f"test-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}",
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def config_copy(tmp_path: Path) -> Callable[[], Path]:
    """Copy agents.yaml, schemas/ and policies/ into ``tmp_path/repo`` for edits."""

    def make() -> Path:
        root = tmp_path / "repo"
        if not root.exists():
            root.mkdir()
            shutil.copy(REPO / "agents.yaml", root / "agents.yaml")
            shutil.copytree(REPO / "schemas", root / "schemas")
            shutil.copytree(REPO / "policies", root / "policies")
        return root

    return make


@pytest.fixture
async def fake_hub(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> AsyncIterator[tuple[Any, FakeBackend]]:
    """A hub app with the fake backend, as an aiohttp test client."""
    from gateway.http.app import create_app

    backend = FakeBackend()
    app = create_app(make_settings(tmp_path), backend=backend)
    client = await aiohttp_client(app)
    yield client, backend


# Task names of the SDK clients the tests use (anyio task groups inside mcp and a2a clients).
CLIENT_TASKS = ("name='mcp.client.", "name='a2a.client.", "/site-packages/mcp/client/")


def _took(message: str) -> float:
    """The seconds in asyncio's "Executing ... took 0.668 seconds"."""
    try:
        return float(message.rsplit(" took ", 1)[1].split()[0])
    except (IndexError, ValueError):
        return float("inf")


@pytest.fixture(autouse=True)
async def _fail_if_the_event_loop_blocks(caplog: pytest.LogCaptureFixture) -> Any:
    """Fail a test during which one callback held the event loop for over 1 s.

    asyncio's debug mode reports such callbacks; the hub must never do blocking work
    (Docker, SQLite, file scans) on the loop thread. The test's own coroutine is exempt:
    test code may wait on subprocesses and the Docker CLI directly; so are the protocol
    SDKs' client tasks (the official MCP and A2A clients the tests drive the hub with),
    which are the test's side of the wire, not the hub's.
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    # 1 s: a blocking Docker or disk call takes that long or longer; a busy 2-core machine
    # stretches ordinary steps of the hub to 0.5-0.7 s now and then.
    loop.slow_callback_duration = 1.0
    # A full collection scans every object alive (the suite's imports and debug-mode
    # bookkeeping included) and can take 0.3 to 0.7 s, charged to whichever callback it
    # interrupts: the longest pause of the collector during the test is not held against it.
    pauses: list[float] = []
    began: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            pauses.append(time.perf_counter() - began.pop())

    gc.callbacks.append(on_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(on_gc)
    allowance = loop.slow_callback_duration + max(pauses, default=0.0)
    slow = [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.name == "asyncio"
        and "coro=<test_" not in r.getMessage()
        and not any(client in r.getMessage() for client in CLIENT_TASKS)
        and r.getMessage().startswith("Executing")
        and " took " in r.getMessage()
        and _took(r.getMessage()) > allowance
    ]
    assert not slow, f"the event loop was blocked: {slow[:3]}"
